"""Between the engine and the sharded checkpoint format: this rank's state as `ParamRange`s.

Saving walks the flat units: for every parameter slot that overlaps this rank's shard, the
overlap becomes one ParamRange carrying the fp32 master weights and the optimizer's
element-wise state (sliced out of the segment tensor the optimizer steps). Loading does the
reverse for the *new* layout, asking the reader for exactly the ranges this rank now owns;
whichever saved ranges cover them are read. World size and ZeRO stage may differ freely.

Tensor slicing: ZeRO's units hold each rank's local slices, so a sliced parameter's ranges index
its slice and carry its `TPSlice`; loading asks for ranges of the new slice, which the reader
maps onto whatever tp size saved it. A replicated parameter is identical on every rank of a
tensor group, so only tp rank 0 saves it (the others' copies would be dead weight on disk).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Protocol

import torch

from zray.checkpoint.shard import MASTER, ParamRange, RankShard
from zray.parallel.tp_layers import tp_slices
from zray.parallel.tp_slice import TPSlice

if TYPE_CHECKING:
    from zray.engine import Engine


class RangeReader(Protocol):
    def read(
        self, name: str, lo: int, hi: int, key: str = MASTER, tp: TPSlice | None = None
    ) -> torch.Tensor: ...
    def keys(self, name: str) -> set[str]: ...
    def rank_state(self, rank: int) -> dict[str, Any] | None: ...
    def global_state(self) -> dict[str, Any]: ...


def _segments(engine: Engine) -> dict[tuple[int, int], tuple[int, int, torch.Tensor]]:
    """(unit index, group) -> (unit-buffer lo, hi, the optimizer's tensor for that segment)."""
    return {k: (seg.lo, seg.hi, t) for k, (seg, t) in engine.zero.segment_tensors.items()}


def rng_state(engine: Engine) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if engine.ctx.is_cuda else None,
        "python": random.getstate(),
    }


def capture(
    engine: Engine,
    sampler: dict[str, Any] | None = None,
    client_state: dict[str, Any] | None = None,
) -> RankShard:
    """This rank's RankShard (tensors copied to CPU: the result is a snapshot)."""
    engine.wait_for_params()
    ctx, opt = engine.ctx, engine.zero.optimizer
    segments = _segments(engine)
    specs = tp_slices(engine.module)
    ranges: list[ParamRange] = []
    scalars: dict[int, dict[str, float]] = {}
    for ui, unit in enumerate(engine.zero.units):
        for slot in unit.layout.slots:
            overlap = unit.layout.slot_overlap(slot, ctx.dp_rank)
            spec = specs.get(slot.name)
            if overlap is None or (spec is None and ctx.tp_rank != 0):
                continue
            lo, hi = overlap
            a = slot.offset + lo  # position in the unit's flat buffer
            tensors = {MASTER: unit.master[a - unit.shard_lo : a - unit.shard_lo + hi - lo]}
            if slot.group >= 0:
                seg_lo, _, seg_t = segments[(ui, slot.group)]
                for key, value in opt.state.get(seg_t, {}).items():
                    if isinstance(value, torch.Tensor) and value.numel() == seg_t.numel():
                        tensors[key] = value.reshape(-1)[a - seg_lo : a - seg_lo + hi - lo]
                    elif isinstance(value, (torch.Tensor, int, float)):
                        scalars.setdefault(slot.group, {})[key] = float(value)
            ranges.append(
                ParamRange(
                    slot.name,
                    spec.full_shape if spec is not None else tuple(slot.shape),
                    lo,
                    hi,
                    {k: v.detach().float().cpu().clone() for k, v in tensors.items()},
                    tp=spec,
                )
            )
    groups = opt.param_groups
    return RankShard(
        # Global rank and world: every rank of the mesh writes its own file.
        rank=ctx.rank,
        world_size=ctx.world_size,
        zero_stage=engine.plan.stage,
        ranges=ranges,
        tp_size=ctx.tp_size,
        group_scalars=[scalars.get(i, {}) for i in range(len(groups))],
        param_groups=[{k: v for k, v in g.items() if k != "params"} for g in groups],
        engine=engine_counters(engine),
        sampler=sampler,
        rng=rng_state(engine),
        client_state=client_state or {},
    )


def engine_counters(engine: Engine) -> dict[str, Any]:
    return {
        "global_steps": engine.global_steps,
        "micro_steps": engine.micro_steps,
        "skipped_steps": engine.skipped_steps,
        "scaler": engine.scaler.state_dict(),
        "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None,
    }


def restore(engine: Engine, reader: RangeReader, load_optimizer: bool = True) -> dict[str, Any]:
    """Load the reader's checkpoint into `engine`'s current layout; returns the global state."""
    ctx, opt = engine.ctx, engine.zero.optimizer
    segments = _segments(engine)
    specs = tp_slices(engine.module)
    mine = reader.rank_state(ctx.rank) or reader.rank_state(0) or {}
    group_scalars = mine.get("group_scalars") or []
    with torch.no_grad():
        for ui, unit in enumerate(engine.zero.units):
            for slot in unit.layout.slots:
                overlap = unit.layout.slot_overlap(slot, ctx.dp_rank)
                if overlap is None:
                    continue
                lo, hi = overlap
                a = slot.offset + lo - unit.shard_lo
                spec = specs.get(slot.name)
                unit.master[a : a + hi - lo].copy_(reader.read(slot.name, lo, hi, MASTER, spec))
                if not load_optimizer or slot.group < 0:
                    continue
                seg_lo, _, seg_t = segments[(ui, slot.group)]
                state = opt.state.setdefault(seg_t, {})
                for key in sorted(reader.keys(slot.name) - {MASTER}):
                    if key not in state:
                        state[key] = torch.zeros_like(seg_t)
                    b = slot.offset + lo - seg_lo
                    state[key].reshape(-1)[b : b + hi - lo].copy_(
                        reader.read(slot.name, lo, hi, key, spec)
                    )
        if load_optimizer:
            for gi, group in enumerate(opt.param_groups):
                scalars = group_scalars[gi] if gi < len(group_scalars) else {}
                for t in group["params"]:
                    if t in opt.state:
                        for key, value in scalars.items():
                            # torch's Adam keeps "step" as a float32 CPU scalar tensor.
                            opt.state[t][key] = torch.tensor(value, dtype=torch.float32)
            saved_groups = mine.get("param_groups") or []
            for group, saved in zip(opt.param_groups, saved_groups, strict=False):
                for k, v in saved.items():
                    if k in group:
                        group[k] = tuple(v) if isinstance(group[k], tuple) else v
    glob = reader.global_state()
    counters = glob.get("engine") or {}
    if counters:
        engine.global_steps = counters["global_steps"]
        engine.micro_steps = counters["micro_steps"]
        engine.skipped_steps = counters["skipped_steps"]
        engine.scaler.load_state_dict(counters["scaler"])
        if engine.lr_scheduler is not None and counters.get("scheduler") is not None:
            engine.lr_scheduler.load_state_dict(counters["scheduler"])
    rng = (reader.rank_state(ctx.rank) or {}).get("rng")
    if rng:
        torch.set_rng_state(rng["torch"])
        if ctx.is_cuda and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        random.setstate(rng["python"])
    engine.zero.zero_grad()
    engine.zero.publish_params()
    return glob

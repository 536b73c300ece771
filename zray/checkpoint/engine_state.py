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

import copy
import random
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RangeSpec:
    """One ParamRange of this rank, as offsets into the layout's source tensors."""

    name: str
    shape: tuple[int, ...]  # the whole (full, unsliced) parameter's shape
    lo: int
    hi: int
    tp: TPSlice | None
    parts: dict[str, tuple[int, int]]  # key -> (index into sources, first element there)


@dataclass(frozen=True)
class ScalarSpec:
    """An optimizer scalar of one param group: a source tensor of one element, or a number."""

    group: int
    key: str
    source: int | None  # index into the layout's sources, or None: `value` holds it
    value: float = 0.0


@dataclass
class StateLayout:
    """Where this rank's training state lives: a few flat tensors and the ranges inside them.

    `sources` are the unit master shards (one per unit) and the optimizer's element-wise state
    of every segment (one per segment and key), in the device memory the optimizer steps; a
    copy of them (whole tensors, a few hundred copies for a large model) and the `ranges`
    rebuild the RankShard's ParamRanges as views. Scalars of the optimizer state (Adam's
    "step") are sources too, keyed by param group in `scalars`: reading a device scalar on the
    host would be a sync, copying it is not.
    """

    sources: list[torch.Tensor]
    ranges: list[RangeSpec]
    scalars: list[ScalarSpec]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sources)

    def signature(self) -> tuple[tuple[int, str], ...]:
        """Sizes and dtypes of the sources: host buffers made for one layout fit another with
        the same signature (a source may move: Adam's step count goes to the GPU at the first
        step after a load)."""
        return tuple((t.numel(), str(t.dtype)) for t in self.sources)


def state_layout(engine: Engine) -> StateLayout:
    """This rank's state as views of the engine's own tensors (nothing is copied)."""
    ctx, opt = engine.ctx, engine.zero.optimizer
    segments = _segments(engine)
    specs = tp_slices(engine.module)
    sources: list[torch.Tensor] = []
    index: dict[int, int] = {}

    def source(t: torch.Tensor) -> int:
        flat = t.detach().reshape(-1)
        key = id(t)
        if key not in index:
            index[key] = len(sources)
            sources.append(flat)
        return index[key]

    ranges: list[RangeSpec] = []
    scalars: dict[tuple[int, str], ScalarSpec] = {}
    for ui, unit in enumerate(engine.zero.units):
        for slot in unit.layout.slots:
            overlap = unit.layout.slot_overlap(slot, ctx.dp_rank)
            spec = specs.get(slot.name)
            if overlap is None or (spec is None and ctx.tp_rank != 0):
                continue
            lo, hi = overlap
            a = slot.offset + lo  # position in the unit's flat buffer
            parts = {MASTER: (source(unit.master), a - unit.shard_lo)}
            if slot.group >= 0:
                seg_lo, _, seg_t = segments[(ui, slot.group)]
                for key, value in opt.state.get(seg_t, {}).items():
                    if isinstance(value, torch.Tensor) and value.numel() == seg_t.numel():
                        parts[key] = (source(value), a - seg_lo)
                    elif isinstance(value, torch.Tensor):
                        scalars[(slot.group, key)] = ScalarSpec(slot.group, key, source(value))
                    elif isinstance(value, (int, float)):
                        scalars[(slot.group, key)] = ScalarSpec(slot.group, key, None, value)
            full = spec.full_shape if spec is not None else tuple(slot.shape)
            ranges.append(RangeSpec(slot.name, full, lo, hi, spec, parts))
    return StateLayout(sources, ranges, [scalars[k] for k in sorted(scalars)])


def shard_from(
    engine: Engine,
    layout: StateLayout,
    copies: list[torch.Tensor],
    sampler: dict[str, Any] | None = None,
    client_state: dict[str, Any] | None = None,
    host: HostState | None = None,
) -> RankShard:
    """The RankShard whose ranges are views of `copies` (host copies of `layout.sources`).

    `host` is the small host-side state (counters, RNG, param groups) taken when the copies
    were; by default it is taken now."""
    host = host or host_state(engine)
    ranges = [
        ParamRange(
            r.name,
            r.shape,
            r.lo,
            r.hi,
            {k: copies[i][o : o + r.hi - r.lo] for k, (i, o) in r.parts.items()},
            tp=r.tp,
        )
        for r in layout.ranges
    ]
    scalars: dict[int, dict[str, float]] = {}
    for sc in layout.scalars:
        value = sc.value if sc.source is None else float(copies[sc.source].reshape(-1)[0])
        scalars.setdefault(sc.group, {})[sc.key] = value
    ctx = engine.ctx
    return RankShard(
        # Global rank and world: every rank of the mesh writes its own file.
        rank=ctx.rank,
        world_size=ctx.world_size,
        zero_stage=engine.plan.stage,
        ranges=ranges,
        tp_size=ctx.tp_size,
        group_scalars=[scalars.get(i, {}) for i in range(host.n_groups)],
        param_groups=host.param_groups,
        engine=host.counters,
        sampler=sampler,
        rng=host.rng,
        client_state=client_state or {},
    )


@dataclass
class HostState:
    """The host-side part of a rank's state (small): taken when the tensors are copied."""

    n_groups: int
    param_groups: list[dict[str, Any]]
    counters: dict[str, Any]
    rng: dict[str, Any]


def host_state(engine: Engine) -> HostState:
    groups = engine.zero.optimizer.param_groups
    return HostState(
        len(groups),
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in groups]),
        copy.deepcopy(engine_counters(engine)),
        rng_state(engine),
    )


def capture(
    engine: Engine,
    sampler: dict[str, Any] | None = None,
    client_state: dict[str, Any] | None = None,
) -> RankShard:
    """This rank's RankShard (tensors copied to CPU: the result is a snapshot).

    Synchronous: the copies are read on the host (a device sync). Each range gets its own
    fp32 tensor, so the shard pickles and saves range by range."""
    engine.wait_for_params()
    layout = state_layout(engine)
    shard = shard_from(engine, layout, layout.sources, sampler, client_state)
    for r in shard.ranges:
        r.tensors = {k: v.float().cpu().clone() for k, v in r.tensors.items()}
    return shard


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
    engine.settle_state()
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

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
from zray.zero.shard_state import (
    elementwise_state,
    group_scalars,
    group_settings,
    load_group_scalars,
    load_group_settings,
    owned_slots,
    state_place,
)

if TYPE_CHECKING:
    from zray.engine import Engine


class RangeReader(Protocol):
    def read(
        self, name: str, lo: int, hi: int, key: str = MASTER, tp: TPSlice | None = None
    ) -> torch.Tensor: ...
    def keys(self, name: str) -> set[str]: ...
    def rank_state(self, rank: int) -> dict[str, Any] | None: ...
    def global_state(self) -> dict[str, Any]: ...


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
    ctx, zero = engine.ctx, engine.zero
    specs = tp_slices(engine.module)
    sources: list[torch.Tensor] = []
    index: dict[int, int] = {}

    def source(t: torch.Tensor) -> int:
        key = id(t)
        if key not in index:
            index[key] = len(sources)
            sources.append(t.detach().reshape(-1))
        return index[key]

    ranges: list[RangeSpec] = []
    for slot in owned_slots(zero, ctx.dp_rank):
        spec = specs.get(slot.name)
        if spec is None and ctx.tp_rank != 0:
            continue
        places = {MASTER: slot.master, **elementwise_state(zero, slot)}
        parts = {k: (source(p.tensor), p.offset) for k, p in places.items()}
        full = spec.full_shape if spec is not None else slot.shape
        ranges.append(RangeSpec(slot.name, full, slot.lo, slot.hi, spec, parts))
    scalars = [
        ScalarSpec(g, k, source(v)) if isinstance(v, torch.Tensor) else ScalarSpec(g, k, None, v)
        for (g, k), v in sorted(group_scalars(zero).items())
    ]
    return StateLayout(sources, ranges, scalars)


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
        tied=tied_names(engine.module),
        rng=host.rng,
        client_state=client_state or {},
    )


def tied_names(module: torch.nn.Module) -> dict[str, str]:
    """Each further name of a parameter that has several -> its first name (the saved one)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


@dataclass
class HostState:
    """The host-side part of a rank's state (small): taken when the tensors are copied."""

    n_groups: int
    param_groups: list[dict[str, Any]]
    counters: dict[str, Any]
    rng: dict[str, Any]


def host_state(engine: Engine) -> HostState:
    settings = group_settings(engine.zero)
    return HostState(
        len(settings),
        copy.deepcopy(settings),
        copy.deepcopy(engine.counters()),
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


def restore(engine: Engine, reader: RangeReader, load_optimizer: bool = True) -> dict[str, Any]:
    """Load the reader's checkpoint into `engine`'s current layout; returns the global state."""
    engine.settle_state()
    ctx, zero = engine.ctx, engine.zero
    specs = tp_slices(engine.module)
    mine = reader.rank_state(ctx.rank) or reader.rank_state(0) or {}
    with torch.no_grad():
        for slot in owned_slots(zero, ctx.dp_rank):
            spec = specs.get(slot.name)
            lo, hi = slot.lo, slot.hi
            slot.master.view(slot.numel).copy_(reader.read(slot.name, lo, hi, MASTER, spec))
            if not load_optimizer or slot.segment is None:
                continue
            for key in sorted(reader.keys(slot.name) - {MASTER}):
                place = state_place(zero, slot, key)
                place.view(slot.numel).copy_(reader.read(slot.name, lo, hi, key, spec))
        if load_optimizer:
            load_group_scalars(zero, mine.get("group_scalars") or [])
            load_group_settings(zero, mine.get("param_groups") or [])
    glob = reader.global_state()
    if glob.get("engine"):
        engine.load_counters(glob["engine"])
    rng = (reader.rank_state(ctx.rank) or {}).get("rng")
    if rng:
        torch.set_rng_state(rng["torch"])
        if ctx.is_cuda and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        random.setstate(rng["python"])
    zero.zero_grad()
    zero.publish_params()
    return glob

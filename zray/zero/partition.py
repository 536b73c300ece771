"""Partition math: how a unit's parameters lie in one flat buffer and which range each rank owns.

A *unit* is a set of parameters flattened into one buffer of `padded_numel` elements. The
buffer is split into `world` equal shards; rank r owns elements [r * S, (r + 1) * S) with
S = `shard_numel`. Parameters are laid out grouped by optimizer param group, so that the part of
each group that falls in one shard is a single contiguous range (a *segment*): the optimizer then
sees one tensor per (unit, group) on each rank, not one per parameter fragment.

Everything here is pure arithmetic on sizes: no tensors, no communication, easy to test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Shards are padded to a multiple of this many elements so that every rank's range starts on a
# 64-byte boundary for fp32 (32 for bf16): vector loads in kernels and NCCL like aligned buffers.
SHARD_ALIGN = 16


@dataclass(frozen=True)
class StagePlan:
    """What each ZeRO stage partitions, decided in one place.

    stage 0: nothing partitioned; gradients all-reduced at the accumulation boundary.
    stage 1: optimizer states and fp32 master weights partitioned; gradients reduce-scattered at
             the boundary (no communication on other micro-steps); parameters all-gathered after
             the step.
    stage 2: gradients partitioned too: each bucket is reduce-scattered as soon as backward has
             produced it, and only the local shard is kept (accumulated in fp32).
    stage 3: parameters partitioned too: gathered per module just before its forward and backward,
             released after use.
    """

    stage: int

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_optimization.stage: got {self.stage}; allowed: 0, 1, 2, 3")

    @property
    def partition_optimizer(self) -> bool:
        return self.stage >= 1

    @property
    def reduce_in_backward(self) -> bool:
        """Gradients leave through per-parameter hooks into buckets while backward runs."""
        return self.stage >= 2

    @property
    def partition_params(self) -> bool:
        return self.stage == 3


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in its unit's flat buffer."""

    name: str
    shape: torch.Size
    offset: int
    numel: int
    group: int  # index of the optimizer param group; -1 for a frozen parameter

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Segment:
    """The part of one optimizer group that falls inside one rank's shard.

    `lo`/`hi` are offsets in the unit's flat buffer; `shard_lo`/`shard_hi` the same range
    relative to the start of the shard.
    """

    group: int
    lo: int
    hi: int
    shard_lo: int
    shard_hi: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class UnitLayout:
    slots: tuple[ParamSlot, ...]
    numel: int
    padded_numel: int
    world: int
    sharded: bool  # False: every rank holds the whole buffer as its "shard" (stage 0)

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world if self.sharded else self.padded_numel

    def shard_range(self, rank: int) -> tuple[int, int]:
        if not self.sharded:
            return 0, self.padded_numel
        s = self.shard_numel
        return rank * s, (rank + 1) * s

    def group_ranges(self) -> dict[int, tuple[int, int]]:
        """Contiguous [lo, hi) of each group in the flat buffer (slots are sorted by group)."""
        out: dict[int, tuple[int, int]] = {}
        for s in self.slots:
            lo, hi = out.get(s.group, (s.offset, s.end))
            out[s.group] = (min(lo, s.offset), max(hi, s.end))
        return out

    def segments(self, rank: int) -> list[Segment]:
        """The trainable groups' parts inside `rank`'s shard, in buffer order."""
        start, end = self.shard_range(rank)
        segs = []
        for group, (lo, hi) in sorted(self.group_ranges().items(), key=lambda kv: kv[1][0]):
            a, b = max(lo, start), min(hi, end)
            if group >= 0 and a < b:
                segs.append(Segment(group, a, b, a - start, b - start))
        return segs

    def slot_overlap(self, slot: ParamSlot, rank: int) -> tuple[int, int] | None:
        """[lo, hi) of `slot` (in slot-local element offsets) that `rank`'s shard holds."""
        start, end = self.shard_range(rank)
        a, b = max(slot.offset, start), min(slot.end, end)
        if a >= b:
            return None
        return a - slot.offset, b - slot.offset


def build_layout(named: list[tuple[str, torch.Size, int]], world: int, sharded: bool) -> UnitLayout:
    """Lay out (name, shape, group) triples, grouped by optimizer group, padded for `world`.

    The order inside a group is the order given (callers pass backward-friendly orders).
    """
    order = sorted(range(len(named)), key=lambda i: (named[i][2] < 0, named[i][2], i))
    slots, offset = [], 0
    for i in order:
        name, shape, group = named[i]
        n = int(torch.Size(shape).numel())
        slots.append(ParamSlot(name, torch.Size(shape), offset, n, group))
        offset += n
    quantum = SHARD_ALIGN * (world if sharded else 1)
    padded = max(quantum, -(-offset // quantum) * quantum)
    return UnitLayout(tuple(slots), offset, padded, world, sharded)

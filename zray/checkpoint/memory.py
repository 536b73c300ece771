"""A checkpoint that never touched disk: RankShards held in memory (the Ray object store).

`MemoryReader` answers the same questions as `CheckpointReader` (the `RangeReader` protocol of
`engine_state.restore`), so a group resized or recovered from in-memory snapshots reshards
onto its new layout exactly as it would from files, tensor-sliced parameters included
(tp_read.py maps a read of one slice layout onto the saved slices).
"""

from __future__ import annotations

from typing import Any

import torch

from zray.checkpoint.shard import MASTER, ParamRange, RankShard
from zray.checkpoint.tp_read import read_mapped
from zray.errors import ZrayError
from zray.parallel.tp_slice import TPSlice


class MemoryCheckpointError(ZrayError):
    pass


class MemoryReader:
    def __init__(self, shards: list[RankShard]) -> None:
        if not shards:
            raise MemoryCheckpointError("no in-memory shards to restore from")
        self.shards = sorted(shards, key=lambda s: s.rank)
        ranks = [s.rank for s in self.shards]
        world = self.shards[0].world_size
        if ranks != list(range(world)):
            raise MemoryCheckpointError(
                f"in-memory snapshot incomplete: ranks {ranks} of a world of {world}"
            )
        steps = {s.engine.get("global_steps") for s in self.shards}
        if len(steps) != 1:
            raise MemoryCheckpointError(f"in-memory shards come from different steps: {steps}")
        self.step = steps.pop()
        self.world_size = world
        self._by_name: dict[str, list[ParamRange]] = {}
        # Ranges by (parameter, saved tp slice or None), and each sliced parameter's layout.
        self._by_slice: dict[tuple[str, int | None], list[ParamRange]] = {}
        self._layouts: dict[str, TPSlice] = {}
        for shard in self.shards:
            for r in shard.ranges:
                self._by_name.setdefault(r.name, []).append(r)
                tp_rank = None if r.tp is None else r.tp.rank
                self._by_slice.setdefault((r.name, tp_rank), []).append(r)
                if r.tp is not None:
                    self._layouts.setdefault(r.name, r.tp)
        for ranges in self._by_slice.values():
            ranges.sort(key=lambda r: r.lo)

    def params(self) -> dict[str, tuple[int, ...]]:
        """{name: whole (full, unsliced) shape}."""
        return {name: ranges[0].shape for name, ranges in self._by_name.items()}

    def keys(self, name: str) -> set[str]:
        ranges = self._by_name.get(name, [])
        if not ranges:
            return set()
        out = set(ranges[0].tensors)
        for r in ranges[1:]:
            out &= set(r.tensors)
        return out

    def read(
        self, name: str, lo: int, hi: int, key: str = MASTER, tp: TPSlice | None = None
    ) -> torch.Tensor:
        """Elements [lo, hi) of `name`'s `key` (of slice `tp` of it, if given), assembled from
        every overlapping range."""
        ranges = self._by_name.get(name)
        if ranges and tp is not None and tp.full_shape != tuple(ranges[0].shape):
            raise MemoryCheckpointError(
                f"{name}: full shape {list(ranges[0].shape)} in memory; the loading model's "
                f"slice is of a {list(tp.full_shape)} tensor"
            )
        return read_mapped(
            self._layouts.get(name),
            tp,
            lo,
            hi,
            lambda t, a, b: self._read_saved(name, t, a, b, key),
        )

    def _read_saved(
        self, name: str, tp_rank: int | None, lo: int, hi: int, key: str
    ) -> torch.Tensor:
        out = torch.empty(hi - lo, dtype=torch.float32)
        covered = 0
        pos = lo
        for r in self._by_slice.get((name, tp_rank), []):
            a, b = max(pos, r.lo), min(hi, r.hi)
            if a >= b or a != pos:
                continue  # not overlapping, or a duplicate copy (stage 0) of what we have
            out[a - lo : b - lo].copy_(r.tensors[key][a - r.lo : b - r.lo])
            covered += b - a
            pos = b
            if pos >= hi:
                break
        if covered != hi - lo:
            raise MemoryCheckpointError(
                f"{name}[{lo}:{hi}] ({key}): only {covered} of {hi - lo} elements in memory"
            )
        return out

    def rank_state(self, rank: int) -> dict[str, Any] | None:
        if rank >= len(self.shards):
            return None
        s = self.shards[rank]
        return {
            "group_scalars": s.group_scalars,
            "param_groups": s.param_groups,
            "rng": s.rng,
            "client_state": s.client_state,
        }

    def global_state(self) -> dict[str, Any]:
        s0 = self.shards[0]
        return {"engine": s0.engine, "sampler": s0.sampler, "tied": s0.tied}

"""A checkpoint that never touched disk: RankShards held in memory (the Ray object store).

`MemoryReader` answers the same questions as `CheckpointReader` (the `RangeReader` protocol of
`engine_state.restore`), so a group resized or recovered from in-memory snapshots reshards
onto its new layout exactly as it would from files.
"""

from __future__ import annotations

from typing import Any

import torch

from zray.checkpoint.shard import MASTER, ParamRange, RankShard
from zray.errors import ZrayError


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
        for shard in self.shards:
            for r in shard.ranges:
                self._by_name.setdefault(r.name, []).append(r)
        for ranges in self._by_name.values():
            ranges.sort(key=lambda r: r.lo)

    def params(self) -> dict[str, tuple[int, ...]]:
        return {name: ranges[0].shape for name, ranges in self._by_name.items()}

    def keys(self, name: str) -> set[str]:
        ranges = self._by_name.get(name, [])
        if not ranges:
            return set()
        out = set(ranges[0].tensors)
        for r in ranges[1:]:
            out &= set(r.tensors)
        return out

    def read(self, name: str, lo: int, hi: int, key: str = MASTER) -> torch.Tensor:
        """Elements [lo, hi) of `name`'s `key`, assembled from every overlapping range."""
        out = torch.empty(hi - lo, dtype=torch.float32)
        covered = 0
        pos = lo
        for r in self._by_name.get(name, []):
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
        return {"engine": self.shards[0].engine, "sampler": self.shards[0].sampler}

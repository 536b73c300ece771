"""The gradient norm for clipping on a data x tensor mesh.

[Note: counting each element once] After tensor slicing a rank's flat gradient buffers hold
two kinds of elements: slices of sliced parameters (each tp rank holds a different part of the
whole) and replicated parameters (every tp rank holds the same values). The whole model's sum
of squares is therefore

    sum over tp of (sliced part) + (replicated part, once)

where each part is first summed over the data-parallel group as without tensor slicing (ZeRO's
shards of one tp rank partition its local buffers). So each rank measures its two parts apart
over ranges of its master-gradient shards, fixed once from the units' layouts (padding, always
zero, is skipped), then: one all-reduce of the pair over dp (stages 1-3; at stage 0 every dp
rank holds the whole reduced gradient), one all-reduce of the sliced part over tp. Every rank
ends with the same number, so clipping (and the fp16 skip) agrees across the mesh. Replicated
elements are the same on every tp rank bit for bit (same inputs, same kernels), so whichever
rank's replicated part is taken gives the same sum. Non-finite values propagate, as in
`ZeroOptimizer.grad_sumsq`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from zray import ops
from zray.parallel.context import ParallelContext
from zray.parallel.tp_layers import tp_slice_of
from zray.zero import comm
from zray.zero.unit import FlatUnit

__all__ = ["MeshGradNorm"]

# [lo, hi) in a unit's master-gradient shard, and whether it holds sliced parameters.
_Range = tuple[int, int, bool]


def _ranges(unit: FlatUnit) -> list[_Range]:
    """The unit's parameter elements inside this rank's shard, as runs of one kind each."""
    lo, hi = unit.shard_lo, unit.shard_hi
    runs: list[_Range] = []
    for slot, p in zip(unit.layout.slots, unit.params, strict=True):
        a, b = max(slot.offset, lo), min(slot.end, hi)
        if a >= b:
            continue
        sliced = tp_slice_of(p) is not None
        if runs and runs[-1][1] == a - lo and runs[-1][2] == sliced:
            runs[-1] = (runs[-1][0], b - lo, sliced)  # merge neighbours: fewer kernel launches
        else:
            runs.append((a - lo, b - lo, sliced))
    return runs


class MeshGradNorm:
    """Sum of squares of the whole model's (summed, unscaled) gradient on a dp x tp mesh."""

    def __init__(self, units: list[FlatUnit], ctx: ParallelContext, partitioned: bool) -> None:
        self.ctx, self.partitioned = ctx, partitioned
        self.ranges = {unit: _ranges(unit) for unit in units}

    def _parts(self, grads: Mapping[FlatUnit, torch.Tensor]) -> torch.Tensor:
        """[sliced, replicated] sums of squares of this rank's shards, fp32 on ctx.device."""
        views: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for unit, g in grads.items():
            for lo, hi, sliced in self.ranges[unit]:
                views[0 if sliced else 1].append(g[lo:hi])
        sums = []
        for vs in views:
            if vs and vs[0].device.type == "cpu":
                # The compiled one-pass kernel, fp64 accumulation (as grad_sumsq does).
                sums.append(torch.tensor(sum(ops.sumsq_nonfinite(v)[0] for v in vs)))
            elif vs:
                norms = torch._foreach_norm(vs, 2, dtype=torch.float32)  # 16-bit grads too
                sums.append(torch.stack(norms).pow(2).sum())
            else:
                sums.append(torch.zeros(()))
        return torch.stack([s.to(self.ctx.device, torch.float32) for s in sums])

    def grad_sumsq(self, grads: Mapping[FlatUnit, torch.Tensor]) -> torch.Tensor:
        """A 1-element fp32 tensor, the same on every rank of the mesh (collective)."""
        parts = self._parts(grads)
        stats = self.ctx.comm_stats
        if self.partitioned:
            comm.all_reduce_sum(parts, self.ctx.dp_group, stats).wait()
        sliced = parts[:1].clone()
        comm.all_reduce_sum(sliced, self.ctx.tp_group, stats).wait()
        return sliced + parts[1:]

"""Collectives on flat buffers, kept apart from the partitioning algorithm.

Every function takes the group explicitly and returns a `Pending` handle (or None when there was
nothing to do: a single process, or a synchronous call). Waiting on a handle makes the *current
stream* wait for the collective on CUDA; it does not block the host, so the step keeps the host
free of syncs. On gloo the collective runs on gloo's own thread and `wait()` blocks until done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zray.parallel.comm_stats import CommStats

# torch 2.13 renamed the flat collectives (*_single); the GPU image carries 2.11, which has only
# the old names. Resolve once here instead of at each call.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Pending:
    """An in-flight collective and the buffers it must keep alive until it completes."""

    work: dist.Work | None
    keep: tuple[torch.Tensor, ...] = ()
    kind: str = ""
    stats: CommStats | None = None

    def wait(self) -> None:
        if self.work is not None:
            t0 = time.perf_counter()
            self.work.wait()
            if self.stats is not None:
                self.stats.waited(self.kind, time.perf_counter() - t0)
            self.work = None
        self.keep = ()


def _active(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def all_reduce_sum(
    buf: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats | None = None
) -> Pending:
    """In-place sum of `buf` over `group` (stage 0 gradients; the step's tiny norm tensor)."""
    if not _active(group):
        return Pending(None)
    if stats is not None:
        stats.launched("all_reduce", buf)
    work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return Pending(work, (buf,), "all_reduce", stats)


def reduce_scatter_sum(
    out: torch.Tensor,
    inp: torch.Tensor,
    group: dist.ProcessGroup | None,
    stats: CommStats | None = None,
) -> Pending:
    """out[S] = sum over ranks of inp[rank * S:(rank + 1) * S]; inp is [world * S]."""
    if not _active(group):
        out.copy_(inp[: out.numel()])
        return Pending(None)
    if stats is not None:
        stats.launched("reduce_scatter", inp)
    work = _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return Pending(work, (out, inp), "reduce_scatter", stats)


def all_gather_flat(
    full: torch.Tensor,
    shard: torch.Tensor,
    group: dist.ProcessGroup | None,
    stats: CommStats | None = None,
) -> Pending:
    """full[world * S] = concatenation of every rank's shard[S].

    `shard` may be a view of `full` (the rank's own range): NCCL then gathers in place.
    """
    if not _active(group):
        if shard.data_ptr() != full.data_ptr():
            full[: shard.numel()].copy_(shard)
        return Pending(None)
    if stats is not None:
        stats.launched("all_gather", shard)
    work = _all_gather(full, shard, group=group, async_op=True)
    return Pending(work, (full, shard), "all_gather", stats)


def broadcast(buf: torch.Tensor, src: int, group: dist.ProcessGroup | None) -> None:
    """Synchronous broadcast from group rank `src` (used outside the step only)."""
    if _active(group):
        dist.broadcast(buf, src=dist.get_global_rank(group, src), group=group)


def barrier(group: dist.ProcessGroup | None) -> None:
    if _active(group):
        dist.barrier(group=group)

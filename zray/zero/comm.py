"""Collectives on flat buffers, kept apart from the partitioning algorithm.

Every function takes the group explicitly and returns a `Pending` handle (or None when there was
nothing to do: a single process, or a synchronous call). Waiting on a handle makes the *current
stream* wait for the collective on CUDA; it does not block the host, so the step keeps the host
free of syncs. On gloo the collective runs on gloo's own thread and `wait()` blocks until done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat collectives (*_single); the GPU image carries 2.11, which has only
# the old names. Resolve once here instead of at each call.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Pending:
    """An in-flight collective and the buffers it must keep alive until it completes."""

    work: dist.Work | None
    keep: tuple[torch.Tensor, ...] = ()

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        self.keep = ()


def _active(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def all_reduce_sum(buf: torch.Tensor, group: dist.ProcessGroup | None) -> Pending:
    """In-place sum of `buf` over `group` (stage 0 gradients; the step's tiny norm tensor)."""
    if not _active(group):
        return Pending(None)
    return Pending(dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True), (buf,))


def reduce_scatter_sum(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None
) -> Pending:
    """out[S] = sum over ranks of inp[rank * S:(rank + 1) * S]; inp is [world * S]."""
    if not _active(group):
        out.copy_(inp[: out.numel()])
        return Pending(None)
    work = _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return Pending(work, (out, inp))


def all_gather_flat(
    full: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup | None
) -> Pending:
    """full[world * S] = concatenation of every rank's shard[S].

    `shard` may be a view of `full` (the rank's own range): NCCL then gathers in place.
    """
    if not _active(group):
        if shard.data_ptr() != full.data_ptr():
            full[: shard.numel()].copy_(shard)
        return Pending(None)
    work = _all_gather(full, shard, group=group, async_op=True)
    return Pending(work, (full, shard))


def broadcast(buf: torch.Tensor, src: int, group: dist.ProcessGroup | None) -> None:
    """Synchronous broadcast from group rank `src` (used outside the step only)."""
    if _active(group):
        dist.broadcast(buf, src=dist.get_global_rank(group, src), group=group)


def barrier(group: dist.ProcessGroup | None) -> None:
    if _active(group):
        dist.barrier(group=group)

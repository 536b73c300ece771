"""The communication of tensor slicing: Megatron's conjugate autograd operations.

Shapes in comments: B batch, T sequence, D model width, V vocabulary, tp the tensor-parallel
group's size, N = B * T tokens.

[Note: the conjugate pair] A column-parallel layer reads a replicated input x and writes a
slice of the output; its input gradient is only this rank's part of the sum over output slices,
so the gradient must be all-reduced where x enters the parallel region (`copy_to_tp`: identity
forward, all-reduce backward). A row-parallel layer writes partial products that are summed
where the region ends (`reduce_from_tp`: all-reduce forward, identity backward, since each rank
already holds the whole, replicated output gradient). One block (attention or MLP) thus costs one
all-reduce of [B, T, D] forward and one backward, and everything outside the regions (norms,
residuals, embeddings of positions) stays replicated, computing identical values and identical
gradients on every rank of the group.

[Note: groups] Every function takes the tensor-parallel group explicitly. `None` (or a group of
one) means "no tensor slicing": the operations are then the identity and launch nothing, so
single-process code need not special-case them. This `None` is not torch.distributed's "default
group": zray never reduces over the world by accident.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "PlanningGroup",
    "copy_to_tp",
    "gather_from_tp",
    "reduce_from_tp",
    "scatter_to_tp",
    "tp_rank",
    "tp_size",
    "vocab_parallel_cross_entropy",
]


class PlanningGroup:
    """Stands in for a tensor group of `size` where no process group exists, as its rank 0: to
    check that a model can be sliced (on the meta device, before any worker starts). Slicing
    runs no collective; a forward on such a model would, and fails."""

    def __init__(self, size: int) -> None:
        self.size = size


Group = dist.ProcessGroup | PlanningGroup | None


def tp_size(group: Group) -> int:
    """Size of the tensor-parallel group; 1 for None."""
    if isinstance(group, PlanningGroup):
        return group.size
    return 1 if group is None else dist.get_world_size(group=group)


def tp_rank(group: Group) -> int:
    """This process's rank inside the tensor-parallel group; 0 for None."""
    if isinstance(group, PlanningGroup):
        return 0
    return 0 if group is None else dist.get_rank(group=group)


def _all_reduce(
    x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    if tp_size(group) == 1:
        return x
    # A fresh contiguous buffer: the caller's tensor may be saved for backward or be a view.
    # Costs one copy of x; the collective moves 2 * (tp - 1) / tp * bytes(x) per rank (ring).
    out = x.contiguous().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    # [..., n, ...] on each rank -> [..., tp * n, ...] ordered by group rank.
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _own_chunk(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    size = tp_size(group)
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"scatter_to_tp: dimension {dim} of a tensor of shape {list(x.shape)} is not "
            f"divisible by the tensor-parallel size {size}"
        )
    return x.chunk(size, dim=dim)[tp_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _own_chunk(grad, ctx.group, ctx.dim), None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _own_chunk(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_gather(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward. Enters a parallel region."""
    if tp_size(group) == 1:
        return x
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward. Leaves a parallel region."""
    if tp_size(group) == 1:
        return x
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's slice along `dim` (rank order); backward keeps this rank's part."""
    if tp_size(group) == 1:
        return x
    return _GatherFromTP.apply(x, group, dim)


def scatter_to_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """This rank's equal chunk of a replicated x along `dim`; backward all-gathers the gradient."""
    if tp_size(group) == 1:
        return x
    return _ScatterToTP.apply(x, group, dim)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the non-ignored tokens, the vocabulary split across the group.

    Each rank holds logits [N, V/tp] for the vocabulary rows [start, start + V/tp). The full
    [N, V] logits are never built: three per-token quantities are reduced instead, [N] each.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        group: Group,
        start: int,
        ignore_index: int,
    ) -> torch.Tensor:
        # fp32 for the softmax, as the unsliced model does: the log-sum-exp over V terms loses
        # low bits in half precision. Costs an fp32 copy of the local logits, [N, V/tp].
        x = logits.float().reshape(-1, logits.shape[-1])  # [N, V/tp]
        labels = labels.reshape(-1)  # [N]
        v_local = x.shape[1]
        # 1) max over the whole vocabulary, for a stable exp: all-reduce MAX of [N].
        #    Detached: the softmax does not depend on the shift, so no gradient flows through it.
        x = x - _all_reduce(x.max(dim=1).values, group, dist.ReduceOp.MAX).unsqueeze(1)
        exp = x.exp()  # [N, V/tp]
        # 2) the target's (shifted) logit lives on exactly one rank; the others contribute 0.
        local = labels - start
        owned = (local >= 0) & (local < v_local) & (labels != ignore_index)  # [N]
        local = torch.where(owned, local, torch.zeros_like(local))
        target = x.gather(1, local.unsqueeze(1)).squeeze(1) * owned  # [N]
        # Sum of exp and target logit reduced together: one all-reduce of [2, N], not two.
        sums = _all_reduce(torch.stack([exp.sum(dim=1), target]), group)
        sum_exp, target = sums[0], sums[1]
        valid = labels != ignore_index  # [N]
        # Mean over non-ignored tokens, like F.cross_entropy(reduction="mean"): 0 / 0 = nan
        # when every label is ignored, as there. No host sync: the count stays a tensor.
        count = valid.sum().to(x.dtype)
        loss = ((sum_exp.log() - target) * valid).sum() / count
        exp.div_(sum_exp.unsqueeze(1))  # now this rank's part of the softmax, [N, V/tp]
        ctx.save_for_backward(exp, local, owned, valid, count)
        ctx.logits_meta = (logits.shape, logits.dtype)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # d loss / d logit = (softmax - onehot(target)) / count on valid tokens: purely local,
        # no communication (the softmax's normaliser came from the forward's reductions).
        if ctx.consumed:
            raise RuntimeError(
                "vocab_parallel_cross_entropy: backward ran twice through one forward "
                "(retain_graph); its saved softmax is reused in place to save [N, V/tp] floats"
            )
        ctx.consumed = True
        softmax, local, owned, valid, count = ctx.saved_tensors
        g = softmax  # reused in place: no second [N, V/tp] fp32 buffer
        g[torch.arange(g.shape[0], device=g.device), local] -= owned.to(g.dtype)
        g.mul_((valid.to(g.dtype) * (grad / count)).unsqueeze(1))
        shape, dtype = ctx.logits_meta
        return g.view(shape).to(dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor,
    labels: torch.Tensor,
    group: Group,
    rank: int,
    size: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Exact mean cross-entropy of vocabulary-sliced logits, without gathering them.

    logits_local: [..., V/size], this rank's vocabulary rows [rank * V/size, (rank + 1) * V/size)
    (the output of a column-parallel lm_head); labels: [...] ids into the full vocabulary, entries
    equal to `ignore_index` are left out of the mean. Returns the fp32 scalar every rank of the
    group agrees on. Costs three all-reduces of [N] (max; sum of exp and target logit together).
    """
    if logits_local.shape[:-1] != labels.shape:
        raise ValueError(
            f"vocab_parallel_cross_entropy: logits {list(logits_local.shape)} and labels "
            f"{list(labels.shape)} disagree (expected logits [..., V/tp] over labels [...])"
        )
    if (size, rank) != (tp_size(group), tp_rank(group)):
        raise ValueError(
            f"vocab_parallel_cross_entropy: got rank {rank} of size {size}, but this process is "
            f"rank {tp_rank(group)} of a group of {tp_size(group)}"
        )
    start = rank * logits_local.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits_local, labels, group, start, ignore_index)

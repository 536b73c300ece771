"""Tensor slicing (Megatron-style tensor parallelism): the public face, and what the engine needs.

The pieces live beside this file: `tp_ops` (the conjugate autograd operations and the
vocabulary-parallel cross-entropy), `tp_layers` (sliced layers and the `TPSlice` marker),
`tp_policy` (`apply_tensor_parallel`, which slices a model found by structure), `tp_gpt` (zray's
GPT's own forwards on local heads and local logits). This module re-exports them and adds the three things a data x tensor mesh needs from them: the gradient
norm over sliced and replicated parameters, and the mapping of sliced parameters to and from
their full tensors for checkpoints.

[Note: combining with ZeRO on a dp x tp mesh] After slicing, each rank's local parameters are an
ordinary model to ZeRO over the data-parallel group: ranks with the same tp rank hold the same
slices, so partitioning and reduce-scatter run over the dp group only (never across tp ranks,
whose slices differ). Replicated parameters (no marker) get identical gradients on every rank
of a tp group by construction, so nothing is reduced over tp for them. The gradient norm must
count each sliced element once and each replicated element once: `tp_grad_norm` (sum of squares
of slices all-reduced over tp, replicated ones added once); with ZeRO the dp partial sums are
all-reduced over dp first. Checkpoints: the engine's sharded checkpoints save each rank's slices
with their `TPSlice` and readers map them onto any other tp size (zray/checkpoint/tp_read.py);
for plain state dicts, `full_state_dict` gathers slices into full tensors and
`local_state_dict` cuts a full state dict for this rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from zray.parallel.tp_gpt import ParallelCausalSelfAttention, TensorParallelGPT
from zray.parallel.tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPSlice,
    VocabParallelEmbedding,
    tp_slice_of,
    tp_slices,
)
from zray.parallel.tp_ops import (
    Group,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    scatter_to_tp,
    tp_rank,
    tp_size,
    vocab_parallel_cross_entropy,
)
from zray.parallel.tp_policy import apply_tensor_parallel

__all__ = [
    "ColumnParallelLinear",
    "ParallelCausalSelfAttention",
    "RowParallelLinear",
    "TPSlice",
    "TensorParallelGPT",
    "VocabParallelEmbedding",
    "apply_tensor_parallel",
    "clip_tp_grad_norm_",
    "copy_to_tp",
    "full_state_dict",
    "gather_from_tp",
    "gather_tp_tensor",
    "local_state_dict",
    "reduce_from_tp",
    "scatter_to_tp",
    "tp_grad_norm",
    "tp_rank",
    "tp_size",
    "tp_slice_of",
    "tp_slices",
    "vocab_parallel_cross_entropy",
]


def gather_tp_tensor(local: torch.Tensor, spec: TPSlice, group: Group) -> torch.Tensor:
    """The full tensor from every rank's slice `local` (collective: every rank of group calls it).

    Costs an all-gather of the full tensor's bytes; every rank receives the whole.
    """
    if tp_size(group) != spec.size:
        raise ValueError(f"gather_tp_tensor: slice of size {spec.size}, group of {tp_size(group)}")
    if spec.size == 1:
        return local.detach().clone()
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(spec.size)]
    dist.all_gather(parts, local, group=group)
    return spec.assemble(parts)


def full_state_dict(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """model.state_dict() with every sliced entry gathered to its full shape (collective).

    The keys are those of the unsliced model (the sliced modules keep their names), so the
    result loads into it, or into `local_state_dict` for any other tp size.
    """
    specs = tp_slices(model)
    return {
        k: gather_tp_tensor(v, specs[k], group) if k in specs else v.detach().clone()
        for k, v in model.state_dict().items()
    }


def local_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's slices of a full (unsliced) state dict, ready for model.load_state_dict."""
    specs = tp_slices(model)
    return {k: specs[k].take(v) if k in specs else v for k, v in full.items()}


def tp_grad_norm(
    parameters: Iterable[torch.Tensor], group: Group, norm_type: float = 2.0
) -> torch.Tensor:
    """The norm of the whole model's gradient, each element counted once (collective over tp).

    Sliced gradients: partial sums of |g|^p all-reduced over the group. Replicated gradients
    are the same on every rank: counted once, locally. Equals torch.nn.utils.clip_grad_norm_'s
    norm on the unsliced model. Returns an fp32 scalar tensor (no host sync).
    """
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"tp_grad_norm norm_type: got {norm_type!r}; allowed: 2.0, inf")
    seen: set[int] = set()
    sliced, replicated = [], []
    for p in parameters:
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))  # a tied parameter is one parameter
        (sliced if tp_slice_of(p) is not None else replicated).append(p.grad.detach().float())
    grads = sliced + replicated
    zero = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    if norm_type == math.inf:
        part = torch.stack([g.abs().max() for g in sliced]).max() if sliced else zero
        rest = torch.stack([g.abs().max() for g in replicated]).max() if replicated else zero
        if tp_size(group) > 1:
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)
        return torch.maximum(part, rest)
    part = torch.stack([g.square().sum() for g in sliced]).sum() if sliced else zero
    rest = torch.stack([g.square().sum() for g in replicated]).sum() if replicated else zero
    if tp_size(group) > 1:
        dist.all_reduce(part, group=group)
    return (part + rest).sqrt()


def clip_tp_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, group: Group, norm_type: float = 2.0
) -> torch.Tensor:
    """clip_grad_norm_ for a tensor-sliced model: same formula as torch's, on `tp_grad_norm`."""
    params = list(parameters)
    total = tp_grad_norm(params, group, norm_type)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    seen: set[int] = set()
    for p in params:
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            p.grad.detach().mul_(scale.to(p.grad.dtype))
    return total

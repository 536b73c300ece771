"""zray's own GPT on a tensor-parallel group: its attention on local heads, its loss on local logits.

The policy (`tp_policy`) keeps other models' forwards and only slices their layers; zray's GPT
gets two forwards of its own: a fused attention whose head count becomes local, and a loss taken
by `vocab_parallel_cross_entropy` on [B, T, V/tp] logits, so the full logits never exist.
"""

from __future__ import annotations

import torch
from torch import nn

from zray.models.gpt import (
    GPT,
    IGNORE_INDEX,
    CausalSelfAttention,
    attend,
    next_token_targets,
)
from zray.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear
from zray.parallel.tp_ops import Group, gather_from_tp, vocab_parallel_cross_entropy

__all__ = ["ParallelCausalSelfAttention", "TensorParallelGPT"]


class ParallelCausalSelfAttention(nn.Module):
    """zray GPT's causal self-attention on this rank's H/tp heads: [B, T, D] -> [B, T, D].

    Same child names as the module it replaces (qkv, proj), so state-dict keys do not change.
    """

    def __init__(
        self, source: CausalSelfAttention, group: Group, rank: int, size: int, name: str
    ) -> None:
        super().__init__()
        if source.n_head % size != 0:
            raise ValueError(
                f"attention {name!r}: n_head {source.n_head} is not divisible by the "
                f"tensor-parallel size {size}"
            )
        self.n_head = source.n_head // size  # local heads
        self.head_dim = source.qkv.in_features // source.n_head
        self.dropout = source.dropout
        # [D] -> [3 * D/tp]: this rank's heads of q, then of k, then of v.
        self.qkv = ColumnParallelLinear.from_linear(
            source.qkv, group, rank, size, parts=3, name=f"{name}.qkv"
        )
        # [D/tp] (this rank's heads' outputs) -> [D], summed over the group.
        self.proj = RowParallelLinear.from_linear(
            source.proj, group, rank, size, name=f"{name}.proj"
        )
        self.resid_drop = source.resid_drop

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        d_local = self.n_head * self.head_dim
        # [B, T, 3 D/tp] -> 3 x [B, T, D/tp] -> [B, H/tp, T, Dh]
        q, k, v = self.qkv(x).split(d_local, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        # Heads are independent: each rank's 4*B*T*T*D/tp FLOPs need no communication.
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, d_local)  # [B, T, D/tp]
        return self.resid_drop(self.proj(y))


class TensorParallelGPT(GPT):
    """zray's GPT after `apply_tensor_parallel`: the loss comes from vocabulary-sliced logits.

    GPT.forward with the head's last lines changed: the trunk is GPT.hidden.
    """

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        head: ColumnParallelLinear = self.lm_head
        # The trunk is replicated over the tensor group; the head's output is [B, T, V/tp].
        logits = head(self.hidden(input_ids, attention_mask))  # 2*B*T*D*V/tp FLOPs
        if labels is None:
            return gather_from_tp(logits, head.group, dim=-1)  # [B, T, V], for inference
        return vocab_parallel_cross_entropy(
            logits,
            next_token_targets(labels),
            head.group,
            head.spec.rank,
            head.spec.size,
            IGNORE_INDEX,
        )

"""Layers that hold one rank's slice of a weight, built from the whole layer.

A model is built whole (same seed on every rank, so identical weights), then each rank replaces
its large layers by these, keeping only its part: a model bigger than one device's memory would
be built on the meta device and materialised slice by slice instead (not done here yet).

[Note: the `_zray_tp` marker] Every sliced parameter carries `p._zray_tp = TPSlice(...)`, a plain
Python attribute saying along which dimension it was cut, into how many parts, which part this
rank holds and the full shape. Parameters without it are replicated: identical on every rank of
the group, with identical gradients. The engine reads the markers to tell the two apart (gradient
norm, checkpoints); `TPSlice.take` maps a full tensor to this rank's slice (loading) and
`TPSlice.assemble` maps every rank's slices back to the full tensor (saving). The attribute
survives pickling but not `copy.deepcopy` of a Parameter (torch copies the data only): read the
markers by name with `tp_slices(model)` before copying.

Shapes: D model width, V vocabulary, tp the group size; [out, in] is nn.Linear's weight layout,
[in, out] that of Hugging Face's Conv1D (GPT-2), which the linear layers also take
(`from_conv1d`): the weight keeps its layout, so the state dict keeps its shapes and keys, and
only the sliced dimension changes (0 <-> 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zray.parallel.tp_ops import (
    Group,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    scatter_to_tp,
    tp_rank,
    tp_size,
)
from zray.parallel.tp_slice import TPSlice

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TPSlice",
    "VocabParallelEmbedding",
    "tp_slice_of",
    "tp_slices",
]

MARKER = "_zray_tp"


def tp_slice_of(p: torch.Tensor) -> TPSlice | None:
    """The marker of a sliced parameter, None for a replicated one."""
    return getattr(p, MARKER, None)


def tp_slices(model: nn.Module) -> dict[str, TPSlice]:
    """Markers by parameter name (every name of a tied parameter), for the sliced ones only."""
    return {
        n: s
        for n, p in model.named_parameters(remove_duplicate=False)
        if (s := tp_slice_of(p)) is not None
    }


def check_group(group: Group, rank: int, size: int, who: str) -> None:
    """The explicit rank and size must describe this process's place in `group`."""
    if not isinstance(size, int) or size < 1 or not 0 <= rank < size:
        raise ValueError(f"{who}: got rank {rank} of tensor-parallel size {size}")
    if group is None:
        if size != 1:
            raise ValueError(f"{who}: tensor-parallel size {size} needs a process group, got None")
        return
    if (rank, size) != (tp_rank(group), tp_size(group)):
        raise ValueError(
            f"{who}: got rank {rank} of size {size}, but this process is rank "
            f"{tp_rank(group)} of a tensor-parallel group of {tp_size(group)}"
        )


def _conv1d_as_linear(conv: nn.Module, who: str) -> tuple[nn.Parameter, nn.Parameter | None]:
    """Weight [in, out] and bias [out] of a Hugging Face Conv1D (y = x W + b), checked."""
    w, b = conv.weight, getattr(conv, "bias", None)
    nx, nf = getattr(conv, "nx", None), getattr(conv, "nf", None)
    if w.dim() != 2 or (nx, nf) != tuple(w.shape) or (b is not None and tuple(b.shape) != (nf,)):
        raise ValueError(
            f"{who}: expected a Conv1D with weight [nx, nf] and bias [nf]; got nx={nx}, nf={nf}, "
            f"weight {list(w.shape)}, bias {None if b is None else list(b.shape)}"
        )
    return w, b


def _slice_param(
    full: torch.Tensor, dim: int, rank: int, size: int, parts: int, who: str, what: str
) -> nn.Parameter:
    n = full.shape[dim]
    if n % (parts * size) != 0:
        each = f" ({parts} fused parts of {n // parts})" if parts > 1 else ""
        raise ValueError(
            f"{who}: {what} {n}{each} (dimension {dim} of its weight {list(full.shape)}) is not "
            f"divisible by the tensor-parallel size {size}"
        )
    spec = TPSlice(dim=dim, size=size, rank=rank, full_shape=tuple(full.shape), parts=parts)
    p = nn.Parameter(spec.take(full.detach()).clone(), requires_grad=full.requires_grad)
    setattr(p, MARKER, spec)
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows cut across the group: [B, T, in] -> [B, T, out/tp].

    The input is replicated; the output is this rank's slice (or, with `gather_output`, the whole
    [B, T, out], at the cost of an all-gather). `parts` > 1 slices a fused projection block by
    block (fused [q; k; v]: parts=3), so the local output is this rank's piece of each part.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        group: Group,
        gather_output: bool = False,
        weight_in_out: bool = False,
    ) -> None:
        super().__init__()
        self.weight = weight  # [out/tp, in] ([in, out/tp] with weight_in_out), marked
        self.bias = bias  # [out/tp] or None, marked
        self.group = group
        self.gather_output = gather_output
        self.weight_in_out = weight_in_out
        self.spec: TPSlice = tp_slice_of(weight)
        out_dim = 1 if weight_in_out else 0
        self.in_features = weight.shape[1 - out_dim]
        self.out_features = self.spec.full_shape[out_dim]

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group: Group,
        rank: int,
        size: int,
        gather_output: bool = False,
        parts: int = 1,
        name: str = "Linear",
    ) -> ColumnParallelLinear:
        who = f"ColumnParallelLinear {name!r}"
        w = _slice_param(linear.weight, 0, rank, size, parts, who, "out_features")
        b = None
        if linear.bias is not None:
            b = _slice_param(linear.bias, 0, rank, size, parts, who, "bias length")
        check_group(group, rank, size, who)
        return cls(w, b, group, gather_output)

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Module,
        group: Group,
        rank: int,
        size: int,
        gather_output: bool = False,
        parts: int = 1,
        name: str = "Conv1D",
    ) -> ColumnParallelLinear:
        """From a Hugging Face Conv1D (weight [in, out]): its columns are the output features."""
        who = f"ColumnParallelLinear {name!r}"
        weight, bias = _conv1d_as_linear(conv, who)
        w = _slice_param(weight, 1, rank, size, parts, who, "nf (output features)")
        b = None if bias is None else _slice_param(bias, 0, rank, size, parts, who, "bias length")
        check_group(group, rank, size, who)
        return cls(w, b, group, gather_output, weight_in_out=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, in] replicated -> [B, T, out/tp]; the input gradient is summed over the group.
        w = self.weight.t() if self.weight_in_out else self.weight  # [out/tp, in], a view
        y = F.linear(copy_to_tp(x, self.group), w, self.bias)
        if not self.gather_output:
            return y
        y = gather_from_tp(y, self.group, dim=-1)  # [B, T, out], ordered rank by rank
        if self.spec.parts > 1:
            # Rank-major [r0: q0 k0 v0 | r1: q1 k1 v1] -> part-major [q | k | v], the full order.
            lead = y.shape[:-1]
            y = y.view(*lead, self.spec.size, self.spec.parts, -1).transpose(-3, -2)
            y = y.reshape(*lead, self.out_features)
        return y

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {s.local_shape[s.dim]}, rank {s.rank} of {s.size}, parts {s.parts}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, "
            f"weight_in_out={self.weight_in_out}"
        )


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns cut across the group: [B, T, in/tp] -> [B, T, out].

    Each rank's partial product [B, T, out] is summed over the group (one all-reduce), then the
    bias, kept whole and replicated (adding it on every rank before the sum would count it tp
    times), is added once.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        group: Group,
        input_is_parallel: bool = True,
        weight_in_out: bool = False,
    ) -> None:
        super().__init__()
        self.weight = weight  # [out, in/tp] ([in/tp, out] with weight_in_out), marked
        self.bias = bias  # [out] or None, replicated (no marker)
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.weight_in_out = weight_in_out
        self.spec: TPSlice = tp_slice_of(weight)
        in_dim = 0 if weight_in_out else 1
        self.in_features = self.spec.full_shape[in_dim]
        self.out_features = weight.shape[1 - in_dim]

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group: Group,
        rank: int,
        size: int,
        input_is_parallel: bool = True,
        name: str = "Linear",
    ) -> RowParallelLinear:
        who = f"RowParallelLinear {name!r}"
        w = _slice_param(linear.weight, 1, rank, size, 1, who, "in_features")
        b = None
        if linear.bias is not None:
            b = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        check_group(group, rank, size, who)
        return cls(w, b, group, input_is_parallel)

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Module,
        group: Group,
        rank: int,
        size: int,
        input_is_parallel: bool = True,
        name: str = "Conv1D",
    ) -> RowParallelLinear:
        """From a Hugging Face Conv1D (weight [in, out]): its rows are the input features."""
        who = f"RowParallelLinear {name!r}"
        weight, bias = _conv1d_as_linear(conv, who)
        w = _slice_param(weight, 0, rank, size, 1, who, "nx (input features)")
        b = None
        if bias is not None:
            b = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        check_group(group, rank, size, who)
        return cls(w, b, group, input_is_parallel, weight_in_out=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group, dim=-1)  # [B, T, in] -> [B, T, in/tp]
        # [B, T, in/tp] -> partial [B, T, out] -> summed [B, T, out], replicated.
        w = self.weight.t() if self.weight_in_out else self.weight  # [out, in/tp], a view
        y = reduce_from_tp(F.linear(x, w), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features} (local {s.local_shape[s.dim]}, rank {s.rank} of "
            f"{s.size}), out_features={self.out_features}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, weight_in_out={self.weight_in_out}"
        )


class VocabParallelEmbedding(nn.Module):
    """An embedding table [V, D] cut by vocabulary rows: each rank holds [V/tp, D].

    Ids outside this rank's rows look up zeros; the all-reduce then gives every rank the whole
    [B, T, D] (each id found on exactly one rank). Backward needs no communication: each rank's
    rows get the gradient of the ids it owns.
    """

    def __init__(self, weight: nn.Parameter, group: Group, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight = weight  # [V/tp, D], marked
        self.group = group
        self.spec: TPSlice = tp_slice_of(weight)
        self.num_embeddings, self.embedding_dim = self.spec.full_shape
        self.start = self.spec.rank * weight.shape[0]
        self.end = self.start + weight.shape[0]
        self.padding_idx = padding_idx  # full-vocabulary id, or None

    @classmethod
    def from_embedding(
        cls, emb: nn.Embedding, group: Group, rank: int, size: int, name: str = "Embedding"
    ) -> VocabParallelEmbedding:
        who = f"VocabParallelEmbedding {name!r}"
        if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
            raise ValueError(
                f"{who}: max_norm, scale_grad_by_freq and sparse need the whole vocabulary; got "
                f"max_norm={emb.max_norm}, scale_grad_by_freq={emb.scale_grad_by_freq}, "
                f"sparse={emb.sparse}"
            )
        w = _slice_param(emb.weight, 0, rank, size, 1, who, "num_embeddings")
        check_group(group, rank, size, who)
        return cls(w, group, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids [B, T] over the full vocabulary -> [B, T, D].
        outside = (ids < self.start) | (ids >= self.end)
        local = torch.where(outside, torch.zeros_like(ids), ids - self.start)
        pad = self.padding_idx
        local_pad = pad - self.start if pad is not None and self.start <= pad < self.end else None
        out = F.embedding(local, self.weight, padding_idx=local_pad)  # [B, T, D]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim} (rows {self.start}:{self.end}, "
            f"rank {self.spec.rank} of {self.spec.size})"
        )

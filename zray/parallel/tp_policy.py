"""The automatic slicing policy: find transformer blocks by structure and slice them in place.

[Note: what is sliced] In every block: the attention's q, k, v projections by columns (output
features; a fused [q; k; v] projection part by part, so each rank keeps whole heads) and its
output projection by rows (input features); the MLP's up (and gate) projections by columns and
its down projection by rows. Outside the blocks: the token embedding by vocabulary rows and the
output head by vocabulary rows (column-parallel), sharing one sliced parameter when they are
tied. Everything else (norms, position embeddings, the row-parallel biases) stays replicated.

The embedding and head are sliced rather than replicated because they are the one place where
a single matrix is large whatever the depth (V x D: 67M parameters of zray's 1.3B GPT) and
because the [B, T, V] logits are the largest activation: with zray's GPT the loss is then taken
by `vocab_parallel_cross_entropy` on the [B, T, V/tp] local logits and the full logits never
exist (`tp_gpt`). Other models keep their own forward and loss; their head gathers the logits.

[Note: structure, not names] A projection is an nn.Linear or a Hugging Face Conv1D (GPT-2's
layer, weight stored [in, out]: sliced along the other dimension, its layout kept). A block is
a module with an attention child and an MLP child. Attention: a fused projection D -> 3D next
to a projection D -> D, or four projections named like q/k/v/o (Llama-style, grouped-query
allowed). MLP: two projections D -> H -> D, or three (gate, up: D -> H; down: H -> D), and no
other parameters (a norm over H would need the whole hidden vector); the ops between the up and
down projections must be elementwise, as in every standard MLP.

Attention forwards stay the model's own except zray's fused one (replaced, `tp_gpt`), so they
must run on local heads once their head-count attributes are made local:
- separate q/k/v (Hugging Face Llama): the forward views [B, T, -1, head_dim], inferring the
  head count from the shapes, or reads a head-count attribute, which is divided by tp;
  `num_key_value_groups` (H / H_kv) is unchanged, and rank r's q heads are exactly those that
  read its k/v heads, since both are cut in tp contiguous blocks.
- fused with a `split_size` attribute (Hugging Face GPT-2): the forward splits its [3D]
  output by `split_size` and views heads of `head_dim`; `split_size`, `num_heads` and
  `embed_dim` become D/tp, H/tp, D/tp.
Any other fused forward is refused: zray cannot know where it assumes the whole width.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

from zray.models.gpt import GPT, CausalSelfAttention
from zray.parallel.tp_gpt import ParallelCausalSelfAttention, TensorParallelGPT
from zray.parallel.tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_group,
)
from zray.parallel.tp_ops import Group, PlanningGroup

__all__ = ["apply_tensor_parallel", "check_slicing"]

_HEADS = ("n_head", "num_heads", "n_heads", "num_attention_heads")
_KV_HEADS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head")
_Q, _K, _V = ("q_proj", "wq", "query"), ("k_proj", "wk", "key"), ("v_proj", "wv", "value")
_O = ("o_proj", "wo", "out_proj", "dense")
# Width attributes a fused split_size-style forward may read, made local with the heads.
_FUSED_WIDTHS = ("split_size", "embed_dim")


@dataclass(frozen=True)
class _Proj:
    """A projection layer as the policy sees it: y = x W (+ b), [.., in] -> [.., out]."""

    in_features: int
    out_features: int
    conv1d: bool  # Hugging Face Conv1D: weight [in, out] (else nn.Linear: [out, in])


def _is_hf_conv1d(m: nn.Module) -> bool:
    # Only a model built with transformers can hold one, so transformers is already imported
    # then: looking in sys.modules avoids importing it (seconds) for every other model.
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and type(m) is conv1d


def _as_proj(m: nn.Module) -> _Proj | None:
    if type(m) is nn.Linear:
        return _Proj(m.in_features, m.out_features, False)
    if _is_hf_conv1d(m):
        return _Proj(m.weight.shape[0], m.weight.shape[1], True)
    return None


def _projs(m: nn.Module) -> dict[str, _Proj]:
    return {n: p for n, c in m.named_children() if (p := _as_proj(c)) is not None}


@dataclass
class _Attention:
    name: str
    fused: bool
    proj_names: tuple[str, ...]  # fused: (qkv, out); separate: (q, k, v, o)


@dataclass
class _MLP:
    name: str
    up: tuple[str, ...]  # column-parallel (fc; or gate and up)
    down: str  # row-parallel


def _int_attr(m: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first of `names` that `m` has as an int attribute."""
    return next((n for n in names if type(getattr(m, n, None)) is int), None)


def _match_attention(name: str, m: nn.Module) -> _Attention | None:
    projs = _projs(m)
    if len(projs) == 2:
        (a, pa), (b, pb) = projs.items()
        for (qn, q), (on, o) in (((a, pa), (b, pb)), ((b, pb), (a, pa))):
            d = q.in_features
            if q.out_features == 3 * d and o.in_features == o.out_features == d:
                return _Attention(name, True, (qn, on))
    if len(projs) == 4:
        pick = [next((n for n in names if n in projs), None) for names in (_Q, _K, _V, _O)]
        if None not in pick:
            return _Attention(name, False, tuple(pick))
    return None


def _match_mlp(name: str, m: nn.Module) -> _MLP | None:
    projs = _projs(m)
    if len(projs) not in (2, 3):
        return None
    others = [c for n, c in m.named_children() if n not in projs]
    if any(True for c in others for _ in c.parameters()):
        return None
    *ups, down = projs  # registration order: up (and gate) first, down last
    d, h = projs[down].out_features, projs[down].in_features
    if all(projs[u].in_features == d and projs[u].out_features == h for u in ups):
        return _MLP(name, tuple(ups), down)
    return None


# One pending change: setattr(owner, attr, value). All are built before any is applied, so a
# model that fails a check (a later block, the vocabulary) is left untouched.
_Edit = tuple[nn.Module, str, Any]


def _column(
    owner: nn.Module, child: str, name: str, group: Group, rank: int, size: int, parts: int = 1
) -> _Edit:
    layer = getattr(owner, child)
    build = (
        ColumnParallelLinear.from_conv1d
        if _is_hf_conv1d(layer)
        else ColumnParallelLinear.from_linear
    )
    return owner, child, build(layer, group, rank, size, parts=parts, name=_join(name, child))


def _row(owner: nn.Module, child: str, name: str, group: Group, rank: int, size: int) -> _Edit:
    layer = getattr(owner, child)
    build = RowParallelLinear.from_conv1d if _is_hf_conv1d(layer) else RowParallelLinear.from_linear
    return owner, child, build(layer, group, rank, size, name=_join(name, child))


def _divisible(name: str, what: str, n: int, size: int) -> None:
    if n % size != 0:
        raise ValueError(
            f"attention {name!r}: {what} {n} is not divisible by the tensor-parallel size {size}"
        )


def _local_attrs(m: nn.Module, attrs: tuple[str, ...], size: int) -> list[_Edit]:
    """Edits dividing every int attribute of `m` named in `attrs` by size (divisibility checked
    by the caller through the counts they describe)."""
    return [(m, a, getattr(m, a) // size) for a in attrs if type(getattr(m, a, None)) is int]


def _slice_fused_attention(
    block: nn.Module, child: str, att: _Attention, group: Group, rank: int, size: int
) -> list[_Edit]:
    m = getattr(block, child)
    qkv, out = att.proj_names
    if type(m).forward is CausalSelfAttention.forward and att.proj_names == ("qkv", "proj"):
        return [(block, child, ParallelCausalSelfAttention(m, group, rank, size, att.name))]
    d = _as_proj(getattr(m, qkv)).in_features
    heads, head_dim = _int_attr(m, _HEADS), getattr(m, "head_dim", None)
    if (
        getattr(m, "split_size", None) != d
        or heads is None
        or type(head_dim) is not int
        or getattr(m, heads) * head_dim != d
        or getattr(m, "is_cross_attention", False)
    ):
        raise ValueError(
            f"attention {att.name!r} ({type(m).__name__}) has a fused qkv projection {qkv!r} but "
            "neither zray's CausalSelfAttention forward nor a Hugging Face GPT-2 style one "
            f"(self-attention with split_size == {d}, a head count and head_dim, heads x head_dim "
            f"== {d}): zray cannot run it on local heads"
        )
    _divisible(att.name, heads, getattr(m, heads), size)
    return [
        _column(m, qkv, att.name, group, rank, size, parts=3),
        _row(m, out, att.name, group, rank, size),
        *_local_attrs(m, (heads, *_FUSED_WIDTHS), size),
    ]


def _head_counts(m: nn.Module, att: _Attention) -> tuple[int, int]:
    """(query heads, key/value heads) of a separate-projection attention."""
    q, k, v, o = (_as_proj(getattr(m, n)) for n in att.proj_names)
    if k.out_features != v.out_features or o.in_features != q.out_features:
        raise ValueError(
            f"attention {att.name!r}: projections {att.proj_names} have output widths "
            f"{q.out_features}, {k.out_features}, {v.out_features} and output input width "
            f"{o.in_features}; expected k and v alike and o reading q's width"
        )
    head_dim = getattr(m, "head_dim", None)
    if type(head_dim) is int and head_dim > 0:
        if q.out_features % head_dim or k.out_features % head_dim:
            raise ValueError(
                f"attention {att.name!r}: head_dim {head_dim} does not divide the q/k widths "
                f"{q.out_features}, {k.out_features}"
            )
        return q.out_features // head_dim, k.out_features // head_dim
    heads = _int_attr(m, _HEADS)
    if heads is None:
        raise ValueError(
            f"attention {att.name!r} ({type(m).__name__}): neither a head_dim attribute nor a head "
            f"count (one of {', '.join(_HEADS)}), so its heads cannot be kept whole"
        )
    kv = _int_attr(m, _KV_HEADS)
    n_q = getattr(m, heads)
    return n_q, getattr(m, kv) if kv is not None else n_q


def _slice_separate_attention(
    m: nn.Module, att: _Attention, group: Group, rank: int, size: int
) -> list[_Edit]:
    n_q, n_kv = _head_counts(m, att)
    _divisible(att.name, "the number of query heads", n_q, size)
    _divisible(att.name, "the number of key/value heads", n_kv, size)
    q, k, v, o = att.proj_names
    return [
        *(_column(m, n, att.name, group, rank, size) for n in (q, k, v)),
        _row(m, o, att.name, group, rank, size),
        # Local head counts, for forwards that read them rather than infer them from shapes.
        *_local_attrs(m, _HEADS + _KV_HEADS, size),
    ]


def _slice_mlp(m: nn.Module, mlp: _MLP, group: Group, rank: int, size: int) -> list[_Edit]:
    return [
        *(_column(m, n, mlp.name, group, rank, size) for n in mlp.up),
        _row(m, mlp.down, mlp.name, group, rank, size),
    ]


def _join(*names: str) -> str:
    return ".".join(n for n in names if n)


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, list]]:
    """(name, block, [(child, _Attention | _MLP), ...]) for every module with both kinds."""
    blocks = []
    for name, m in model.named_modules():
        found = []
        for child, c in m.named_children():
            match = _match_attention(_join(name, child), c) or _match_mlp(_join(name, child), c)
            if match is not None:
                found.append((child, match))
        kinds = {type(x) for _, x in found}
        if kinds == {_Attention, _MLP}:
            blocks.append((name, m, found))
    return blocks


def _no_blocks_error(model: nn.Module) -> ValueError:
    return ValueError(
        f"apply_tensor_parallel: no transformer block found in {type(model).__name__}. Expected "
        "modules holding an attention (a fused projection D -> 3D with a projection D -> D, or "
        "q/k/v/o projections) and an MLP (projections D -> H -> D, or gated), projections being "
        "nn.Linear or Hugging Face Conv1D."
    )


def _find_vocab(
    model: nn.Module, inside: set[int]
) -> tuple[str, nn.Embedding, str, nn.Linear] | None:
    """The token embedding and output head: a Linear(D, V) and an Embedding(V, D) outside blocks."""
    embs = [
        (n, m) for n, m in model.named_modules() if type(m) is nn.Embedding and id(m) not in inside
    ]
    heads = [
        (n, m) for n, m in model.named_modules() if type(m) is nn.Linear and id(m) not in inside
    ]
    pairs = [
        (en, e, hn, h)
        for hn, h in heads
        for en, e in embs
        if (h.out_features, h.in_features) == (e.num_embeddings, e.embedding_dim)
    ]
    # A tied pair first: it is certainly the token embedding and its head.
    pairs.sort(key=lambda p: p[3].weight is not p[1].weight)
    return pairs[0] if pairs else None


def _block_edits(
    blocks: list[tuple[str, nn.Module, list]], group: Group, rank: int, size: int
) -> list[_Edit]:
    edits: list[_Edit] = []
    for _, block, found in blocks:
        for child, match in found:
            m = getattr(block, child)
            if isinstance(match, _MLP):
                edits += _slice_mlp(m, match, group, rank, size)
            elif match.fused:
                edits += _slice_fused_attention(block, child, match, group, rank, size)
            else:
                edits += _slice_separate_attention(m, match, group, rank, size)
    return edits


def check_slicing(model: nn.Module, size: int, vocab_parallel: bool = True) -> None:
    """Raise the ValueError `apply_tensor_parallel` would raise for `size` ranks, without a
    process group. Slices `model` in place as rank 0 would: pass a throwaway copy (one built
    on the meta device costs nothing)."""
    apply_tensor_parallel(model, PlanningGroup(size), 0, size, vocab_parallel)


def apply_tensor_parallel(
    model: nn.Module, group: Group, rank: int, size: int, vocab_parallel: bool = True
) -> list[str]:
    """Slice `model` in place for rank `rank` of the tensor-parallel `group` (of `size` ranks).

    Every rank must call it on an identically initialised model. Returns the names of the
    sliced modules. `vocab_parallel=False` keeps the token embedding and head replicated.
    Raises ValueError, naming the module, when no block is recognised, an attention's forward
    cannot run on local heads, or a size does not divide.
    """
    check_group(group, rank, size, "apply_tensor_parallel")
    blocks = _find_blocks(model)
    if not blocks:
        raise _no_blocks_error(model)
    edits = _block_edits(blocks, group, rank, size)
    inside = {id(m) for _, block, _ in blocks for m in block.modules()}
    vocab = _find_vocab(model, inside) if vocab_parallel else None
    own_loss = False
    if vocab is not None:
        en, emb, hn, head = vocab
        # zray's GPT gets the vocabulary-parallel loss; other forwards need the full logits.
        own_loss = type(model) is GPT and (en, hn) == ("tok_emb", "lm_head")
        new_emb = VocabParallelEmbedding.from_embedding(emb, group, rank, size, name=en)
        new_head = ColumnParallelLinear.from_linear(
            head, group, rank, size, gather_output=not own_loss, name=hn
        )
        if head.weight is emb.weight:
            # Same vocabulary rows on both sides: the tie survives as one sliced Parameter.
            new_head.weight = new_emb.weight
        for name, new in ((en, new_emb), (hn, new_head)):
            parent, _, child = name.rpartition(".")
            edits.append((model.get_submodule(parent), child, new))
    sliced = []
    for owner, attr, value in edits:
        setattr(owner, attr, value)
        if isinstance(value, nn.Module):
            prefix = next(n for n, m in model.named_modules() if m is owner)
            sliced += [
                _join(prefix, attr, n)
                for n, m in value.named_modules()
                if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))
            ]
    if own_loss:
        model.__class__ = TensorParallelGPT
    return sliced

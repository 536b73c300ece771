"""A small, clean GPT (nanoGPT-style, pre-LayerNorm) for tests, the CPU demo and benchmarks.

Shapes used in comments: B batch, T sequence length, D d_model, H heads, Dh = D / H head
size, V vocabulary size, L layers.

The model follows Hugging Face's causal-LM convention: ``model(input_ids=..., labels=...)``
returns the scalar loss, ``model(input_ids=...)`` the logits, and labels are the token ids
themselves (``labels = input_ids`` in the common case): the model shifts them, so the logits at
position t are scored against ``labels[:, t + 1]``. ``attention_mask`` [B, T] (1 = token,
0 = padding) keeps padded positions out of every token's attention; padded positions' labels
should be -100 (``zray.data.collate`` derives such labels when the data has none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from zray.models.loss import cross_entropy
from zray.ops import gpu_layernorm

IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    """Shape of a GPT. The named sizes are the classmethods below (``GPTConfig.tiny()``...)."""

    vocab_size: int = 256
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by "
                f"GPTConfig.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    # Named sizes. Parameter counts are for the config as written (see GPT.num_params).

    @classmethod
    def tiny(cls) -> GPTConfig:
        """CPU demo (~0.87M parameters): trains visibly in well under a minute on 2 cores."""
        return cls(vocab_size=256, seq_len=64, n_layer=4, n_head=4, d_model=128)

    @classmethod
    def gpt_125m(cls) -> GPTConfig:
        """GPT-2 small / GPT-3 125M shape (~124M parameters, tied embeddings).

        The GPT-2 vocabulary (50257) is padded to 50304, a multiple of 64, for matmul speed.
        """
        return cls(
            vocab_size=50304,
            seq_len=1024,
            n_layer=12,
            n_head=12,
            d_model=768,
            tie_embeddings=True,
        )

    @classmethod
    def gpt_1b(cls) -> GPTConfig:
        """~1.28B parameters (1.21B in the blocks), tied embeddings; the 1-GPU benchmark model."""
        return cls(
            vocab_size=32768,
            seq_len=2048,
            n_layer=24,
            n_head=16,
            d_model=2048,
            tie_embeddings=True,
        )

    @classmethod
    def gpt_6b(cls) -> GPTConfig:
        """~5.78B parameters (GPT-J-like depth, head size 128), tied embeddings."""
        return cls(
            vocab_size=32768,
            seq_len=2048,
            n_layer=28,
            n_head=32,
            d_model=4096,
            tie_embeddings=True,
        )

    def with_(self, **changes: object) -> GPTConfig:
        """A copy with some fields changed (validated again), e.g. ``tiny().with_(dropout=0.1)``."""
        return replace(self, **changes)


def tiny() -> GPTConfig:
    return GPTConfig.tiny()


def gpt_125m() -> GPTConfig:
    return GPTConfig.gpt_125m()


def gpt_1b() -> GPTConfig:
    return GPTConfig.gpt_1b()


def gpt_6b() -> GPTConfig:
    return GPTConfig.gpt_6b()


def attention_mask_bias(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """[B, T] 1/0 padding mask -> bool [B, 1, T, T] for SDPA (True = may attend), or None.

    Query t attends to keys s <= t that are tokens. Each position also attends to itself, so a
    padded query with no token before it (left padding) has one finite score instead of a row
    of -inf (NaN after softmax); its output is never scored (its label is -100) and, being
    padding, no token attends to it.
    """
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != T or attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask has shape {list(attention_mask.shape)}; allowed: [B, {T}], the "
            "shape of input_ids"
        )
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | eye  # [B, 1, T, T]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """Causal scaled-dot-product attention, [B, H, T, Dh] each; ``mask`` from
    `attention_mask_bias` (padding), or None for the causal-only (fastest) kernel."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        # One fused projection for q, k and v: [D] -> [3D].
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; ``mask`` (see `attention_mask_bias`) or None: causal."""
        B, T, D = x.shape
        # [B, T, 3D] -> 3 x [B, T, D] -> [B, H, T, Dh]
        q, k, v = self.qkv(x).split(D, dim=-1)
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        # Flash / memory-efficient kernel where available: O(T) memory instead of the
        # [B, H, T, T] attention matrix. Costs 4*B*T*T*D FLOPs (QK^T and AV), forward.
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        # [B, H, T, Dh] -> [B, T, D]
        y = y.transpose(1, 2).contiguous().view(B, T, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, D] -> [B, T, 4D] -> [B, T, D]
        return self.drop(self.proj(self.act(self.fc(x))))


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T] targets: position t's target is labels[:, t + 1], the last
    position's is -100. The labels move instead of the logits ([B, T - 1, V] would be a copy of
    the largest activation); the one extra row per sequence costs 1/T of the loss's work."""
    ignored = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], ignored], dim=1)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state-dict keys) that runs zray's Triton kernels on
    GPUs (zray/ops/gpu_layernorm.py; torch's elsewhere) and can take the residual add before it:
    ``ln(x, residual)`` returns ``(x + residual, LayerNorm(x + residual))`` from one kernel.

    A module, not a function called from the block, so that every engine's per-module hooks
    (ZeRO-3 gathers, FSDP2, activation checkpointing) still see its parameters used in its own
    forward.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return gpu_layernorm.layer_norm(x, self.weight, self.bias, self.eps, residual)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, T, D] -> [B, T, D]. ln2 does the attention's residual add and the norm of
        # its result in one pass: h = x + attn(ln1(x)), a = ln2(h).
        h, a = self.ln2(self.attn(self.ln1(x), mask), x)
        return h + self.mlp(a)


class GPT(nn.Module):
    """Decoder-only transformer with learned positions.

    Parameters (unique): tok_emb [V, D], pos_emb [T, D], L blocks of 12*D^2 + O(D) each,
    ln_f, lm_head [V, D] (no bias; it *is* tok_emb.weight when ``cfg.tie_embeddings``).
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.d_model, bias=cfg.bias)
        # No bias on the output projection, so tying shares the whole layer's parameters.
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One Parameter under two names; model.parameters() yields it once.
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise all parameters; deterministic given ``torch.manual_seed``.

        Weights ~ N(0, 0.02); the two residual projections per block (attn.proj, mlp.proj)
        ~ N(0, 0.02 / sqrt(2 L)) so the residual stream's variance does not grow with depth
        (GPT-2); biases zero; LayerNorm weight one. Public so that a model built on the meta
        device can be materialised (``to_empty``) and then initialised in place.
        """
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("attn.proj", "mlp.proj"))
                if module is self.lm_head and self.cfg.tie_embeddings:
                    continue  # shares tok_emb.weight, initialised as an embedding
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # zray.data.collate derives labels = input_ids for a causal LM whose data has no labels.
    causal_lm = True

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: LongTensor [B, T] with T <= seq_len; labels: LongTensor [B, T] or None,
        unshifted (see the module note); attention_mask: [B, T] of 1 (token) / 0 (padding).

        Returns the mean next-token cross-entropy (fp32 scalar over the B * (T - 1) predicted
        positions; those whose label is -100 are ignored) when labels are given, else the
        logits [B, T, V].
        """
        B, T = input_ids.shape
        logits = self.lm_head(self.hidden(input_ids, attention_mask))  # 2*B*T*D*V FLOPs
        if labels is None:
            return logits
        # fp32 for the softmax even under bf16/fp16 autocast (the log-sum-exp over V terms loses
        # the loss's low bits in half precision), one slab of rows at a time, with the
        # gradient formed during forward: no [B, T, V] fp32 tensor is kept (see models/loss.py).
        targets = next_token_targets(labels)
        return cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), IGNORE_INDEX)

    def hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last block's output after the final LayerNorm, [B, T, D]: everything but the
        head (TensorParallelGPT shares it and puts its own head on top)."""
        T = input_ids.shape[1]
        if self.cfg.seq_len < T:
            raise ValueError(
                f"input_ids has sequence length {T}, longer than GPTConfig.seq_len "
                f"{self.cfg.seq_len}"
            )
        pos = torch.arange(T, device=input_ids.device)
        # [B, T, D] + [T, D] (broadcast over B)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        mask = attention_mask_bias(attention_mask, T)
        for block in self.blocks:  # the mask only when there is one: blocks keep block(x)
            x = block(x) if mask is None else block(x, mask)
        return self.ln_f(x)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of unique parameters (a tied weight counts once), from the tensors' numel:
        call it before any sharding replaces them (works on the meta device).

        ``exclude_embeddings`` drops the lookup-only tables, which cost no matmul FLOPs: the
        position embedding, and the token embedding unless it is tied to lm_head (then it is
        also the output projection and stays counted, once). This is the N of
        ``flops_per_token``.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.tok_emb.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B style.

        6 * N + 12 * L * D * T, where N = num_params(exclude_embeddings=True): each weight does
        one multiply-add (2 FLOPs) per token forward and two in backward (input and weight
        gradients), hence 6N; attention's QK^T and AV matmuls add 2 * 2 * T * D per layer per
        token forward, times 3 for forward + backward = 12 L D T. T is the full seq_len and the
        causal mask's skipped half is not subtracted (the PaLM / nanoGPT convention, so MFU
        numbers compare with theirs). Recomputation from activation checkpointing is not
        counted: it is overhead, not model FLOPs.
        """
        cfg = self.cfg
        attention = 12 * cfg.n_layer * cfg.d_model * cfg.seq_len
        return 6 * self.num_params(exclude_embeddings=True) + attention


def build(size: str = "tiny", **overrides: object) -> GPT:
    """A GPT of a named size ("tiny", "gpt_125m", "gpt_1b", "gpt_6b") with fields overridden.

    The entry point run configs name: {"zray": {"model": "zray.models.gpt:build",
    "model_kwargs": {"size": "tiny", "n_layer": 2}}}.
    """
    sizes = {"tiny": tiny, "gpt_125m": gpt_125m, "gpt_1b": gpt_1b, "gpt_6b": gpt_6b}
    if size not in sizes:
        raise ValueError(f"GPT size: got {size!r}; allowed: {', '.join(sizes)}")
    return GPT(sizes[size]().with_(**overrides))

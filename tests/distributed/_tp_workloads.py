"""Tensor-slicing functions that run inside each spawned rank (importable by module path).

Layer and model checks: every rank is in one tensor-parallel group (tp = world), made with
`new_group` rather than the default group so that nothing can lean on the world by accident.
Each rank builds the full modules from the same seed, slices its part, and returns what the
test compares against the unsliced modules it builds itself.

Mesh training (`mesh_runs`): the engine on a data x tensor mesh of the same world (dp x tp =
4 x 1, 2 x 2, 1 x 4) at ZeRO stages 1 and 3 (and 0, 2 on 2 x 2), against `mesh_reference`
(plain PyTorch on the whole global batch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import zray
from zray.errors import ConfigError
from zray.models.data import lm_batch, synthetic_tokens
from zray.models.gpt import GPT, CausalSelfAttention, GPTConfig
from zray.parallel.tensor import (
    ColumnParallelLinear,
    ParallelCausalSelfAttention,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_tensor_parallel,
    clip_tp_grad_norm_,
    full_state_dict,
    gather_tp_tensor,
    local_state_dict,
    tp_slice_of,
    tp_slices,
    vocab_parallel_cross_entropy,
)

STEPS = 5
LR = 1e-2
B = 4
# n_head 4 and vocabulary 64: divisible by tp 2 and 4.
GPT_CONFIGS = {
    # bias=True: the row-parallel biases (added once, after the sum) and sliced column biases.
    "tied_bias": GPTConfig(
        vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32, tie_embeddings=True
    ),
    # No biases for training: the key part of a qkv bias has an exactly-zero gradient whose
    # Adam update is normalised rounding noise (see _workloads.MODEL).
    "tied": GPTConfig(
        vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32, bias=False, tie_embeddings=True
    ),
    "untied": GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32, bias=False),
}
TRAINED = ("tied", "untied", "llama")


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class LlamaAttention(nn.Module):
    """Llama-style grouped-query attention; infers the head count from shapes like HF's."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads = n_heads, n_kv_heads
        self.head_dim = d // n_heads
        self.num_key_value_groups = n_heads // n_kv_heads
        self.q_proj = nn.Linear(d, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(shape).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(shape).transpose(1, 2)
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(d)
        self.self_attn = LlamaAttention(d, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(d)
        self.mlp = LlamaMLP(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """A Llama-shaped model written here (transformers is not installed): the policy must find
    its blocks by structure and keep its forward, its loss on gathered logits."""

    def __init__(self, vocab: int = 64, d: int = 32, n_layer: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaLayer(d, 8, 4, 48) for _ in range(n_layer))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))  # [B, T, V], gathered by the column-parallel head
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyLlama() if name == "llama" else GPT(GPT_CONFIGS[name])


def batch(step: int, vocab: int = 64, seq: int = 16) -> dict[str, torch.Tensor]:
    # Text with structure (a Markov chain), not uniform noise: with labels that carry no signal
    # the gradients are mostly cancellation, and Adam's normalised step turns their rounding
    # differences (the tensor group's summation order) into 1e-5 relative after 5 steps.
    out = lm_batch(synthetic_tokens(B, seq, vocab, seed=100 + step))
    out["labels"][0, :5] = -100  # ignored positions
    return out


def reference_training(name: str) -> dict[str, torch.Tensor]:
    """Plain single-process AdamW with clipping on the unsliced model: the ground truth."""
    model = build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        model(**batch(step)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _group() -> tuple[dist.ProcessGroup, int, int]:
    zray.init_distributed()
    world = dist.get_world_size()
    return dist.new_group(list(range(world))), dist.get_rank(), world


def _check_linear_like(
    full: nn.Module,
    local: nn.Module,
    x: torch.Tensor,
    local_input: Any,
    out_slice: Any,
    in_grad_slice: Any,
) -> dict[str, float]:
    """Forward and gradients of a sliced module against the full one on the same input x.

    local_input / out_slice / in_grad_slice map full tensors to what this rank sees or holds.
    """
    full.zero_grad(set_to_none=True)  # the same full module serves several checks
    x_full = x.clone().requires_grad_()
    y_full = full(x_full)
    g = torch.randn(y_full.shape, generator=torch.Generator().manual_seed(7))
    (y_full * g).sum().backward()
    x_loc = local_input(x).clone().requires_grad_()
    y_loc = local(x_loc)
    (y_loc * out_slice(g)).sum().backward()
    errs = {
        "out": _rel(y_loc, out_slice(y_full)),
        "x.grad": _rel(x_loc.grad, in_grad_slice(x_full.grad)),
    }
    for n, p in local.named_parameters():
        full_grad = full.get_parameter(n).grad
        spec = tp_slice_of(p)
        errs[f"{n}.grad"] = _rel(p.grad, spec.take(full_grad) if spec else full_grad)
    return errs


def layer_checks() -> dict[str, float]:
    """Largest relative error of each sliced layer against its unsliced original (fp32)."""
    group, rank, size = _group()
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)  # [B, T, D], the same on every rank
    errs: dict[str, float] = {}

    def chunk(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(size, dim=-1)[rank]

    def same(t: torch.Tensor) -> torch.Tensor:
        return t

    def record(prefix: str, found: dict[str, float]) -> None:
        errs.update({f"{prefix}: {k}": v for k, v in found.items()})

    lin = nn.Linear(16, 24)
    col = ColumnParallelLinear.from_linear(lin, group, rank, size)
    record("column", _check_linear_like(lin, col, x, same, chunk, same))
    # Fused [q; k; v] sliced part by part, gathered back to the full order.
    fused = nn.Linear(16, 48)
    colg = ColumnParallelLinear.from_linear(fused, group, rank, size, gather_output=True, parts=3)
    record("column fused gathered", _check_linear_like(fused, colg, x, same, same, same))
    row = nn.Linear(16, 8)
    rowp = RowParallelLinear.from_linear(row, group, rank, size)
    record("row parallel input", _check_linear_like(row, rowp, x, chunk, same, chunk))
    rows = RowParallelLinear.from_linear(row, group, rank, size, input_is_parallel=False)
    record("row scattered input", _check_linear_like(row, rows, x, same, same, same))
    attn = CausalSelfAttention(GPTConfig(vocab_size=8, seq_len=8, n_head=4, d_model=16))
    pattn = ParallelCausalSelfAttention(attn, group, rank, size, "attn")
    record("attention", _check_linear_like(attn, pattn, x, same, same, same))
    errs["attention local heads"] = float(pattn.n_head != 4 // size)

    # Embedding: ids over the whole vocabulary, one of them the padding row.
    emb = nn.Embedding(32, 16, padding_idx=5)
    vemb = VocabParallelEmbedding.from_embedding(emb, group, rank, size)
    ids = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 5
    g = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    (emb(ids) * g).sum().backward()
    out = vemb(ids)
    (out * g).sum().backward()
    errs["embedding: out"] = _rel(out, emb(ids))
    errs["embedding: weight.grad"] = _rel(
        vemb.weight.grad, vemb.weight._zray_tp.take(emb.weight.grad)
    )

    # Cross-entropy on vocabulary-sliced logits against F.cross_entropy on the whole.
    logits = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3)) * 4
    labels = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(4))
    labels[1, 2:] = -100
    full_logits = logits.clone().requires_grad_()
    ref = F.cross_entropy(full_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref.backward()
    local = chunk(logits).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, group, rank, size)
    (loss * 3.0).backward()  # a non-unit upstream gradient
    errs["cross-entropy: loss"] = _rel(loss, ref)
    errs["cross-entropy: grad"] = _rel(local.grad, 3.0 * chunk(full_logits.grad))
    none = torch.full_like(labels, -100)
    errs["cross-entropy: all ignored is nan"] = float(
        not vocab_parallel_cross_entropy(local, none, group, rank, size).isnan()
    )
    return errs


def _replicated_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if tp_slice_of(p) is None and p.grad is not None
    }


def model_checks(name: str, vocab_parallel: bool = True) -> dict[str, Any]:
    """Loss and gathered gradients of one step, local bytes, then 5 AdamW steps (if trained)."""
    group, rank, size = _group()
    model = build(name)
    sliced = apply_tensor_parallel(model, group, rank, size, vocab_parallel=vocab_parallel)
    loss = model(**batch(0))
    loss.backward()
    specs = tp_slices(model)
    grads = {
        n: gather_tp_tensor(p.grad, specs[n], group) if n in specs else p.grad.clone()
        for n, p in model.named_parameters(remove_duplicate=False)
    }
    out: dict[str, Any] = {
        "sliced": sliced,
        "class": type(model).__name__,
        "loss": loss.item(),
        "grads": grads,
        "replicated_grads": _replicated_grads(model),
        "local_bytes": {n: p.numel() * p.element_size() for n, p in model.named_parameters()},
        "specs": specs,
    }
    # A full state dict maps back to this rank's slices exactly (the checkpoint round trip).
    local = local_state_dict(model, full_state_dict(model, group))
    out["round_trip"] = all(torch.equal(local[k], v) for k, v in model.state_dict().items())
    if name in TRAINED:
        model.zero_grad(set_to_none=True)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        replicated_equal = True
        for step in range(STEPS):
            opt.zero_grad()
            model(**batch(step)).backward()
            # Replicated gradients must agree across the group bit for bit (else the
            # replicas would drift apart): compare against rank 0's.
            for g in _replicated_grads(model).values():
                ref = g.clone()
                dist.broadcast(ref, src=0, group=group)
                replicated_equal &= torch.equal(ref, g)
            clip_tp_grad_norm_(model.parameters(), 1.0, group)
            opt.step()
        out["replicated_equal"] = replicated_equal
        out["trained"] = full_state_dict(model, group)
    return out


def all_checks() -> dict[str, Any]:
    out: dict[str, Any] = {"layers": layer_checks(), "errors": error_checks()}
    for name in (*GPT_CONFIGS, "llama"):
        out[name] = model_checks(name)
    out["replicated_vocab"] = model_checks("untied", vocab_parallel=False)
    return out


def _error(fn: Any) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def error_checks() -> dict[str, str]:
    group, rank, size = _group()

    def gpt(**kw: Any) -> GPT:
        base = {"vocab_size": 64, "seq_len": 8, "n_layer": 1, "n_head": 4, "d_model": 16}
        return GPT(GPTConfig(**{**base, **kw}))

    return {
        "column": _error(
            lambda: ColumnParallelLinear.from_linear(nn.Linear(8, 7), group, rank, size, name="up")
        ),
        "row": _error(lambda: RowParallelLinear.from_linear(nn.Linear(7, 8), group, rank, size)),
        "embedding": _error(
            lambda: VocabParallelEmbedding.from_embedding(nn.Embedding(63, 8), group, rank, size)
        ),
        "heads": _error(
            lambda: apply_tensor_parallel(gpt(n_head=3, d_model=24), group, rank, size)
        ),
        "vocab": _error(lambda: apply_tensor_parallel(gpt(vocab_size=63), group, rank, size)),
        "no blocks": _error(
            lambda: apply_tensor_parallel(nn.Sequential(nn.Linear(8, 8)), group, rank, size)
        ),
        "wrong rank": _error(lambda: apply_tensor_parallel(gpt(), group, (rank + 1) % size, size)),
        "wrong size": _error(lambda: apply_tensor_parallel(gpt(), group, 0, size * 2)),
    }


# ---- the engine on a data x tensor mesh -------------------------------------------------------

# n_head 4, vocabulary 64: divisible by tp 4. No biases: see GPT_CONFIGS["tied"].
MESH_MODEL = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32, bias=False)
MESH_BATCH = 8  # global batch: micro 1 x gas 2 x dp 4, 2 x 2 x 2, 4 x 2 x 1
MESH_GAS = 2
# Below the gradient norm of every step (~1-3 here), so clipping scales every update and a
# wrong norm (a replicated part counted tp times, a slice missed) moves the parameters.
MESH_CLIP = 0.3
MESHES = ((4, 1), (2, 2), (1, 4))  # (dp, tp) on 4 processes
MESH_STAGES = (1, 3)
# (dp, tp, stage): every mesh at stages 1 and 3; stages 0 and 2 (whole gradients on every dp
# rank: no dp reduction of the norm; reduction during backward) on the 2 x 2 mesh.
MESH_RUNS = (*((dp, tp, s) for dp, tp in MESHES for s in MESH_STAGES), (2, 2, 0), (2, 2, 2))


def mesh_config(stage: int, tp: int) -> dict[str, Any]:
    # tp 4 is spelt the DeepSpeed way (autotp_size), the others zray's way.
    tp_section = {"autotp_size": tp} if tp == 4 else {"tp_size": tp}
    return {
        "train_batch_size": MESH_BATCH,
        "gradient_accumulation_steps": MESH_GAS,
        "gradient_clipping": MESH_CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1}},
        "tensor_parallel": tp_section,
        "zero_optimization": {
            "stage": stage,
            # Small buckets and units, so several of each run on the tiny model.
            "reduce_bucket_size": 3000,
            "stage3_param_persistence_threshold": 100,
            "stage3_prefetch_bucket_size": 5000,
        },
    }


def mesh_data() -> torch.Tensor:
    return synthetic_tokens(MESH_BATCH * STEPS, MESH_MODEL.seq_len, MESH_MODEL.vocab_size, seed=3)


def mesh_model() -> GPT:
    torch.manual_seed(0)
    return GPT(MESH_MODEL)


def mesh_reference(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Plain single-process AdamW with clipping on the whole global batch: the ground truth
    (in float64: the exact result to compare rounding errors against)."""
    model = mesh_model().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    tokens, norms = mesh_data(), []
    for step in range(STEPS):
        opt.zero_grad()
        model(**lm_batch(tokens[step * MESH_BATCH : (step + 1) * MESH_BATCH])).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MESH_CLIP)))
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "norms": norms}


def mesh_train(stage: int, tp: int) -> dict[str, Any]:
    """5 steps of the engine; the data is split over the dp dimension only."""
    engine, *_ = zray.initialize(model=mesh_model(), config=mesh_config(stage, tp))
    ctx = engine.ctx
    per_micro = MESH_BATCH // (ctx.dp_size * MESH_GAS)
    tokens, norms = mesh_data(), []
    for step in range(STEPS):
        for micro in range(MESH_GAS):
            start = step * MESH_BATCH + (micro * ctx.dp_size + ctx.dp_rank) * per_micro
            loss = engine(**lm_batch(tokens[start : start + per_micro]))
            engine.backward(loss)
            engine.step()
        assert engine.last_grad_norm is not None
        norms.append(float(engine.last_grad_norm))
    specs = tp_slices(engine.module)
    # Bytes of each sliced parameter on this rank (shape of its slice; at stage 3 the storage
    # is released between steps, the slice's shape stays) and of the whole it was cut from.
    sliced = {
        n: (p.numel() * p.element_size(), math.prod(specs[n].full_shape) * p.element_size())
        for n, p in engine.module.named_parameters()
        if n in specs
    }
    state = engine.consolidated_state_dict()  # collective: every rank calls it
    return {
        "mesh": (ctx.dp_rank, ctx.dp_size, ctx.tp_rank, ctx.tp_size),
        "state": state if ctx.rank == 0 else None,
        "norms": norms,
        "global_steps": engine.global_steps,
        "sliced_bytes": sliced,
        "batch": (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()),
    }


def _config_error(fn: Any) -> str:
    try:
        fn()
    except ConfigError as e:
        return str(e)
    return "no error"


def mesh_runs() -> dict[Any, Any]:
    """Every (dp, tp) mesh at every stage in one process group, and the mesh's config errors."""
    zray.init_distributed()
    out: dict[Any, Any] = {(tp, stage): mesh_train(stage, tp) for _, tp, stage in MESH_RUNS}
    out["tp3 of 4"] = _config_error(
        lambda: zray.initialize(model=mesh_model(), config=mesh_config(1, 3))
    )
    return out


def all_runs() -> dict[str, Any]:
    """Everything the tensor-parallel tests need from 4 processes, in one launch."""
    return {"checks": all_checks(), "mesh": mesh_runs()}

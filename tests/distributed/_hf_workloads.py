"""Hugging Face models sliced by the automatic policy, run inside each spawned rank.

Models are built from small configs with random weights (no download). Every rank of the one
tensor-parallel group (tp = world) builds the same whole model from the same seed, slices it,
and trains on the same batches as the single-process reference (plain torch AdamW); the result
is the trained state gathered to full shapes, comparable key by key with the reference's.

`engine_train`: the same GPT-2 trained through `zray.initialize` (ZeRO stages 1 and 3, tensor
slicing by the engine) at dp1 x tp2, against the same engine at tp1 in one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import zray
from zray.parallel.tensor import (
    apply_tensor_parallel,
    full_state_dict,
    gather_tp_tensor,
    tp_slices,
)

STEPS = 5
LR = 1e-2
B, T, V = 4, 16, 128


def build(name: str, attn: str = "eager", seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny GPT-2 (fused Conv1D attention, tied head) or Llama (GQA: 4 heads, 2 kv heads)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if name == "gpt2":
        cfg = GPT2Config(
            vocab_size=V,
            n_positions=32,
            n_embd=64,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,
        )
        cfg.update(overrides)
        return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    cfg.update(overrides)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn)


def batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions
    return {"input_ids": ids, "labels": labels}


def drop_key_bias_grad(model: nn.Module) -> None:
    """Zero the gradient of GPT-2's key bias (the middle third of c_attn.bias, whole or sliced:
    a rank's slice is [q_r; k_r; v_r]). Softmax ignores a shift of all of a query's scores, so
    that gradient is exactly zero in exact arithmetic and rounding noise in fp32, which Adam
    normalises to full-size steps that no two summation orders agree on (see _workloads.MODEL).
    Done identically in the sliced and the reference runs."""
    for name, m in model.named_modules():
        if name.endswith("attn.c_attn") and m.bias is not None and m.bias.grad is not None:
            g = m.bias.grad
            g[g.numel() // 3 : 2 * g.numel() // 3] = 0.0


def train(model: nn.Module) -> tuple[list[float], dict[str, torch.Tensor]]:
    """5 AdamW steps; the losses, and the first step's gradients (this rank's, by name)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses, first_grads = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(**batch(step)).loss
        loss.backward()
        drop_key_bias_grad(model)
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


def reference(name: str, attn: str) -> dict[str, Any]:
    """Single process, unsliced (tp1): the ground truth."""
    model = build(name, attn)
    losses, grads = train(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "state": state, "grads": grads}


def _group() -> tuple[dist.ProcessGroup, int]:
    zray.init_distributed()
    world = dist.get_world_size()
    return dist.new_group(list(range(world))), world


def sliced(name: str, attn: str) -> dict[str, Any]:
    """This rank's run at tp = world; the trained state gathered to full shapes."""
    group, world = _group()
    model = build(name, attn)
    names = apply_tensor_parallel(model, group, dist.get_rank(), world)
    local_numel = sum(p.numel() for p in model.parameters())
    losses, grads = train(model)
    specs = tp_slices(model)
    return {
        "losses": losses,
        "state": full_state_dict(model, group),
        "grads": {
            n: gather_tp_tensor(g, specs[n], group) if n in specs else g for n, g in grads.items()
        },
        "sliced": names,
        "specs": {n: (s.dim, s.parts) for n, s in specs.items()},
        "local_numel": local_numel,
    }


def error_messages() -> dict[str, str]:
    """The policy's errors at tp = world for head counts that do not divide."""
    group, world = _group()
    models = {
        "gpt2 heads": build("gpt2", n_head=3, n_embd=48),
        "llama kv heads": build("llama", num_key_value_heads=1),
    }
    out = {}
    for what, model in models.items():
        try:
            apply_tensor_parallel(model, group, dist.get_rank(), world)
            out[what] = "no error"
        except ValueError as e:
            out[what] = str(e)
    return out


# ---- GPT-2 trained through the engine (zray.initialize) ----------------------------------------

ENGINE_STAGES = (1, 3)
# Adam moves every element by about lr per step whatever its gradient's size, so an element
# whose gradient is near zero (a near cancellation) moves in a direction set by rounding:
# the two runs' summation orders then differ by up to 2 lr on it. Over the whole model that
# is ~5e-6 relative at lr 1e-2 (half the tolerance, with CPU-dependent summation orders) and
# ~1e-6 at 3e-3. Bugs (a missed slice, a replicated gradient not reduced) stay far above it.
ENGINE_LR = 3e-3
# Below the gradient norm of every step (~1.1-2.5), so clipping acts on every update; the
# norms themselves are compared too (Adam would hide a uniformly wrong clipping factor).
ENGINE_CLIP = 0.5


def engine_config(stage: int, tp: int) -> dict[str, Any]:
    """fp32, AdamW, dp1 x tp (the whole world is one tensor group)."""
    return {
        "train_batch_size": B,
        "gradient_clipping": ENGINE_CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": ENGINE_LR, "weight_decay": 0.1}},
        "tensor_parallel": {"tp_size": tp},
        "zero_optimization": {
            "stage": stage,
            # Small units, so stage 3 gathers and releases several per step of the tiny model.
            "stage3_param_persistence_threshold": 100,
            "stage3_prefetch_bucket_size": 5000,
        },
    }


def _drop_key_bias_grad_hooks(model: nn.Module) -> None:
    """`drop_key_bias_grad` as gradient hooks: under the engine the gradients leave for ZeRO's
    buffers during backward at stage 3 (post-accumulate hooks), so they are zeroed on their
    way in: a tensor hook on a parameter runs before its gradient is accumulated."""

    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[g.numel() // 3 : 2 * g.numel() // 3] = 0.0
        return g

    for name, m in model.named_modules():
        if name.endswith("attn.c_attn") and m.bias is not None:
            m.bias.register_hook(hook)


def engine_train(stage: int, tp: int) -> dict[str, Any]:
    """5 steps of the engine on the tiny GPT-2 at dp1 x tp (tp = 1: one process, no group).
    The losses, clipping norms and the consolidated state (sliced tensors at full shapes)."""
    engine, *_ = zray.initialize(model=build("gpt2"), config=engine_config(stage, tp))
    _drop_key_bias_grad_hooks(engine.module)
    losses, norms = [], []
    for step in range(STEPS):
        loss = engine(**batch(step)).loss  # the engine returns the model's CausalLMOutput
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        assert engine.last_grad_norm is not None
        norms.append(float(engine.last_grad_norm))
    specs = tp_slices(engine.module)
    return {
        "mesh": (engine.ctx.dp_size, engine.ctx.tp_size),
        "global_steps": engine.global_steps,
        "losses": losses,
        "norms": norms,
        "state": engine.consolidated_state_dict(),  # collective: every rank calls it
        "specs": {n: (s.dim, s.parts) for n, s in specs.items()},
    }


def everything(cases: list[tuple[str, str]]) -> dict[Any, Any]:
    """All sliced runs, the error messages and the engine runs (tp = world, every stage of
    ENGINE_STAGES) from one set of processes (spawning a rank and importing transformers costs
    seconds: done once)."""
    out: dict[Any, Any] = {case: sliced(*case) for case in cases}
    out["errors"] = error_messages()
    out["engine"] = {stage: engine_train(stage, dist.get_world_size()) for stage in ENGINE_STAGES}
    return out

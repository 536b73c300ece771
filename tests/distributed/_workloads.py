"""Functions that run inside each spawned rank (they must be importable by module path)."""

from __future__ import annotations

import copy
from typing import Any

import torch

import zray
from zray.models.data import lm_batch, synthetic_tokens
from zray.models.gpt import GPT, GPTConfig

# bias=False: the key part of a qkv bias gets an exactly-zero gradient (softmax ignores a shift
# of all scores), so its Adam update is normalised rounding noise and no two summation orders
# agree on it. Without those biases every parameter has a real gradient.
MODEL = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, bias=False)
GLOBAL_BATCH = 16
GAS = 2
STEPS = 5
LR = 1e-2


def ds_config(stage: int, world: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": LR,
                "warmup_num_steps": 3,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": {
            "stage": stage,
            # Small buckets and a low persistence threshold so that every path (several
            # buckets, several stage-3 units, a persistent unit) runs even on a tiny model.
            "reduce_bucket_size": 3000,
            "stage3_param_persistence_threshold": 100,
            "stage3_prefetch_bucket_size": 5000,
        },
    }
    cfg.update(extra)
    return {k: v for k, v in cfg.items() if v is not None}  # extra key=None drops a section


def data() -> torch.Tensor:
    return synthetic_tokens(GLOBAL_BATCH * STEPS, MODEL.seq_len, MODEL.vocab_size, seed=1)


def fresh_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(MODEL)


def micro_batch(
    tokens: torch.Tensor, step: int, micro: int, rank: int, world: int, device: Any = "cpu"
) -> dict:
    """Rank `rank`'s micro-batch `micro` of global step `step`: a fixed slice of the global batch."""
    per_micro = GLOBAL_BATCH // (world * GAS)
    start = step * GLOBAL_BATCH + (micro * world + rank) * per_micro
    return {k: v.to(device) for k, v in lm_batch(tokens[start : start + per_micro]).items()}


def reference_backward(
    model: torch.nn.Module, tokens: torch.Tensor, step: int, world: int = 2
) -> None:
    """The gradient of step `step`'s global batch, summed over the micro-batches `world` ranks
    take (`micro_batch`), each weighted 1 / their count: the engine's sum, in one process.

    Not one backward of the whole batch: a gradient element that nearly cancels (|g| ~ 2e-8,
    Adam's eps 1e-8) moved by 1.4% between one batch of 16 rows and four of 4 in plain PyTorch,
    and Adam's first step turned that into 2.4e-5 relative on the weight (measured), 100x the
    engine's difference from this sum (2.7e-7 after 5 steps)."""
    parts = world * GAS
    for micro in range(GAS):
        for rank in range(world):
            batch = micro_batch(tokens, step, micro, rank, world)
            (model(**batch) / parts).backward()


def reference_training(world: int = 2) -> dict[str, torch.Tensor]:
    """Plain single-process PyTorch on each whole global batch, its gradient summed over the
    micro-batches `world` ranks take (`reference_backward`): the ground truth."""
    from zray.schedulers import build_scheduler

    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    sched = build_scheduler(
        opt,
        "WarmupLR",
        {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 3, "warmup_type": "linear"},
    )
    tokens = data()
    for step in range(STEPS):
        opt.zero_grad()
        reference_backward(model, tokens, step, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    stage: int, keep_engine: bool = False, steps: int = STEPS, **extra: Any
) -> dict[str, Any]:
    ctx = zray.init_distributed()
    world, rank = ctx.dp_size, ctx.dp_rank
    engine, *_ = zray.initialize(model=fresh_model(), config=ds_config(stage, world, **extra))
    tokens = data()
    losses = []
    for step in range(steps):
        for micro in range(GAS):
            loss = engine(**micro_batch(tokens, step, micro, rank, world, ctx.device))
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    state = engine.consolidated_state_dict()
    return {
        "state": state if rank == 0 else None,
        "losses": losses,
        "global_steps": engine.global_steps,
        "lr": engine.get_lr(),
        "memory": engine.memory_breakdown(),
        **({"engine": engine} if keep_engine else {}),
    }


def all_stages_fp32() -> dict[int, dict[str, Any]]:
    return {stage: train(stage) for stage in range(4)}


def reduction_runs() -> dict[str, dict[int, dict[str, Any]]]:
    """Stages 0-2 (the all-reduce and reduce-scatter paths, at the boundary and bucketed in
    backward) with DeepSpeed's reduction keys; each run also records which gradient collectives
    ran and the absolute sum of what each rank handed them (its contribution to the sum)."""
    from zray.zero import comm

    sent: list[tuple[str, float]] = []
    real = {"all_reduce_sum": comm.all_reduce_sum, "reduce_scatter_sum": comm.reduce_scatter_sum}

    def recording(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            grads = args[0] if name == "all_reduce_sum" else args[1]
            if grads.numel() > 8:  # gradients, not the step's norm or vote vectors
                sent.append((name, float(grads.double().abs().sum())))
            return real[name](*args, **kwargs)

        return call

    settings: dict[str, Any] = {
        "default": lambda stage: {},
        "prescale": lambda stage: {"prescale_gradients": True},
        "predivide": lambda stage: {"gradient_predivide_factor": 4.0},
        "all_reduce": lambda stage: {
            "zero_optimization": {
                "stage": stage,
                "reduce_bucket_size": 3000,
                "reduce_scatter": False,
            }
        },
    }
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name, extra in settings.items():
        out[name] = {}
        for stage in (0, 1, 2):
            sent.clear()
            for fn in real:
                setattr(comm, fn, recording(fn))
            try:
                run = train(stage, steps=2, **extra(stage))
            finally:
                for fn, f in real.items():
                    setattr(comm, fn, f)
            out[name][stage] = {
                "state": run["state"],
                "losses": run["losses"],
                "sent": sum(v for _, v in sent),
                "kinds": sorted({k for k, _ in sent}),
            }
    return out


def bf16_stages(stages: tuple[int, ...] = (0, 3)) -> dict[int, dict[str, Any]]:
    return {stage: train(stage, bf16={"enabled": True}) for stage in stages}


def memory_per_stage() -> dict[int, dict[str, Any]]:
    """Bytes per rank after one bf16 step (and gradient bytes just before it), with what the
    formula needs to predict them."""
    ctx = zray.init_distributed()
    out = {}
    tokens = data()
    for stage in range(4):
        engine, *_ = zray.initialize(
            model=fresh_model(),
            config=ds_config(
                stage,
                ctx.dp_size,
                bf16={"enabled": True},
                zero_optimization={
                    "stage": stage,
                    "reduce_bucket_size": 10**9,
                    "stage3_param_persistence_threshold": 100,
                },
            ),
        )
        for micro in range(GAS):
            engine.backward(
                engine(**micro_batch(tokens, 0, micro, ctx.dp_rank, ctx.dp_size, ctx.device))
            )
            before_step = engine.memory_breakdown()
            engine.step()
        out[stage] = {
            "memory": engine.memory_breakdown(),
            "grads_before_step": before_step["grads"],
            "optimizer_tensors": len(engine.optimizer.optimizer.state),
        }
    return out


def fp16_overflow(overflow_steps: tuple[int, ...], bad_rank: int) -> dict[str, Any]:
    """fp16 at stage 2; the loss of `bad_rank` alone is made infinite on `overflow_steps`."""
    ctx = zray.init_distributed()
    cfg = ds_config(
        2,
        ctx.dp_size,
        fp16={
            "enabled": True,
            "initial_scale_power": 8,
            "hysteresis": 2,
            "loss_scale_window": 1000,
        },
    )
    del cfg["scheduler"]  # the warmup starts at lr 0, which would leave step 0 unchanged too
    engine, *_ = zray.initialize(model=fresh_model(), config=cfg)
    tokens = data()
    scales, skipped, snapshots = [], [], []
    for step in range(STEPS):
        before = engine.consolidated_state_dict()
        for micro in range(GAS):
            loss = engine(**micro_batch(tokens, step, micro, ctx.dp_rank, ctx.dp_size, ctx.device))
            if step in overflow_steps and ctx.dp_rank == bad_rank and micro == GAS - 1:
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()
        after = engine.consolidated_state_dict()
        snapshots.append(all(torch.equal(before[k], after[k]) for k in before))
        scales.append(engine.loss_scale)
        skipped.append(engine.skipped_steps)
    return {
        "scales": scales,
        "skipped": skipped,
        "unchanged": snapshots,
        "global_steps": engine.global_steps,
    }


def skip_nonfinite(
    precision: str, nan_steps: tuple[int, ...], bad_rank: int, left_out: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Stage 2 with non-finite updates skipped (fp32: zray.skip_nonfinite_steps; bf16:
    DeepSpeed's bf16.check_grad_overflow). `bad_rank`'s loss is NaN on `nan_steps`; the global
    batches of `left_out` are not fed at all (the reference for a skipped one)."""
    ctx = zray.init_distributed()
    cfg = ds_config(2, ctx.dp_size)
    del cfg["scheduler"]  # a constant lr: a skipped step must leave nothing behind
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": True}
    else:
        cfg["zray"] = {"skip_nonfinite_steps": True}
    engine, *_ = zray.initialize(model=fresh_model(), config=cfg)
    tokens = data()
    skipped, unchanged = [], []
    for step in [s for s in range(STEPS) if s not in left_out]:
        before = engine.consolidated_state_dict()
        for micro in range(GAS):
            loss = engine(**micro_batch(tokens, step, micro, ctx.dp_rank, ctx.dp_size, ctx.device))
            if step in nan_steps and ctx.dp_rank == bad_rank and micro == 0:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
        after = engine.consolidated_state_dict()
        unchanged.append(all(torch.equal(before[k], after[k]) for k in before))
        skipped.append(engine.skipped_steps)
    return {"skipped": skipped, "unchanged": unchanged, "state": engine.consolidated_state_dict()}


def deepcopy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return copy.deepcopy(state)


def resume_matches(stage: int, save_dir: str, split: int = 2, **extra: Any) -> dict[str, Any]:
    """Train `split` steps, save, train on; then a fresh engine loads and trains the same steps.

    Returns both final states (rank 0) so the test can require them to be identical.
    """
    ctx = zray.init_distributed()
    tokens = data()

    def run(engine: Any, steps: range) -> None:
        for step in steps:
            for micro in range(GAS):
                batch = micro_batch(tokens, step, micro, ctx.dp_rank, ctx.dp_size, ctx.device)
                engine.backward(engine(**batch))
                engine.step()

    cfg = ds_config(stage, ctx.dp_size, **extra)
    first, *_ = zray.initialize(model=fresh_model(), config=cfg)
    run(first, range(split))
    first.save_checkpoint(save_dir, client_state={"note": "hello"})
    run(first, range(split, STEPS))
    uninterrupted = first.consolidated_state_dict()

    # A different initialisation, so the test fails unless the checkpoint really restores.
    second, *_ = zray.initialize(model=fresh_model(seed=123), config=cfg)
    path, client = second.load_checkpoint(save_dir)
    steps_after_load = second.global_steps
    lr_after_load = second.get_lr()
    run(second, range(split, STEPS))
    resumed = second.consolidated_state_dict()
    return {
        "uninterrupted": uninterrupted if ctx.dp_rank == 0 else None,
        "resumed": resumed if ctx.dp_rank == 0 else None,
        "path": path,
        "client": client,
        "steps_after_load": steps_after_load,
        "lr_after_load": lr_after_load,
        "kernel": first.zero.shard_adam is not None and second.zero.shard_adam is not None,
    }


def resume_all_stages(save_dir: str) -> dict[int, dict[str, Any]]:
    return {stage: resume_matches(stage, f"{save_dir}/stage{stage}") for stage in range(4)}


def gathered_all_stages() -> dict[int, dict[str, Any]]:
    return {stage: gathered_parameters(stage) for stage in (1, 3)}


def activation_checkpointing_stages() -> dict[int, dict[str, Any]]:
    extra = {"activation_checkpointing": {"modules": "blocks"}}
    return {stage: train(stage, **extra) for stage in (2, 3)}


def gathered_parameters(stage: int) -> dict[str, Any]:
    """GatheredParameters: whole inside the block; modifier rank's edit persists everywhere."""
    ctx = zray.init_distributed()
    cfg = ds_config(stage, ctx.dp_size)
    del cfg["scheduler"]  # warmup starts at lr 0: the step after the edit must move weights
    engine, *_ = zray.initialize(model=fresh_model(), config=cfg)
    weight = engine.module.blocks[0].mlp.fc.weight
    inside_shape = None
    with zray.zero.GatheredParameters([weight], modifier_rank=0):
        inside_shape = tuple(weight.shape)
        inside_sum = float(weight.detach().float().sum())
        if ctx.dp_rank == 0:
            with torch.no_grad():
                weight.fill_(0.5)  # only rank 0's edit may survive
    outside_bytes = weight.untyped_storage().nbytes()  # stage 3: released again
    state = engine.consolidated_state_dict()
    # Training goes on from the edited value (the master weights were updated too).
    tokens = data()
    for micro in range(GAS):
        engine.backward(
            engine(**micro_batch(tokens, 0, micro, ctx.dp_rank, ctx.dp_size, ctx.device))
        )
        engine.step()
    after = engine.consolidated_state_dict()
    return {
        "inside_shape": inside_shape,
        "inside_sum": inside_sum,
        "outside_bytes": outside_bytes,
        "edited": state["blocks.0.mlp.fc.weight"],
        "after_step": after["blocks.0.mlp.fc.weight"],
    }


def collectives_all_stages() -> dict[int, list[dict[str, dict[str, int]]]]:
    return {stage: collectives_per_micro_step(stage) for stage in range(4)}


def collectives_per_micro_step(stage: int) -> list[dict[str, dict[str, int]]]:
    """Count the collectives each micro-step launches: {"backward": forward + backward,
    "step": engine.step()}.

    The counters wrap torch.distributed's functions in this process only; the collectives still
    run for real.
    """
    import torch.distributed as dist

    counts: dict[str, int] = {}

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    names = [
        "all_reduce",
        "reduce_scatter_tensor",
        "reduce_scatter_single",
        "all_gather_into_tensor",
        "all_gather_single",
        "broadcast",
    ]
    ctx = zray.init_distributed()
    engine, *_ = zray.initialize(model=fresh_model(), config=ds_config(stage, ctx.dp_size))
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    for n, fn in originals.items():
        setattr(dist, n, counting(n, fn))
    # zray.zero.comm bound its collectives at import: rebind them to the counting wrappers.
    from zray.zero import comm

    saved = (comm._reduce_scatter, comm._all_gather)
    comm._reduce_scatter = (
        getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    )
    comm._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    tokens = data()
    per_micro = []
    try:
        for step in range(2):
            for micro in range(GAS):
                counts.clear()
                batch = micro_batch(tokens, step, micro, ctx.dp_rank, ctx.dp_size, ctx.device)
                engine.backward(engine(**batch))
                in_backward = dict(counts)
                counts.clear()
                engine.step()
                per_micro.append({"backward": in_backward, "step": dict(counts)})
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
        comm._reduce_scatter, comm._all_gather = saved
    return per_micro


def decay_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Hugging Face's usual split: weight decay on matrices, none on norms and embeddings."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def reference_param_groups() -> dict[str, torch.Tensor]:
    model = fresh_model()
    opt = torch.optim.AdamW(decay_groups(model), lr=LR)
    tokens = data()
    for step in range(STEPS):
        opt.zero_grad()
        reference_backward(model, tokens, step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def param_groups_all_stages() -> dict[int, dict[str, torch.Tensor] | None]:
    """Two param groups with different weight decay, at every stage (segments per group)."""
    ctx = zray.init_distributed()
    out = {}
    tokens = data()
    for stage in range(4):
        cfg = ds_config(stage, ctx.dp_size)
        del cfg["scheduler"]
        model = fresh_model()
        engine, *_ = zray.initialize(model=model, model_parameters=decay_groups(model), config=cfg)
        for step in range(STEPS):
            for micro in range(GAS):
                batch = micro_batch(tokens, step, micro, ctx.dp_rank, ctx.dp_size, ctx.device)
                engine.backward(engine(**batch))
                engine.step()
        state = engine.consolidated_state_dict()
        out[stage] = state if ctx.dp_rank == 0 else None
    return out


def offload_all_stages() -> dict[int, dict[str, Any]]:
    """Stages 1-3 with the optimizer (and at stage 3 also the parameters) offloaded to host
    memory, next to the same stage without offload."""
    out: dict[int, dict[str, Any]] = {}
    for stage in (1, 2, 3):
        zero = {
            "stage": stage,
            "reduce_bucket_size": 3000,
            "stage3_param_persistence_threshold": 100,
        }
        plain = train(stage, zero_optimization=zero)
        offload = {"device": "cpu", "pin_memory": True}
        extra = {**zero, "offload_optimizer": offload}
        if stage == 3:
            extra["offload_param"] = {"device": "cpu"}
        out[stage] = {
            "plain": plain["state"],
            "offload": train(stage, zero_optimization=extra)["state"],
        }
    return out


def capture_after_training(stage: int) -> dict[str, Any]:
    """Train 3 steps, return this rank's in-memory snapshot and the full state, then the full
    state after a 4th step (what a restored engine's 4th step must reproduce)."""
    from zray.checkpoint.engine_state import capture

    ctx = zray.init_distributed()
    engine, *_ = zray.initialize(model=fresh_model(), config=ds_config(stage, ctx.dp_size))
    tokens = data()

    def train_step(step: int) -> None:
        for micro in range(GAS):
            batch = micro_batch(tokens, step, micro, ctx.dp_rank, ctx.dp_size, ctx.device)
            engine.backward(engine(**batch))
            engine.step()

    for step in range(3):
        train_step(step)
    out = {
        "shard": capture(engine, sampler={"consumed_samples": 48, "seed": 0}),
        "state": engine.consolidated_state_dict(),
    }
    train_step(3)
    return {**out, "after_next_step": engine.consolidated_state_dict()}


def stage3_gather_modes() -> dict[str, Any]:
    """bf16 stage 3 with stage3_gather "auto" (keeps NCCL/gloo here: no CUDA) vs the default,
    and "peer_copy", which must fail alike on every rank with the reason."""
    zray.init_distributed()
    out: dict[str, Any] = {}
    for mode in ("nccl", "auto"):
        zero = {**ds_config(3, 2)["zero_optimization"], "stage3_gather": mode}
        out[mode] = train(3, bf16={"enabled": True}, zero_optimization=zero)["losses"]
        engine, *_ = zray.initialize(
            model=fresh_model(), config=ds_config(3, 2, zero_optimization=zero)
        )
        out[f"{mode}_peer_gather"] = engine.zero.peer_gather is not None
    zero = {**ds_config(3, 2)["zero_optimization"], "stage3_gather": "peer_copy"}
    try:
        zray.initialize(model=fresh_model(), config=ds_config(3, 2, zero_optimization=zero))
        out["peer_copy"] = "no error"
    except zray.ConfigError as e:
        out["peer_copy"] = str(e)
    return out


def garbage_after_training() -> dict[str, int]:
    """Per variant: tensors that only Python's cyclic GC would free after 3 steps (GC off).

    A reference cycle that reaches an activation keeps its block's autograd graph alive until
    the GC happens to run, which shows as gigabytes at the memory peak on a GPU. (torch's
    checkpoint leaves a few tensor-free cycles of functions and type aliases; not counted.)"""
    import gc

    ctx = zray.init_distributed()
    rank, world = ctx.dp_rank, ctx.dp_size
    tokens = data()
    variants: dict[str, dict[str, Any]] = {
        f"stage{s}": {"bf16": {"enabled": True}} for s in range(4)
    }
    variants["stage3_checkpointing"] = {
        "activation_checkpointing": {"modules": "blocks"},
    }
    out = {}
    for name, extra in variants.items():
        stage = 3 if name.startswith("stage3") else int(name[-1])
        engine, *_ = zray.initialize(model=fresh_model(), config=ds_config(stage, world, **extra))
        gc.collect()
        gc.disable()
        try:
            for step in range(3):
                for micro in range(GAS):
                    loss = engine(**micro_batch(tokens, step, micro, rank, world, ctx.device))
                    engine.backward(loss)
                    engine.step()
            del loss
            gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collection finds, to look at it
            gc.collect()
            out[name] = sum(isinstance(o, torch.Tensor) for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    return out


def overlap_param_gather_stages() -> dict[int, dict[str, Any]]:
    """Stages 1-3 with zero_optimization.overlap_param_gather on and off (fp32, gloo)."""
    zray.init_distributed()
    out: dict[int, dict[str, Any]] = {}
    for stage in (1, 2, 3):
        runs = {}
        for overlap in (False, True):
            zero = {**ds_config(stage, 2)["zero_optimization"], "overlap_param_gather": overlap}
            runs[overlap] = train(stage, zero_optimization=zero)
        out[stage] = {"off": runs[False], "on": runs[True], "deferred": _deferral_seen(stage)}
    return out


def _deferral_seen(stage: int) -> tuple[bool, bool]:
    """(a gather was still deferred after step(), none is after the next forward)."""
    ctx = zray.init_distributed()
    zero = {**ds_config(stage, 2)["zero_optimization"], "overlap_param_gather": True}
    cfg = ds_config(stage, ctx.dp_size, zero_optimization=zero)
    engine, *_ = zray.initialize(model=fresh_model(), config=cfg)
    tokens = data()
    for micro in range(GAS):
        batch = micro_batch(tokens, 0, micro, ctx.dp_rank, ctx.dp_size, ctx.device)
        engine.backward(engine(**batch))
        engine.step()
    after_step = any(u.publishing is not None for u in engine.zero.units)
    engine(**batch)
    return after_step, all(u.publishing is None for u in engine.zero.units)


def _model_kernels_off_on_cpu() -> None:
    """Under Triton's interpreter the GPT's LayerNorm kernels would run too, one Python program
    per row (slow); the optimizer tests keep the model on torch's ops."""
    if not torch.cuda.is_available():
        from zray.ops import gpu_layernorm

        gpu_layernorm.available = lambda x: False


def shard_adam_stages(steps: int) -> dict[str, dict[str, Any]]:
    """bf16 at every stage, stepped by zray's Adam kernel and by torch's (`torch_adam`).

    Also reports how far each unit's 16-bit compute slice is from its fp32 master after the
    last step (the kernel writes that slice itself; torch's path casts it in publish).
    """
    _model_kernels_off_on_cpu()
    out = {}
    for stage in range(4):
        for torch_adam in (False, True):
            opt = {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1}}
            opt["params"]["torch_adam"] = torch_adam
            # No warm-up schedule: its first step has lr 0, and a 1-step comparison must move.
            run = train(stage, True, steps, bf16={"enabled": True}, optimizer=opt, scheduler=None)
            engine = run.pop("engine")
            worst = 0.0
            for unit in engine.zero.units:
                if unit.full.untyped_storage().nbytes() == 0:
                    continue  # stage 3: gathered only around forward/backward
                local = unit.full[unit.shard_lo : unit.shard_hi].float()
                err = (local - unit.master).abs() / unit.master.abs().clamp_min(1e-30)
                worst = max(worst, float(err.max()))
            run["lowp_vs_master"] = worst
            run["kernel"] = engine.zero.shard_adam is not None
            out[f"{stage}-{'torch' if torch_adam else 'zray'}"] = run
    return out


def shard_adam_resume(save_dir: str) -> dict[int, dict[str, Any]]:
    """resume_matches in bf16, where the GPU Adam kernel steps (see test_shard_adam.py)."""
    _model_kernels_off_on_cpu()
    return {
        stage: resume_matches(stage, f"{save_dir}/stage{stage}", bf16={"enabled": True})
        for stage in (1, 3)
    }

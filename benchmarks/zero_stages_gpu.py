"""Train a GPT at ZeRO stages 0-3 on all local GPUs (or CPU processes) and print a table.

    torchrun --nproc_per_node 2 benchmarks/zero_stages_gpu.py --model gpt_1b --steps 20
    python -m zray.launch --nproc 2 benchmarks/zero_stages_gpu.py --model tiny --device cpu

For each stage: loss at the first and last step, median step time, tokens/s per device, peak
memory per device, and the engine's own account of bytes held for parameters, gradients and
optimizer states. Writes the rows as JSON to --out. This checks that the stages train and what
they hold; speed comparisons against other engines live in benchmarks/gpt_throughput.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import torch

import zray
from zray.models import gpt as gpt_models
from zray.models.data import lm_batch, synthetic_tokens


def run_stage(args: argparse.Namespace, stage: int, ctx: zray.ParallelContext) -> dict[str, Any]:
    cfg = getattr(gpt_models, args.model)()
    if args.seq_len:
        cfg = cfg.with_(seq_len=args.seq_len)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = gpt_models.GPT(cfg)
    n_params = model.num_params()
    ds = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": args.dtype == "bf16"},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.1}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_num_steps": 5, "warmup_type": "linear"},
        },
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**6,
    }
    engine, *_ = zray.initialize(model=model, config=ds)
    rank, world = ctx.dp_rank, ctx.dp_size
    b = args.micro_batch
    tokens = synthetic_tokens(args.steps * b * world, cfg.seq_len, cfg.vocab_size, seed=1)
    times, losses = [], []
    for step in range(args.steps):
        start = (step * world + rank) * b
        batch = {k: v.to(ctx.device) for k, v in lm_batch(tokens[start : start + b]).items()}
        if ctx.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())  # host sync: the step is over
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[2:]) if len(times) > 3 else statistics.median(times)
    row = {
        "stage": stage,
        "world": world,
        "params": n_params,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "step_s": step_s,
        "tokens_per_s_per_device": b * cfg.seq_len / step_s,
        "held_gb": {k: v / 2**30 for k, v in engine.memory_breakdown().items()},
    }
    if ctx.is_cuda:
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del engine, model
    gc.collect()
    if ctx.is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt_1b")
    p.add_argument("--seq_len", type=int, default=0)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default="")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    ctx = zray.init_distributed(dist_backend=backend)
    rows = []
    for s in args.stages.split(","):
        rows.append(run_stage(args, int(s), ctx))
        if ctx.rank == 0:
            print("done", json.dumps(rows[-1]), flush=True)
    peaks = rows
    if ctx.is_distributed:
        gathered: list[Any] = [None] * ctx.dp_size
        torch.distributed.all_gather_object(gathered, rows)
        peaks = gathered
    if ctx.rank == 0:
        print(
            f"{'stage':>5} {'loss first->last':>18} {'step s':>7} {'tok/s/dev':>10} "
            f"{'peak GB/dev':>14} {'params/grads/optim GB (rank 0)':>32}"
        )
        for i, r in enumerate(rows):
            peak = "/".join(f"{pr[i].get('peak_gb', 0):.1f}" for pr in peaks)
            held = "/".join(f"{r['held_gb'][k]:.2f}" for k in ("params", "grads", "optimizer"))
            print(
                f"{r['stage']:>5} {r['loss_first']:>8.3f} -> {r['loss_last']:<7.3f} "
                f"{r['step_s']:>7.3f} {r['tokens_per_s_per_device']:>10.0f} {peak:>14} "
                f"{held:>32}"
            )
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"rows": rows, "all_ranks": peaks, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()

"""ZeRO-Offload on one GPU: a model that does not fit without offload trains with it.

    python benchmarks/offload_gpu.py --model gpt_6b --steps 4 --out results.json

Runs, each in a fresh process (so one run's memory never helps or hurts the next):
  1. zray ZeRO-2 without offload   -> expected to run out of GPU memory (reported, not hidden)
  2. zray ZeRO-2 + offload_optimizer cpu (pinned; zray's fused CPU Adam)
  3. DeepSpeed ZeRO-2 + offload_optimizer cpu (DeepSpeedCPUAdam), same model, batch and data
Same GPT, bf16, AdamW, activation checkpointing on every block, micro-batch --micro x sequence,
no accumulation. Prints a table (step seconds, tokens/s, peak GPU GB, host RSS GB) and writes
JSON. `--engine zray|deepspeed --offload 0|1` runs one configuration (used internally).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch


def ds_config(micro: int, offload: bool, lr: float) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 500_000_000,
    }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.1}},
        "zero_optimization": zero,
        "steps_per_print": 10**6,
        "wall_clock_breakdown": False,
    }


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    from zray.activation_checkpointing import apply_activation_checkpointing
    from zray.models import gpt
    from zray.models.data import lm_batch, synthetic_tokens

    cfg = getattr(gpt, args.model)()
    if args.n_layer:
        cfg = cfg.with_(n_layer=args.n_layer)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    with dev:
        model = gpt.GPT(cfg)
    apply_activation_checkpointing(model, "blocks")
    n_params = model.num_params()
    ds = ds_config(args.micro, bool(args.offload), args.lr)
    t_init = time.perf_counter()
    if args.engine == "zray":
        import zray

        engine, *_ = zray.initialize(model=model, config=ds)
    else:
        import deepspeed

        ds["optimizer"]["params"]["torch_adam"] = False  # DeepSpeedCPUAdam on the host
        deepspeed.init_distributed()
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds
        )
    init_s = time.perf_counter() - t_init
    tokens = synthetic_tokens(args.steps * args.micro, cfg.seq_len, cfg.vocab_size, seed=1)
    times, losses = [], []
    for step in range(args.steps):
        batch = {
            k: v.to(dev)
            for k, v in lm_batch(tokens[step * args.micro : (step + 1) * args.micro]).items()
        }
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))  # host sync: the step is done
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {
        "engine": args.engine,
        "offload": bool(args.offload),
        "params": n_params,
        "init_s": init_s,
        "step_s": step_s,
        "steps": times,
        "tokens_per_s": args.micro * cfg.seq_len / step_s,
        "losses": losses,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0,
        "host_rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt_6b")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--n_layer", type=int, default=0, help="override the model's depth")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--engine", choices=["zray", "deepspeed"], default=None)
    p.add_argument("--offload", type=int, default=1)
    p.add_argument("--runs", default="zray:0,zray:1,deepspeed:1")
    p.add_argument("--timeout", type=float, default=420)
    p.add_argument("--out", default="")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    if args.engine:
        try:
            row = one_run(args)
        except torch.OutOfMemoryError as e:
            row = {
                "engine": args.engine,
                "offload": bool(args.offload),
                "oom": str(e)[:300],
                "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30
                if torch.cuda.is_available()
                else 0.0,
            }
        print("ROW " + json.dumps(row), flush=True)
        return
    rows = []
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29611",
    )
    for spec in args.runs.split(","):
        engine, offload = spec.split(":")
        cmd = [
            sys.executable,
            __file__,
            "--engine",
            engine,
            "--offload",
            offload,
            "--model",
            args.model,
            "--micro",
            str(args.micro),
            "--steps",
            str(args.steps),
            "--lr",
            str(args.lr),
            "--device",
            args.device,
            "--n_layer",
            str(args.n_layer),
        ]
        t0 = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            found = [ln[4:] for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
            row = (
                json.loads(found[-1])
                if found
                else {
                    "engine": engine,
                    "offload": offload == "1",
                    # -9: killed, e.g. by the kernel's OOM killer when host memory runs out
                    "error": f"exit code {out.returncode}: " + (out.stderr or out.stdout)[-1500:],
                }
            )
        except subprocess.TimeoutExpired:
            row = {"engine": engine, "offload": offload == "1", "error": "timeout"}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "steps"})[:600], flush=True)
    print(
        f"{'engine':>10} {'offload':>8} {'step s':>8} {'tokens/s':>9} {'peak GPU GB':>12} "
        f"{'host RSS GB':>12} {'init s':>7}"
    )
    for r in rows:
        if "step_s" in r:
            print(
                f"{r['engine']:>10} {r['offload']!s:>8} {r['step_s']:>8.2f} "
                f"{r['tokens_per_s']:>9.0f} {r['peak_gpu_gb']:>12.1f} "
                f"{r['host_rss_peak_gb']:>12.1f} {r['init_s']:>7.1f}"
            )
        else:
            why = "out of GPU memory" if "oom" in r else r.get("error", "?").strip()[-200:]
            print(f"{r['engine']:>10} {r['offload']!s:>8} {why}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

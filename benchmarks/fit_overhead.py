"""What `zray.fit` costs over the engine alone: the same model, config and data both ways.

    python benchmarks/fit_overhead.py --device cuda --size gpt_125m --seq 1024 --micro-batch 8 \
        --stage 2 --steps 60 --warmup 20 --replica default 1 --out fit_125m.json
    python benchmarks/fit_overhead.py --device cpu --workers 4 --size tiny \
        --model-kwargs '{"vocab_size": 16384, "d_model": 512, "n_layer": 14, "n_head": 8}' \
        --seq 128 --micro-batch 1 --stage 2 --steps 16 --warmup 4 --out fit_cpu.json

engine: `python -m zray.launch --nproc N` runs this file as a plain script: zray.initialize and
`engine.train_batch` over micro-batches already on the device (the same rows, in the same order,
as fit reads them: the same Parquet file, sampler and seed), timed with a device sync at the end
of warm-up and at the end. fit: `zray.fit` on an embedded Ray cluster with that config and file;
its steady-state rate comes from rank 0's `FitResult.step_times` (when each step's values came
back from the device) over the same steps. Each `--replica` value is one fit run
(`default` leaves zray.replica_interval unset); the achieved copy interval is reported.
`--trainer` adds a third way: fit's training loop (`zray.trainer.Trainer`) under zray.launch,
without Ray and without state copies, to tell the loop's cost from the Ray actor's.
`--engine-delays-ms 0 2 5` runs the engine again with the host sleeping that long after each
step: if the rate does not fall, the device is the bottleneck and host work between steps is
free; if it does, the engine is host-bound and every millisecond fit adds per step costs.

Prints a table (tokens/s of both, the ratio, the copy interval; medians over --repeats
interleaved rounds) and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch


def ds_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro_batch * args.workers,
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
        },
        "zero_optimization": {"stage": args.stage},
        "steps_per_print": 10**9,
    }
    if args.device == "cuda":
        cfg["bf16"] = {"enabled": True}
    return cfg


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"size": args.size, "seq_len": args.seq, **json.loads(args.model_kwargs)}


def tokens_per_step(args: argparse.Namespace) -> int:
    return args.micro_batch * args.workers * args.seq


# ---- the engine alone (one process per rank, under zray.launch) ---------------------------------


def engine_worker(args: argparse.Namespace) -> None:
    import zray
    from zray.data import GlobalBatchSampler, RankBatches, as_source
    from zray.data.collate import collate_for
    from zray.models.gpt import build

    ctx = zray.init_distributed(backend="nccl" if args.device == "cuda" else "gloo")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(**model_kwargs(args))
    engine, *_ = zray.initialize(model=model, config=ds_config(args))
    b = engine.batch
    source = as_source(args.data)
    sampler = GlobalBatchSampler(len(source), b.train_batch_size, seed=0)
    collate = collate_for(model, source.columns)  # labels = input_ids, as fit derives them
    rows = RankBatches(
        source, sampler, ctx.dp_rank, ctx.dp_size, b.micro_batch_per_gpu, 1, "cpu", collate
    )
    # Every micro-batch on the device before timing: the engine's speed without any data cost.
    batches = [{k: v.to(ctx.device) for k, v in next(rows).items()} for _ in range(args.steps)]
    it = iter(batches)

    def sync() -> None:
        if ctx.is_cuda:
            torch.cuda.synchronize()
        if ctx.is_distributed:
            torch.distributed.barrier()

    sync()
    t_start = time.perf_counter()
    t_warm = t_start
    loss = None
    for step in range(1, args.steps + 1):
        loss = engine.train_batch(it)
        if args.host_delay_ms:
            time.sleep(args.host_delay_ms / 1000)
        if step == args.warmup:
            sync()
            t_warm = time.perf_counter()
    sync()
    t_end = time.perf_counter()
    if ctx.rank == 0:
        steady = (args.steps - args.warmup) * tokens_per_step(args) / (t_end - t_warm)
        out = {
            "tokens_per_s": steady,
            "tokens_per_s_with_warmup": args.steps * tokens_per_step(args) / (t_end - t_start),
            "final_loss": float(loss) if loss is not None else None,
        }
        with open(args.result, "w") as f:
            json.dump(out, f)


def run_engine(args: argparse.Namespace, data: str, delay_ms: float = 0.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "engine.json")
        cmd = [
            sys.executable,
            "-m",
            "zray.launch",
            "--nproc",
            str(args.workers),
            os.path.abspath(__file__),
            *sys.argv[1:],
            "--as-engine-worker",
            "--data",
            data,
            "--result",
            result,
            "--host-delay-ms",
            str(delay_ms),
        ]
        env = dict(os.environ)
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(args.threads)  # as Ray sets it for a 1-CPU actor
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        with open(result) as f:
            out = json.load(f)
        out["wall_s"] = time.perf_counter() - t0
        out["host_delay_ms"] = delay_ms
        return out


# ---- the Trainer without Ray (zray.launch) ------------------------------------------------------


def run_trainer(args: argparse.Namespace, data: str) -> dict[str, Any]:
    """fit's training loop (zray.trainer.Trainer) under `python -m zray.launch`, no Ray: what the
    loop costs, apart from what running it inside a Ray actor costs. No state copies (they need
    a holder, which only the Ray runtime provides)."""
    cfg = ds_config(args)
    cfg["zray"] = {
        "model": "zray.models.gpt:build",
        "model_kwargs": model_kwargs(args),
        "data": data,
        "num_workers": args.workers,
        "use_gpu": args.device == "cuda",
        "max_steps": args.steps,
        "replica_interval": 0,
    }
    trainer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zray", "trainer.py")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ)
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, "-m", "zray.launch", "--nproc", str(args.workers), trainer, path]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    times = [tuple(x) for x in result["step_times"]]
    kept = [(s, t) for s, t in times if s >= times[0][0] + args.warmup]
    (s0, t0_), (s1, t1) = kept[0], kept[-1]
    return {
        "tokens_per_s": (s1 - s0) * tokens_per_step(args) / (t1 - t0_),
        "wall_s": time.perf_counter() - t0,
        "step_times": times,
    }


# ---- zray.fit --------------------------------------------------------------------------------


def run_fit(args: argparse.Namespace, data: str, replica: str) -> dict[str, Any]:
    import zray

    cfg = ds_config(args)
    run: dict[str, Any] = {
        "model": "zray.models.gpt:build",
        "model_kwargs": model_kwargs(args),
        "num_workers": args.workers,
        "use_gpu": args.device == "cuda",
        "max_steps": args.steps,
        "metrics_port": None,
    }
    if replica != "default":
        run["replica_interval"] = int(replica)
    cfg["zray"] = run
    before = os.environ.get("OMP_NUM_THREADS")
    if args.fit_omp_threads:
        # Ray sets OMP_NUM_THREADS=1 in a 1-CPU actor unless the cluster's environment has it
        # (zray.launch gives each process cores / nproc): the embedded cluster inherits this.
        os.environ["OMP_NUM_THREADS"] = str(args.fit_omp_threads)
    t0 = time.perf_counter()
    try:
        result = zray.fit(config=cfg, data=data, progress=False)
    finally:  # the engine and trainer runs keep their own setting
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
    wall = time.perf_counter() - t0
    return {
        "replica": replica,
        "tokens_per_s": result.steady_tokens_per_s(args.warmup, tokens_per_step(args)),
        "tokens_per_s_with_warmup": result.tokens_per_s,
        "copy_interval": result.copy_interval,
        "final_loss": result.final_loss,
        "restarts": result.restarts,
        "wall_s": wall,
        "copy_stats": result.copy_stats,
        "step_times": result.step_times,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    p.add_argument("--size", default="gpt_125m")
    p.add_argument("--model-kwargs", default="{}", help="GPTConfig overrides, JSON")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--samples", type=int, default=0, help="rows of data (default: enough)")
    p.add_argument("--replica", nargs="+", default=["default"], help="default, 0, 1, ...")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of all runs")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument(
        "--engine-delays-ms",
        type=float,
        nargs="+",
        default=[0.0],
        help="engine runs with the host sleeping this long after each step (0: the reference)",
    )
    p.add_argument("--host-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--trainer", action="store_true", help="also fit's loop without Ray (zray.launch)"
    )
    p.add_argument(
        "--fit-omp-threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS in fit's workers (0: Ray's choice, 1 per 1-CPU actor)",
    )
    p.add_argument("--out", default="")
    p.add_argument("--as-engine-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # zray.launch
    args = p.parse_args()
    if args.as_engine_worker:
        engine_worker(args)
        return

    from zray.data import lm_tokens_table, write_parquet
    from zray.models.data import synthetic_tokens
    from zray.models.gpt import build

    vocab = build(**model_kwargs(args)).cfg.vocab_size
    samples = args.samples or args.micro_batch * args.workers * (args.steps + 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "tokens.parquet")
        write_parquet(lm_tokens_table(synthetic_tokens(samples, args.seq, vocab, seed=1)), data)
        rows: dict[str, Any] = {"args": vars(args), "fit": [], "engines": [], "trainers": []}
        # Interleaved, so that a machine that drifts (a noisy neighbour, clocks) drifts for
        # every run alike; the table shows each run's median over the repeats.
        for _ in range(args.repeats):
            if not args.skip_engine:
                for delay in args.engine_delays_ms:
                    rows["engines"].append(run_engine(args, data, delay))
            if args.trainer:
                rows["trainers"].append(run_trainer(args, data))
            for replica in args.replica:
                rows["fit"].append(run_fit(args, data, replica))
        plain = [e for e in rows["engines"] if not e["host_delay_ms"]]
        if plain:
            rows["engine"] = {"tokens_per_s": statistics.median(e["tokens_per_s"] for e in plain)}
    rows["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows["date"] = time.strftime("%Y-%m-%d")
    engine_rate = rows.get("engine", {}).get("tokens_per_s", float("nan"))
    print(
        f"\n{args.size} seq {args.seq} mb {args.micro_batch} stage {args.stage} "
        f"workers {args.workers} ({rows['device']}), steady state over steps "
        f"{args.warmup + 1}-{args.steps}"
    )
    print(f"{'run':<22} {'tokens/s':>12} {'x engine':>9} {'copy interval':>14}")
    print(f"{'engine':<22} {engine_rate:>12,.0f} {1.0:>9.3f} {'-':>14}")
    for delay in [d for d in args.engine_delays_ms if d]:
        runs = [e for e in rows["engines"] if e["host_delay_ms"] == delay]
        rate = statistics.median(e["tokens_per_s"] for e in runs)
        name = f"engine +{delay:g} ms host"
        print(f"{name:<22} {rate:>12,.0f} {rate / engine_rate:>9.3f} {'-':>14}")
    if rows["trainers"]:
        rate = statistics.median(r["tokens_per_s"] for r in rows["trainers"])
        print(f"{'trainer, no Ray':<22} {rate:>12,.0f} {rate / engine_rate:>9.3f} {'-':>14}")
    for replica in args.replica:
        runs = [r for r in rows["fit"] if r["replica"] == replica]
        rate = statistics.median(r["tokens_per_s"] for r in runs)
        intervals = [r["copy_interval"] for r in runs if r["copy_interval"]]
        interval = f"{statistics.median(intervals):.1f}" if intervals else "-"
        name = f"fit replica={replica}"
        print(f"{name:<22} {rate:>12,.0f} {rate / engine_rate:>9.3f} {interval:>14}")
    if args.repeats > 1:
        each = [f"{e['tokens_per_s']:,.0f}" for e in rows["engines"] if not e["host_delay_ms"]]
        print(f"each engine run: {', '.join(each)}")
        if rows["trainers"]:
            each = [f"{e['tokens_per_s']:,.0f}" for e in rows["trainers"]]
            print(f"each trainer run: {', '.join(each)}")
        for replica in args.replica:
            each = [f"{r['tokens_per_s']:,.0f}" for r in rows["fit"] if r["replica"] == replica]
            print(f"each fit replica={replica} run: {', '.join(each)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

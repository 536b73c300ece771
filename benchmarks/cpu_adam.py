"""CPU Adam step throughput: zray's kernel vs torch.optim.AdamW and DeepSpeedCPUAdam.

    python benchmarks/cpu_adam.py                      # 50M parameters, all variants
    python benchmarks/cpu_adam.py --numel 1000000 --steps 3 --no-deepspeed   # a quick look

Two groups of variants, each stepping one flat tensor of N float32 parameters:

- plain: float32 gradient in, nothing out. zray CPUAdam.step (and its forced scalar body, to
  show what the SIMD bodies buy), torch.optim.AdamW(fused=True), torch.optim.AdamW(foreach=True),
  DeepSpeedCPUAdam.
- offload: what ZeRO-Offload does per step on the CPU: a bf16 gradient arrives, is multiplied
  by one factor (unscale x clip x 1/world), the fp32 master and moments are stepped, and the
  bf16 copy of the new parameter is written for the trip back to the GPU. zray does it in one
  pass (CPUAdam.step_fused); torch and DeepSpeed 0.19.8 (whose CPUAdam has no 16-bit
  copy-out) need a sequence of ops, timed as a whole.

Method: every variant gets its own freshly allocated parameter, moment and output buffers (the
read-only gradients are shared); the variants run interleaved, one step each per round, so a
busy neighbour on a shared machine slows all of them alike; the first --warmup rounds are
dropped and the median of the next --steps rounds is reported. Bytes per parameter count what
each variant's passes must read plus write (not the write-allocate reads a CPU may add), so
bytes x params / time is the bandwidth it reaches; it is set against a large torch copy
(read + write) measured the same way. Threads: torch.get_num_threads() for torch and zray;
DeepSpeed's OpenMP loop uses OMP_NUM_THREADS (set to the same count here before it loads).

Prints a table and writes JSON (--json). Needs `pip install deepspeed ninja` for DeepSpeed
(its op JIT-builds on first use, ~1 minute, not timed); without it those rows say why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
GRAD_SCALE = 1.0 / 1024  # e.g. 1 / loss_scale; the value does not change the speed


@dataclass
class Variant:
    """One way to do a step: `step()` does it once on this variant's own buffers."""

    name: str
    group: str  # "plain" or "offload"
    bytes_per_param: int | None  # read + write of its passes; None: not counted
    step: Callable[[], None]
    note: str = ""
    times: list[float] = field(default_factory=list)


def _machine() -> dict[str, Any]:
    """CPU model, cores, ISA flags that matter here, load average, date."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("Flags", "").split())
        info.update(
            model=fields.get("Model name"),
            cpus=fields.get("CPU(s)"),
            threads_per_core=fields.get("Thread(s) per core"),
            l3=fields.get("L3 cache"),
            isa=sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bf16", "avx512_bf16"}),
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        info["lscpu_error"] = str(exc)
    info["loadavg_before"] = os.getloadavg()
    info["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return info


def _fresh(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A parameter and two moments of n float32 elements, newly allocated and touched."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.zeros(n), torch.zeros(n)


def _zray_variants(n: int, grad32: torch.Tensor, grad16: torch.Tensor) -> list[Variant]:
    from zray import ops

    out: list[Variant] = []
    p, _, _ = _fresh(n, 1)
    param = torch.nn.Parameter(p)
    param.grad = grad32
    opt = ops.CPUAdam([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    isa = ops.kernel_report()["isa"]["adam_step"]
    out.append(Variant(f"zray CPUAdam.step ({isa})", "plain", 28, opt.step))

    p, m, v = _fresh(n, 2)
    steps = [0]

    def scalar_step() -> None:
        steps[0] += 1
        ops.adam_step(p, grad32, m, v, step=steps[0], lr=LR, betas=BETAS, eps=EPS,
                      weight_decay=WD, isa="scalar")  # fmt: skip

    out.append(Variant("zray adam_step (scalar body)", "plain", 28, scalar_step))

    p, _, _ = _fresh(n, 3)
    fused_opt = ops.CPUAdam([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    low = torch.empty(n, dtype=torch.bfloat16)
    out.append(
        Variant(
            f"zray CPUAdam.step_fused ({isa})",
            "offload",
            2 + 12 + 12 + 2,  # read bf16 grad, p, m, v; write p, m, v, bf16 copy
            lambda: fused_opt.step_fused([grad16], GRAD_SCALE, [low]),
        )
    )
    return out


def _torch_variants(n: int, grad32: torch.Tensor, grad16: torch.Tensor) -> list[Variant]:
    out: list[Variant] = []
    for name, kwargs in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
        param = torch.nn.Parameter(_fresh(n, 10)[0])
        param.grad = grad32
        opt = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kwargs)
        note = "" if name == "fused" else "several passes; bytes not counted"
        nbytes = 28 if name == "fused" else None
        out.append(Variant(f"torch AdamW({name}=True)", "plain", nbytes, opt.step, note))

    # Offload, sequence A: widen, scale, fused step, narrow.
    param_a = torch.nn.Parameter(_fresh(n, 11)[0])
    param_a.grad = torch.empty(n)
    opt_a = torch.optim.AdamW([param_a], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    low_a = torch.empty(n, dtype=torch.bfloat16)

    def seq_a() -> None:
        param_a.grad.copy_(grad16)  # read 2, write 4
        param_a.grad.mul_(GRAD_SCALE)  # read 4, write 4
        opt_a.step()  # read 16, write 12
        low_a.copy_(param_a.detach())  # read 4, write 2

    out.append(
        Variant("torch: grad.float, mul_, AdamW fused, to bf16", "offload", 6 + 8 + 28 + 6, seq_a)
    )

    # Offload, sequence B: the fused step's own unscale (GradScaler's path), which divides the
    # gradient by grad_scale inside the step and writes it back.
    param_b = torch.nn.Parameter(_fresh(n, 12)[0])
    param_b.grad = torch.empty(n)
    opt_b = torch.optim.AdamW([param_b], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    opt_b.grad_scale = torch.tensor(1.0 / GRAD_SCALE)  # type: ignore[attr-defined]
    opt_b.found_inf = torch.tensor(0.0)  # type: ignore[attr-defined]
    low_b = torch.empty(n, dtype=torch.bfloat16)

    def seq_b() -> None:
        param_b.grad.copy_(grad16)  # read 2, write 4
        opt_b.step()  # read 16, write 16 (the unscaled gradient is stored back)
        low_b.copy_(param_b.detach())  # read 4, write 2

    out.append(
        Variant(
            "torch: grad.float, AdamW fused w/ grad_scale, to bf16", "offload", 6 + 32 + 6, seq_b
        )
    )
    return out


def _deepspeed_variants(n: int, grad32: torch.Tensor, grad16: torch.Tensor) -> list[Variant]:
    """DeepSpeedCPUAdam rows; raises with the reason when DeepSpeed or its op is unusable."""
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    t0 = time.perf_counter()
    warm = torch.nn.Parameter(torch.zeros(16))
    warm.grad = torch.zeros(16)
    DeepSpeedCPUAdam([warm]).step()  # JIT-builds (or loads the cached) op: not timed below
    build_s = time.perf_counter() - t0

    out: list[Variant] = []
    param = torch.nn.Parameter(_fresh(n, 20)[0])
    param.grad = grad32
    opt = DeepSpeedCPUAdam([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)
    out.append(
        Variant(
            f"DeepSpeedCPUAdam.step ({deepspeed.__version__})",
            "plain",
            28,
            opt.step,
            f"op load or JIT build before timing: {build_s:.0f} s",
        )
    )

    param_o = torch.nn.Parameter(_fresh(n, 21)[0])
    param_o.grad = torch.empty(n)
    opt_o = DeepSpeedCPUAdam(
        [param_o], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True
    )
    low = torch.empty(n, dtype=torch.bfloat16)

    def seq() -> None:
        # ZeRO-Offload with DeepSpeedCPUAdam: fp32 grads, unscale_and_clip_grads' mul_, step,
        # then the 16-bit copy of the master (0.19.8 has no fused copy-out).
        param_o.grad.copy_(grad16)
        param_o.grad.mul_(GRAD_SCALE)
        opt_o.step()
        low.copy_(param_o.detach())

    out.append(
        Variant("DeepSpeed: grad.float, mul_, CPUAdam, to bf16", "offload", 6 + 8 + 28 + 6, seq)
    )
    return out


def _bandwidth_references(n: int) -> list[Variant]:
    """A large copy (what the brief compares with) and an in-place read-modify-write, which is
    the Adam step's own access pattern: a copy's destination lines are also read before they
    are written (write-allocate), an in-place update's were read anyway. Both count 8 B."""
    src, dst = torch.randn(n), torch.empty(n)
    inplace = torch.randn(n)
    return [
        Variant("torch copy_ (read + write)", "bandwidth", 8, lambda: dst.copy_(src)),
        Variant(
            "torch mul_(1.0) in place (read + write)", "bandwidth", 8, lambda: inplace.mul_(1.0)
        ),
    ]


def _run(variants: list[Variant], warmup: int, steps: int) -> None:
    for r in range(warmup + steps):
        for v in variants:
            t0 = time.perf_counter()
            v.step()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                v.times.append(elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=50_000_000)
    parser.add_argument("--steps", type=int, default=9, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: torch.get_num_threads()")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # DeepSpeed's OpenMP loop, once it loads
    machine = _machine()
    n = args.numel

    from zray import ops

    report = ops.kernel_report()
    if report["kernels"]["adam_step"] != "compiled":
        print(f"warning: zray._C not built ({report['error']}): timing the reference", flush=True)

    g = torch.Generator().manual_seed(0)
    grad32 = torch.randn(n, generator=g)
    grad16 = grad32.to(torch.bfloat16)

    variants = _zray_variants(n, grad32, grad16) + _torch_variants(n, grad32, grad16)
    deepspeed_error = None
    if not args.no_deepspeed:
        try:
            variants += _deepspeed_variants(n, grad32, grad16)
        except Exception as exc:  # report why, keep the other rows
            deepspeed_error = f"{type(exc).__name__}: {exc}"
            print(f"DeepSpeed rows skipped: {deepspeed_error}", flush=True)
    else:
        deepspeed_error = "--no-deepspeed"
    copy_n = max(n, 100_000_000)  # >= 800 MB moved per copy: far beyond any cache
    references = _bandwidth_references(copy_n)
    gc.collect()

    _run(variants + references, args.warmup, args.steps)
    machine["loadavg_after"] = os.getloadavg()

    copy_gbs, inplace_gbs = (8 * copy_n / statistics.median(v.times) / 1e9 for v in references)
    baseline = {
        "plain": next(v for v in variants if v.name == "torch AdamW(fused=True)"),
        "offload": min(
            (v for v in variants if v.group == "offload" and v.name.startswith("torch")),
            key=lambda v: statistics.median(v.times),
        ),
    }
    rows = []
    for v in sorted(variants, key=lambda v: v.group != "plain"):  # plain rows first
        med = statistics.median(v.times)
        gbs = None if v.bytes_per_param is None else v.bytes_per_param * n / med / 1e9
        rows.append(
            {
                "group": v.group,
                "variant": v.name,
                "median_ms": med * 1e3,
                "min_ms": min(v.times) * 1e3,
                "params_per_s": n / med,
                "speedup_vs_torch": statistics.median(baseline[v.group].times) / med,
                "bytes_per_param": v.bytes_per_param,
                "gb_per_s": gbs,
                "of_copy_bandwidth": None if gbs is None else gbs / copy_gbs,
                "note": v.note,
            }
        )

    print(
        f"\n{n:,} float32 parameters, {threads} threads, median of {args.steps} steps "
        f"after {args.warmup} warm-up; load average {machine['loadavg_before'][0]:.2f} before, "
        f"{machine['loadavg_after'][0]:.2f} after"
    )
    print(
        f"bandwidth, {8 * copy_n / 1e9:.1f} GB read + written: torch copy_ {copy_gbs:.1f} GB/s, "
        f"in-place mul_ {inplace_gbs:.1f} GB/s"
    )
    header = "| group | variant | median ms | Mparams/s | vs torch | B/param | GB/s | of copy |"
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        gb = "-" if r["gb_per_s"] is None else f"{r['gb_per_s']:.1f}"
        frac = "-" if r["of_copy_bandwidth"] is None else f"{r['of_copy_bandwidth']:.2f}"
        nb = "-" if r["bytes_per_param"] is None else str(r["bytes_per_param"])
        print(
            f"| {r['group']} | {r['variant']} | {r['median_ms']:.1f} | "
            f"{r['params_per_s'] / 1e6:.0f} | {r['speedup_vs_torch']:.2f}x | {nb} | {gb} | {frac} |"
        )
    print(f"'vs torch': plain rows against torch AdamW(fused=True); offload rows against "
          f"the faster torch sequence ({baseline['offload'].name}).")  # fmt: skip
    if deepspeed_error:
        print(f"DeepSpeed: not measured: {deepspeed_error}")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "numel": n,
        "threads": threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "zray_kernels": report,
        "machine": machine,
        "copy_gb_per_s": copy_gbs,
        "inplace_rmw_gb_per_s": inplace_gbs,
        "deepspeed_error": deepspeed_error,
        "rows": rows,
        "times_s": {v.name: v.times for v in variants + references},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

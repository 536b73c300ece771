"""One Adam step on a GPU shard: zray's kernel vs the torch ops it replaces.

    python benchmarks/adam_step_gpu.py --numel 400000000

What a bf16 ZeRO step has to do per parameter: read the reduced bf16 gradient, scale it by one
device scalar (unscale x clip x 1/N), update the fp32 master and moments, and leave a bf16 copy
of the new weight for the next forward. Variants, each on its own buffers:

- torch (zray before): widen the gradient to fp32 (`.float()`), torch.optim.AdamW(fused=True)
  with `grad_scale`, copy the master into the bf16 parameters: 6 + 28 + 6 = 40 bytes/param.
- torch fused AdamW alone, fp32 gradient given: 28 bytes/param (what the step costs if the
  gradient were already fp32 and no copy were needed).
- zray (zray/ops/gpu_adam.py): one pass, 2 + 12 read, 12 + 2 written = 28 bytes/param.
- copy: a device-to-device copy of the same byte count as the fp32 master, read + write, for
  the bandwidth ceiling.

Median of --steps timed repetitions (CUDA events) after --warmup; prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _cuda_timing import timed  # benchmarks/ is the script directory

from zray.ops import gpu_adam

KW = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def torch_rows(
    n: int, grad16: torch.Tensor, scale: torch.Tensor, warmup: int, steps: int
) -> list[tuple[str, int, float]]:
    """The torch variants, on buffers freed when this returns."""
    p = torch.randn(n, device=grad16.device).requires_grad_(True)
    lowp = torch.empty_like(grad16)
    opt = torch.optim.AdamW([p], lr=KW["lr"], betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    opt.grad_scale = scale.reciprocal()

    def torch_path() -> None:  # as zray stepped before: widen, fused step, copy out
        p.grad = grad16.float()
        opt.step()
        lowp.copy_(p.detach())

    rows = [("torch: widen + fused AdamW + copy out", 40, timed(torch_path, warmup, steps))]
    p.grad = grad16.float()
    rows.append(("torch fused AdamW alone (fp32 grad)", 28, timed(opt.step, warmup, steps)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=400_000_000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--tiles", default="2048x8", help="zray kernel launch shapes to time, ELEMENTSxWARPS,..."
    )
    args = ap.parse_args()
    dev = torch.device("cuda")
    n = args.numel
    gen = torch.Generator(device=dev).manual_seed(0)
    grad16 = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)
    scale = torch.full((1,), 0.5, device=dev)
    rows = []

    rows += torch_rows(n, grad16, scale, args.warmup, args.steps)
    torch.cuda.empty_cache()

    q = torch.randn(n, device=dev, generator=gen)
    m, v, low = torch.zeros_like(q), torch.zeros_like(q), torch.empty_like(grad16)
    step = torch.zeros(1, device=dev)

    def zray_path() -> None:
        step.add_(1)
        gpu_adam.adam_step_(q, grad16, m, v, step, scale, decoupled=True, lowp=low, **KW)

    for tile in args.tiles.split(","):
        block, warps = (int(x) for x in tile.split("x"))
        gpu_adam._BLOCK, gpu_adam._WARPS = block, warps  # read at each launch
        name = f"zray kernel (bf16 grad in, bf16 copy out), {block} x {warps} warps"
        rows.append((name, 28, timed(zray_path, args.warmup, args.steps)))
    src = torch.empty(n, device=dev)
    dst = torch.empty_like(src)
    rows.append(("copy fp32 (ceiling)", 8, timed(lambda: dst.copy_(src), args.warmup, args.steps)))

    print(f"{torch.cuda.get_device_name()}, {n:,} parameters")
    print("| variant | bytes/param | ms | GB/s |")
    print("|---|---|---|---|")
    out = []
    for name, b, t in rows:
        print(f"| {name} | {b} | {t * 1e3:.2f} | {b * n / t / 1e9:,.0f} |")
        out.append({"variant": name, "bytes_per_param": b, "seconds": t})
    if args.json:
        args.json.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "numel": n, "rows": out}, indent=1)
        )


if __name__ == "__main__":
    main()

"""LayerNorm forward + backward on the GPT's activations: zray's Triton kernels vs torch.

    python benchmarks/layernorm_gpu.py            # [16384, 2048] bf16, as in the 1.35B GPT

Two cases, each timed as torch runs it and as zray's kernels run it:
- norm: y = LayerNorm(x) (the block's ln1, the final ln_f);
- add + norm: s = x + r, y = LayerNorm(s) (the block's ln2 after the attention's residual add),
  backward with gradients arriving for both s and y.
Bytes counted (bf16, one read or write each; fp32 row statistics and the weight/bias gradient
partials left out): norm forward 2 tensors, backward 3; add + norm forward 4, backward 4
(zray: s, dy, ds read, dx written; torch: its norm backward plus the add of the two gradients).
Median over --steps of CUDA-event timings after --warmup; prints a table.
"""

from __future__ import annotations

import argparse

import torch
from _cuda_timing import timed  # benchmarks/ is the script directory

from zray.ops import gpu_layernorm as ln


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    n = args.rows * args.cols
    x = torch.randn(args.rows, args.cols, device=dev, dtype=dt, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.ones(args.cols, device=dev, dtype=dt, requires_grad=True)
    b = torch.zeros(args.cols, device=dev, dtype=dt, requires_grad=True)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    print(f"{torch.cuda.get_device_name()}, [{args.rows}, {args.cols}] bf16")
    print("| case | impl | forward ms | backward ms | forward GB/s | backward GB/s |")
    print("|---|---|---|---|---|---|")
    for case, fwd_t, bwd_t in (("norm", 2, 3), ("add + norm", 4, 4)):
        for name, fn in (("torch", ln.layer_norm_reference), ("zray", ln.layer_norm)):
            res = r if case == "add + norm" else None

            def forward(fn=fn, res=res) -> object:  # noqa: ANN001
                return fn(x, w, b, 1e-5, residual=res)

            def both(forward=forward, res=res) -> None:  # noqa: ANN001
                out = forward()
                # autograd.grad: no accumulation into .grad, which would add a pass to both
                if res is None:
                    torch.autograd.grad([out], [x, w, b], [dy])
                else:
                    torch.autograd.grad(list(out), [x, r, w, b], [ds, dy])

            with torch.no_grad():
                f = timed(forward, args.warmup, args.steps)
            fb = timed(both, args.warmup, args.steps)
            bwd = fb - f
            print(
                f"| {case} | {name} | {f * 1e3:.3f} | {bwd * 1e3:.3f} | "
                f"{fwd_t * 2 * n / f / 1e9:,.0f} | {bwd_t * 2 * n / bwd / 1e9:,.0f} |"
            )


if __name__ == "__main__":
    main()

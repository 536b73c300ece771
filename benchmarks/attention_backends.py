"""Causal attention forward + backward time per torch SDPA backend, on one GPU.

    python benchmarks/attention_backends.py                       # the 1.35B GPT's shape
    python benchmarks/attention_backends.py --batch 4 --seq 4096

Prints, per backend (flash, efficient, cudnn) that accepts the shape: milliseconds for one
forward + backward and TFLOP/s counting the causal half that is computed (2 * 2 * B * T^2 * D
forward... / 2, backward 2.5x forward: the convention of the FlashAttention papers). The GPT
benchmark's MFU counts the full T^2 (PaLM), so a faster kernel shows up there as model FLOPs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def time_backend(
    backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, iters: int
) -> float:
    """Mean seconds of one causal forward + backward under ``backend`` alone."""
    grad = torch.randn_like(q)
    with sdpa_kernel(backend):
        for _ in range(3):  # warm-up: plan caches, autotuning
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    shape = (a.batch, a.heads, a.seq, a.head_dim)
    q, k, v = (
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    # forward 4 B H T^2 Dh, half of it under the causal mask; backward 2.5x forward.
    flops = 4 * a.batch * a.heads * a.seq**2 * a.head_dim / 2 * 3.5
    print(
        f"{torch.cuda.get_device_name()} torch {torch.__version__} "
        f"cudnn {torch.backends.cudnn.version()} shape B,H,T,Dh={shape} bf16 causal"
    )
    for name, backend in BACKENDS.items():
        try:
            s = time_backend(backend, q, k, v, a.iters)
        except RuntimeError as e:  # the backend refuses this shape / GPU
            print(f"{name:10s} unavailable: {str(e).splitlines()[0][:120]}")
            continue
        print(f"{name:10s} {1e3 * s:7.3f} ms fwd+bwd  {flops / s / 1e12:6.0f} TFLOP/s")


if __name__ == "__main__":
    main()

"""GELU after a linear layer, with that layer's bias gradient formed by the GELU-gradient kernel.

Why: in the 1.35B GPT's step on one H100, the bias gradients took 6.8 ms, column sums of each
linear layer's output gradient launched as separate reductions; the largest is the MLP's up
projection (its output gradient is [16384, 8192] bf16, 268 MB per layer). That gradient is
exactly what GELU's backward writes, so the kernel here sums its columns while the tile is
in registers (per row block, into fp32 partials reduced after) and the separate pass goes.

`linear_gelu(x, w, b)` is GELU(x @ w.T + b) (exact, erf form, as nn.GELU()); forward is
torch's (one cuBLAS call with the bias in its epilogue, then torch's GELU), saving what autograd
would: x, the pre-activation, the weight. Backward: the kernel writes d(pre) and the bias
partials; the weight and input gradients are the two matmuls autograd would run. Under CUDA
autocast the matmuls run in the autocast dtype as F.linear's would (x is cast before it is
saved, as autograd saves the cast copy).

`linear_gelu_reference` is the plain-PyTorch definition (tests, and where the kernel cannot run).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

_BLOCK_M, _BLOCK_N, _WARPS = 64, 128, 8


def available(x: torch.Tensor) -> bool:
    """True where the kernel can run on `x` (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    if triton is None or x.numel() == 0:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    # Triton reads a kernel's annotations (tl.constexpr, dtypes), so plain Python hints stay off.
    @triton.jit
    def _gelu_backward_kernel(  # noqa: ANN202
        dh_ptr,  # noqa: ANN001
        pre_ptr,  # noqa: ANN001
        dpre_ptr,  # noqa: ANN001
        part_ptr,  # noqa: ANN001
        n_rows,  # noqa: ANN001
        n_cols,  # noqa: ANN001
        BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        at = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        dh = tl.load(dh_ptr + at, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(pre_ptr + at, mask=mask, other=0.0).to(tl.float32)
        # d/dx [x * Phi(x)] = Phi(x) + x * phi(x)
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        d = (dh * (cdf + x * pdf)).to(dpre_ptr.dtype.element_ty)
        tl.store(dpre_ptr + at, d, mask=mask)
        if BIAS:
            # The bias gradient sums the stored (rounded) values, as a separate reduction of
            # d(pre) would.
            colsum = tl.sum(tl.where(mask, d.to(tl.float32), 0.0), axis=0)
            tl.store(part_ptr + pid_m * n_cols + cols, colsum, mask=cols < n_cols)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


class _LinearGELU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        cast = _autocast_dtype(x)
        if cast is not None:
            x = x.to(cast)  # what F.linear would compute with, and what autograd would save
        pre = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, pre)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.gelu(pre)

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, pre = ctx.saved_tensors
        n_cols = pre.shape[-1]
        pre2 = pre.reshape(-1, n_cols)
        n_rows = pre2.shape[0]
        dh2 = dh.reshape(n_rows, n_cols).contiguous()
        dpre = torch.empty_like(pre2)
        grid = (triton.cdiv(n_rows, _BLOCK_M), triton.cdiv(n_cols, _BLOCK_N))
        need_bias = ctx.has_bias and ctx.needs_input_grad[2]
        part = torch.empty(
            (grid[0], n_cols) if need_bias else (1,), dtype=torch.float32, device=pre.device
        )
        _gelu_backward_kernel[grid](
            dh2,
            pre2,
            dpre,
            part,
            n_rows,
            n_cols,
            BIAS=need_bias,
            BLOCK_M=_BLOCK_M,
            BLOCK_N=_BLOCK_N,
            num_warps=_WARPS,
        )
        w = weight.to(dpre.dtype)  # autocast: the matmuls ran in the autocast dtype
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dpre @ w).view(*pre.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[1]:
            dw = (dpre.t() @ x.reshape(n_rows, -1)).to(weight.dtype)
        if need_bias:
            db = part.sum(0).to(ctx.bias_dtype)
        return dx, dw, db


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU(x @ weight.T + bias): the kernel's backward where `available(x)`, else the reference."""
    if not available(x):
        return linear_gelu_reference(x, weight, bias)
    return _LinearGELU.apply(x, weight, bias)


def linear_gelu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same function in plain PyTorch ops."""
    return F.gelu(F.linear(x, weight, bias))

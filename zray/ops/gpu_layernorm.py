"""LayerNorm over the last dimension, optionally fused with the residual add before it (Triton).

Why: in the 1.35B GPT's step on one H100, torch's LayerNorm kernels took 11.7 ms (forward
3.4, input gradient 3.9, weight/bias gradients 4.4) for 49 norms of [16384, 2048] bf16
tensors, about 1.2-1.9 TB/s; the bytes they must move take about half that at the copy
ceiling (benchmarks/RESULTS.md). Here the forward reads each row once and writes the output
plus two fp32 statistics; the backward reads the saved input and the output gradient once,
writes the input gradient, and sums the weight/bias gradients per program into fp32 partials
(one small [programs, D] reduction after). With `residual`, the pre-norm block's
`s = x + residual; y = LayerNorm(s)` runs as one kernel that writes both s and y (and the
backward adds s's own gradient to the one coming through the norm), saving a pass over s
each way.

Numerics: statistics and arithmetic in fp32; s is rounded to its storage dtype before it is
normalised, as the unfused `x + residual` then `layer_norm` does. Under CUDA autocast the output
is fp32, as autocast runs layer_norm. `layer_norm_reference` is the plain-PyTorch definition
(the tests' reference and the path everywhere the kernel cannot run).
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

_MAX_COLS = 16384  # one row per program in registers; wider rows take the reference path


def available(x: torch.Tensor) -> bool:
    """True where the kernels can run on `x` (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    if triton is None or x.shape[-1] > _MAX_COLS or x.numel() == 0:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # fp32 statistics: float64 keeps torch's kernel
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    # Triton reads a kernel's annotations (tl.constexpr, dtypes), so plain Python hints stay off.
    @triton.jit
    def _forward_kernel(  # noqa: ANN202
        x_ptr,  # noqa: ANN001
        res_ptr,  # noqa: ANN001
        s_ptr,  # noqa: ANN001
        y_ptr,  # noqa: ANN001
        w_ptr,  # noqa: ANN001
        b_ptr,  # noqa: ANN001
        mean_ptr,  # noqa: ANN001
        rstd_ptr,  # noqa: ANN001
        n_cols,  # noqa: ANN001
        eps,  # noqa: ANN001
        HAS_RES: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        at = row * n_cols + cols
        x = tl.load(x_ptr + at, mask=mask, other=0.0)
        if HAS_RES:
            s = x.to(tl.float32) + tl.load(res_ptr + at, mask=mask, other=0.0).to(tl.float32)
            s = s.to(s_ptr.dtype.element_ty)  # normalise what is stored, as unfused code does
            tl.store(s_ptr + at, s, mask=mask)
            x = s
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _backward_kernel(  # noqa: ANN202
        s_ptr,  # noqa: ANN001
        dy_ptr,  # noqa: ANN001
        ds_ptr,  # noqa: ANN001
        dx_ptr,  # noqa: ANN001
        w_ptr,  # noqa: ANN001
        mean_ptr,  # noqa: ANN001
        rstd_ptr,  # noqa: ANN001
        dw_part_ptr,  # noqa: ANN001
        db_part_ptr,  # noqa: ANN001
        n_rows,  # noqa: ANN001
        n_cols,  # noqa: ANN001
        HAS_DS: tl.constexpr,
        HAS_W: tl.constexpr,
        NEED_DW: tl.constexpr,
        NEED_DB: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        first = pid * ROWS
        for i in range(0, ROWS):
            row = first + i
            if row < n_rows:
                at = row.to(tl.int64) * n_cols + cols
                s = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
                mean = tl.load(mean_ptr + row)
                rstd = tl.load(rstd_ptr + row)
                xhat = tl.where(mask, (s - mean) * rstd, 0.0)
                if HAS_W:
                    wdy = w * dy
                else:
                    wdy = dy
                c1 = tl.sum(xhat * wdy, axis=0) / n_cols
                c2 = tl.sum(wdy, axis=0) / n_cols
                dx = (wdy - (xhat * c1 + c2)) * rstd
                if HAS_DS:
                    dx = dx + tl.load(ds_ptr + at, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                if NEED_DW:
                    dw += dy * xhat
                if NEED_DB:
                    db += dy
        if NEED_DW:
            tl.store(dw_part_ptr + pid * n_cols + cols, dw, mask=mask)
        if NEED_DB:
            tl.store(db_part_ptr + pid * n_cols + cols, db, mask=mask)


def _block(n_cols: int) -> tuple[int, int]:
    """(elements per row block, warps): a power of two >= the row, 16-byte loads per thread."""
    block = triton.next_power_of_2(n_cols)
    return block, max(1, min(16, block // 256))


def _backward_programs(x: torch.Tensor, n_rows: int) -> int:
    """Enough programs to fill the device several times over; each sums its rows' dw/db."""
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(n_rows, 8 * sms))
    return max(1, min(n_rows, 4))


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape, n_cols = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n_cols).contiguous()
        n_rows = x2.shape[0]
        if residual is not None:
            res2 = residual.reshape(-1, n_cols).contiguous()
            s2 = torch.empty_like(x2, dtype=torch.promote_types(x.dtype, residual.dtype))
        else:
            res2, s2 = x2, x2
        out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else s2.dtype
        y2 = torch.empty_like(x2, dtype=out_dtype)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, warps = _block(n_cols)
        _forward_kernel[(n_rows,)](
            x2,
            res2,
            s2,
            y2,
            x2 if weight is None else weight,
            x2 if bias is None else bias,
            mean,
            rstd,
            n_cols,
            float(eps),
            HAS_RES=residual is not None,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            BLOCK=block,
            num_warps=warps,
        )
        ctx.save_for_backward(s2, weight, bias, mean, rstd)
        ctx.has_res = residual is not None
        ctx.shape = shape
        ctx.in_dtypes = (x.dtype, None if residual is None else residual.dtype)
        y = y2.view(shape)
        if residual is None:
            return y
        return s2.view(shape), y

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        s2, weight, bias, mean, rstd = ctx.saved_tensors
        # autograd materialises a missing output gradient as zeros, so both are tensors here.
        ds, dy = grads if ctx.has_res else (None, grads[0])
        n_rows, n_cols = s2.shape
        dy2 = dy.reshape(n_rows, n_cols).contiguous()
        ds2 = ds.reshape(n_rows, n_cols).contiguous() if ds is not None else dy2
        dx2 = torch.empty_like(s2)
        programs = _backward_programs(s2, n_rows)
        rows_per_program = triton.cdiv(n_rows, programs)
        programs = triton.cdiv(n_rows, rows_per_program)
        need_dw = weight is not None and ctx.needs_input_grad[2]
        need_db = bias is not None and ctx.needs_input_grad[3]
        part = torch.empty(
            (2, programs, n_cols) if (need_dw or need_db) else (2, 1, 1),
            dtype=torch.float32,
            device=s2.device,
        )
        block, warps = _block(n_cols)
        _backward_kernel[(programs,)](
            s2,
            dy2,
            ds2,
            dx2,
            s2 if weight is None else weight,
            mean,
            rstd,
            part[0],
            part[1],
            n_rows,
            n_cols,
            HAS_DS=ds is not None,
            HAS_W=weight is not None,
            NEED_DW=need_dw,
            NEED_DB=need_db,
            ROWS=rows_per_program,  # a constant: one compiled variant per row count
            BLOCK=block,
            num_warps=warps,
        )
        dw = part[0].sum(0).to(weight.dtype) if need_dw else None
        db = part[1].sum(0).to(bias.dtype) if need_db else None
        dx = dx2.view(ctx.shape)
        if not ctx.has_res:
            return dx.to(ctx.in_dtypes[0]), None, dw, db, None
        return dx.to(ctx.in_dtypes[0]), dx.to(ctx.in_dtypes[1]), dw, db, None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of x over its last dimension; with `residual`, (s, LayerNorm(s)) for
    s = x + residual. The kernels where `available(x)`, else `layer_norm_reference`."""
    if not available(x):
        return layer_norm_reference(x, weight, bias, eps, residual)
    return _LayerNorm.apply(x, residual, weight, bias, eps)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same function in plain PyTorch ops."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y if residual is None else (s, y)

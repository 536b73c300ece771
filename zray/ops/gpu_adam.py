"""Adam / AdamW on GPU shards in one pass: 16-bit gradient in, fp32 master and 16-bit copy out.

Why not torch's fused Adam: it needs fp32 gradients, so a bf16 training step pays a cast pass
(read 2 bytes, write 4 per parameter) before it and a copy of the new master into the 16-bit
compute parameters after it (read 4, write 2), besides its own 28 bytes. This kernel reads the
gradient in whatever dtype it was reduced in, scales it by a device scalar (unscale x clip x
1/N, so the host never syncs), updates master weight and moments in fp32, and writes the
16-bit copy as it goes: 28 bytes per parameter with bf16 gradients instead of 40
(benchmarks/RESULTS.md has the measured step).

Arithmetic follows torch's fused Adam (torch/csrc ... FusedAdamKernel): grad *= scale; AdamW
decays the weight by (1 - lr * wd) first, Adam adds wd * param to the gradient; moments in fp32;
bias corrections from the step count in fp64; denom = sqrt(v) / sqrt(1 - beta2^t) + eps,
IEEE-rounded square root and division. `adam_step_reference` is the same update in plain
PyTorch, used by the tests (and nowhere else).

The kernel is Triton's; without Triton (or off CUDA) `available()` is False and callers keep
torch's optimizer. Under TRITON_INTERPRET=1 the same kernel runs on CPU tensors (the tests use
that where no GPU is present).
"""

from __future__ import annotations

import math
import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

# Elements per program: 16-byte loads on every stream, and enough programs to fill the GPU
# for any shard over a few million elements (smaller shards are launch-bound anyway).
_BLOCK = 2048
_WARPS = 8


def available(device: torch.device) -> bool:
    """True where the kernel can run on tensors of `device`."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    # Triton reads a kernel's annotations (tl.constexpr, dtypes), so plain Python hints stay off.
    @triton.jit
    def _adam_kernel(  # noqa: ANN202
        param_ptr,  # noqa: ANN001
        grad_ptr,  # noqa: ANN001
        exp_avg_ptr,  # noqa: ANN001
        exp_avg_sq_ptr,  # noqa: ANN001
        lowp_ptr,  # noqa: ANN001
        scale_ptr,  # noqa: ANN001
        step_ptr,  # noqa: ANN001
        n,  # noqa: ANN001
        lr,  # noqa: ANN001
        beta1,  # noqa: ANN001
        beta2,  # noqa: ANN001
        eps,  # noqa: ANN001
        weight_decay,  # noqa: ANN001
        ln_beta1,  # noqa: ANN001
        ln_beta2,  # noqa: ANN001
        DECOUPLED: tl.constexpr,
        WRITE_LOWP: tl.constexpr,
        ROUND_BF16_BY_BITS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # The step count was already advanced for this step (by the caller, on the device).
        step = tl.load(step_ptr).to(tl.float64)
        bias1 = 1.0 - tl.exp(step * ln_beta1)
        bias2 = 1.0 - tl.exp(step * ln_beta2)
        step_size = (lr / bias1).to(tl.float32)
        bias2_sqrt = tl.sqrt_rn(bias2.to(tl.float32))
        scale = tl.load(scale_ptr).to(tl.float32)

        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
        if DECOUPLED:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(param_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        if ROUND_BF16_BY_BITS:
            # Round to nearest even on the bit pattern (finite values), see adam_step_.
            bits = p.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            half = (bits >> 16).to(tl.uint16)
            tl.store(lowp_ptr + offs, half.to(tl.bfloat16, bitcast=True), mask=mask)
        elif WRITE_LOWP:
            tl.store(lowp_ptr + offs, p.to(lowp_ptr.dtype.element_ty), mask=mask)


def _check(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lowp: torch.Tensor | None,
) -> None:
    n = param.numel()
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise ValueError(f"adam_step_: {name} must be float32, got {t.dtype}")
    named = (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("lowp", lowp))
    for name, t in named:
        if t is not None and t.numel() != n:
            raise ValueError(f"adam_step_: {name} has {t.numel()} elements, param has {n}")
    for name, t in (("param", param), *named):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"adam_step_: {name} must be contiguous")


def adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    scale: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    lowp: torch.Tensor | None = None,
) -> None:
    """One Adam(W) update of a flat fp32 `param` in place, moments in place.

    `grad` (any float dtype, same length) is multiplied by the 1-element device tensor `scale`
    as it is read. `step` (1-element, on the device) is the step count *including* this step.
    `lowp`, when given, receives the new weights in its own (16-bit) dtype.
    """
    if triton is None:
        raise RuntimeError("adam_step_: Triton is not installed")
    _check(param, grad, exp_avg, exp_avg_sq, lowp)
    n = param.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, _BLOCK),)
    _adam_kernel[grid](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        param if lowp is None else lowp,
        scale,
        step,
        n,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        math.log(beta1) if beta1 > 0 else -math.inf,
        math.log(beta2) if beta2 > 0 else -math.inf,
        DECOUPLED=bool(decoupled),
        WRITE_LOWP=lowp is not None,
        # The GPU's conversion rounds to nearest even; Triton's interpreter truncates, which
        # would make CPU test runs compute with other weights than the GPU would.
        ROUND_BF16_BY_BITS=lowp is not None
        and lowp.dtype == torch.bfloat16
        and os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK=_BLOCK,
        num_warps=_WARPS,
    )


def adam_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    scale: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    lowp: torch.Tensor | None = None,
) -> None:
    """`adam_step_` in plain PyTorch (fp32 arithmetic, fp64 bias corrections)."""
    t = float(step.reshape(()).item())
    g = grad.float() * scale.float().reshape(())
    if decoupled:
        param.mul_(1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * param
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    step_size = lr / (1.0 - beta1**t)
    bias2_sqrt = math.sqrt(1.0 - beta2**t)
    denom = exp_avg_sq.sqrt().div_(bias2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    if lowp is not None:
        lowp.copy_(param)

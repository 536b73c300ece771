"""Sum of squares and inf/nan detection of a flat buffer in one read.

This feeds global gradient-norm clipping (norm = sqrt(sum over buffers)) and the overflow check
of mixed precision: the compiled kernel reads each gradient once, where torch would need two
passes (`pow(2).sum()` and `isfinite().all()`) and an fp32/fp64 temporary of the whole buffer.

`sumsq_nonfinite_reference` beside it is the plain-PyTorch definition that tests compare with,
and the fallback when the extension is not built.
"""

from __future__ import annotations

import torch

from zray.ops import _extension

# torch dtype -> key of `zray._C.DTYPE_CODES` (the C++ side owns the integer codes).
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}

KERNEL = "sumsq_nonfinite"


def _check_input(t: torch.Tensor) -> str:
    """Validates what the kernel needs; returns the dtype's name. Same rules on both paths."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sumsq_nonfinite: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"sumsq_nonfinite: tensor device: got {t.device}; allowed: cpu")
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        allowed = ", ".join(str(d) for d in _DTYPE_NAMES)
        raise ValueError(f"sumsq_nonfinite: tensor dtype: got {t.dtype}; allowed: {allowed}")
    if not t.is_contiguous():
        # No silent .contiguous(): that would copy the whole buffer on every call.
        raise ValueError(
            f"sumsq_nonfinite: tensor must be contiguous; got shape {tuple(t.shape)} with "
            f"strides {t.stride()} (call .contiguous() first, which copies)"
        )
    return name


def sumsq_nonfinite_reference(t: torch.Tensor) -> tuple[float, bool]:
    """Plain-PyTorch definition: (sum of t**2 in float64, whether t holds inf or nan).

    Float64 because every float32/bf16/fp16 square is exact in it (see csrc/norm.cpp). Costs an
    8-bytes-per-element temporary and two passes; `.item()` syncs when t is on a GPU.
    """
    sumsq = t.detach().to(torch.float64).pow(2).sum().item()
    nonfinite = not bool(torch.isfinite(t.detach()).all())
    return sumsq, nonfinite


def sumsq_nonfinite(t: torch.Tensor) -> tuple[float, bool]:
    """(sum of t**2 accumulated in float64, whether t holds inf or nan) for a contiguous CPU
    tensor of float32, bfloat16 or float16, in one pass.

    Uses the compiled kernel (on `torch.get_num_threads()` threads; the result does not depend
    on the thread count) or, if `zray._C` is not built, the reference after one warning. When
    t holds inf or nan the sum is inf or nan, as in the reference.
    """
    name = _check_input(t)
    ext = _extension.EXTENSION.kernel(KERNEL)
    if ext is None:
        return sumsq_nonfinite_reference(t)
    return ext.sumsq_nonfinite(
        t.data_ptr(), t.numel(), ext.DTYPE_CODES[name], num_threads=torch.get_num_threads()
    )

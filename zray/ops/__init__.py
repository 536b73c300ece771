"""Python face of zray's compiled CPU kernels, each beside its plain-PyTorch reference.

Every kernel works without the extension (falling back to its reference after one warning),
so a missing compiler costs speed, never correctness. `kernel_report()` says which path each
kernel takes here; `zray report` prints it.
"""

from __future__ import annotations

from typing import Any

from zray.ops import _extension
from zray.ops import norm as _norm
from zray.ops.norm import sumsq_nonfinite, sumsq_nonfinite_reference

# Name of every kernel with a compiled path (the attribute of zray._C that implements it).
_KERNELS: tuple[str, ...] = (_norm.KERNEL,)

__all__ = ["kernel_report", "sumsq_nonfinite", "sumsq_nonfinite_reference"]


def kernel_report() -> dict[str, Any]:
    """Whether `zray._C` is built, how, and which kernels use the compiled path.

    Keys: extension (module name), built (bool), error (import error or None), build_info
    (the extension's `build_info()` or None), kernels ({name: "compiled" | "reference"}).
    """
    ext = _extension.EXTENSION
    return {
        "extension": ext.name,
        "built": ext.built,
        "error": ext.error,
        "build_info": ext.build_info(),
        "kernels": {k: "compiled" if ext.provides(k) else "reference" for k in _KERNELS},
    }

"""Python face of zray's compiled CPU kernels, each beside its plain-PyTorch reference.

Every kernel works without the extension (falling back to its reference after one warning),
so a missing compiler costs speed, never correctness. `kernel_report()` says which path each
kernel takes here; `zray report` prints it.
"""

from __future__ import annotations

from typing import Any

from zray.ops import _extension
from zray.ops import cpu_adam as _cpu_adam
from zray.ops import norm as _norm
from zray.ops.cpu_adam import CPUAdam, adam_step, adam_step_reference
from zray.ops.norm import sumsq_nonfinite, sumsq_nonfinite_reference

# Name of every kernel with a compiled path (the attribute of zray._C that implements it).
_KERNELS: tuple[str, ...] = (_norm.KERNEL, _cpu_adam.KERNEL)

__all__ = [
    "CPUAdam",
    "adam_step",
    "adam_step_reference",
    "kernel_report",
    "sumsq_nonfinite",
    "sumsq_nonfinite_reference",
]


def kernel_report() -> dict[str, Any]:
    """Whether `zray._C` is built, how, and which kernels use the compiled path.

    Keys: extension (module name), built (bool), error (import error or None), build_info
    (the extension's `build_info()` or None), kernels ({name: "compiled" | "reference"}),
    isa ({name: the instruction set its compiled path picks on this CPU, or "reference"}).
    """
    ext = _extension.EXTENSION
    info = ext.build_info()
    compiled = {k: ext.provides(k) for k in _KERNELS}
    # Every compiled kernel dispatches with the same rule (cpu_features.h: the best ISA).
    selected = None if info is None else info.get("isa_selected")
    return {
        "extension": ext.name,
        "built": ext.built,
        "error": ext.error,
        "build_info": info,
        "kernels": {k: "compiled" if c else "reference" for k, c in compiled.items()},
        "isa": {k: selected if c and selected else "reference" for k, c in compiled.items()},
    }

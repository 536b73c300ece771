"""Loads the compiled extension `zray._C` once and remembers whether it is usable.

Why an object rather than module globals: the loaded module, the import error and which
fallback warnings were already given are one piece of state, and tests replace it whole
(monkeypatch `EXTENSION`) to exercise the fallback path without uninstalling anything.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Any

_MODULE_MISSING = "<module>"  # key in `_warned` for "the whole extension is missing"


class _Extension:
    """Lazy, import-once handle on a compiled extension module."""

    def __init__(self, name: str = "zray._C") -> None:
        self.name = name
        self._tried = False
        self._module: ModuleType | None = None
        self._error: str | None = None
        self._warned: set[str] = set()

    def _load(self) -> ModuleType | None:
        # Imported on first use, not at `import zray`, so a broken build never breaks import.
        if not self._tried:
            self._tried = True
            try:
                self._module = importlib.import_module(self.name)
            except ImportError as exc:  # not built, or built against another Python
                self._error = f"{type(exc).__name__}: {exc}"
        return self._module

    @property
    def built(self) -> bool:
        """Whether the extension imports (no warning is given)."""
        return self._load() is not None

    @property
    def error(self) -> str | None:
        """Why the import failed, or None when it succeeded."""
        self._load()
        return self._error

    def provides(self, kernel: str) -> bool:
        """Whether the extension is built and exports `kernel` (no warning is given)."""
        module = self._load()
        return module is not None and hasattr(module, kernel)

    def build_info(self) -> dict[str, Any] | None:
        """The extension's own `build_info()`, or None when it is not built."""
        module = self._load()
        return None if module is None else dict(module.build_info())

    def kernel(self, name: str) -> ModuleType | None:
        """The module if it provides kernel `name`; else None, after warning once.

        One warning per process for a missing extension (not one per call: kernels run every
        step), and one per kernel that an older build of the extension lacks.
        """
        module = self._load()
        if module is not None and hasattr(module, name):
            return module
        if module is None:
            key, why = _MODULE_MISSING, f"it could not be imported ({self._error})"
        else:
            key, why = name, f"it was built without `{name}` (an older build?)"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"zray: compiled extension {self.name} is unusable: {why}. Kernels fall back to "
                "their plain-PyTorch references, which are slower. Rebuild with "
                "`pip install -e .` (or `pip install .`) and check `zray report`.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None


# The one loader of this process. Kernel modules read it at call time as
# `_extension.EXTENSION`, so replacing this attribute redirects all of them.
EXTENSION = _Extension("zray._C")

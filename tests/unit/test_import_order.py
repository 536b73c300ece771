"""Every zray module imports when it is the first one imported (no import cycle that only a
particular order survives).

Ray's workers unpickle whatever the driver sent, so their first zray import can be any module
(zray.parallel.context, say). A cycle through it then fails with "cannot import name ... from
partially initialized module": `zray fit` from the checkout's parent folder crashed that way.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import zray

ROOT = Path(__file__).resolve().parents[2]

# Each module imported first under a bare `zray` package whose __init__ has not run: what a
# worker gets when `zray` resolves as a namespace package (a folder named zray in its path).
_PROBE = """
import importlib, sys, traceback, types
failed = []
package_dir = sys.argv[1]
for name in sys.argv[2:]:
    for m in [m for m in sys.modules if m == "zray" or m.startswith("zray.")]:
        del sys.modules[m]
    bare = types.ModuleType("zray")
    bare.__path__ = [package_dir]
    sys.modules["zray"] = bare
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
"""


def test_each_module_imports_first() -> None:
    names = [
        m.name
        for m in pkgutil.walk_packages(zray.__path__, "zray.")
        if not m.name.endswith("__main__")
    ]
    assert len(names) > 50
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, zray.__path__[0], *names],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", out.stdout

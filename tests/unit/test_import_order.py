"""Every zray module imports when it is the first one imported (no import cycle that only a
particular order survives).

Ray's workers unpickle whatever the driver sent, so their first zray import can be any module
(zray.parallel.context, say). A cycle through it then fails with "cannot import name ... from
partially initialized module": `zray fit` from the checkout's parent folder crashed that way.
"""

from __future__ import annotations

import ast
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


# ---- no import loops, deferred imports included ---------------------------------------------


def _modules() -> dict[str, Path]:
    package = Path(zray.__path__[0])
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The zray modules `name` imports anywhere in its file (a function's deferred import
    too: it hides a loop rather than removing it), except under `if TYPE_CHECKING:`. An import
    of an ancestor package is left out: importing a submodule imports its parents anyway."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            subs = {f"{base}.{a.name}" for a in node.names} & known
            # `from pkg import submodule` needs the submodule; `from pkg import thing` needs pkg.
            found.update(subs if len(subs) == len(node.names) else {base, *subs})
    return {m for m in found & known if m != name and not name.startswith(m + ".")}


def _loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def test_no_import_loops() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    assert graph["zray.fit"] >= {"zray.run_records", "zray.config"}  # the walk sees imports
    assert "zray.config.batch" in graph["zray.config.root"]
    loops = _loops(graph)
    shown = [" <-> ".join(loop) for loop in loops]
    assert not loops, "import loops: " + "; ".join(shown)


def test_the_loop_finder_finds_a_loop() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _loops(graph) == [["a", "b", "c"]]

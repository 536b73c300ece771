"""Builds zray's C++ extension `zray._C` at install time; all metadata lives in pyproject.toml.

The extension includes no torch headers (Python passes data pointers as ints), so it builds
in seconds and works with any torch version. It is compiled for baseline x86-64 and never
with -march=native: the kernels pick AVX2 / AVX-512 bodies at run time (see csrc/cpu_features.h),
so a wheel built here also runs on an older CPU.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from pybind11.setup_helpers import build_ext as Pybind11BuildExt
from setuptools import setup

ROOT = Path(__file__).resolve().parent
# setuptools wants source paths relative to setup.py; sorted so builds are reproducible.
SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.cpp"))
HEADERS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.h"))

# -O3 for the kernels; never -ffast-math (csrc/norm.cpp needs IEEE inf/nan to detect them).
UNIX_FLAGS = ["-O3", "-Wall", "-Wextra"]
OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def _openmp_flags(compiler: object) -> list[str]:
    """The flag that enables OpenMP if this compiler can compile *and link* with it, else [].

    Linking matters: Apple clang accepts -fopenmp only when libomp is installed.
    """
    if sys.platform == "win32":
        return []  # MSVC's OpenMP 2.0 lacks what we use; the kernels run serially there
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe_openmp.cpp"
        src.write_text(OPENMP_PROBE)
        try:
            objects = compiler.compile([str(src)], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(
                objects,
                "probe_openmp",
                output_dir=tmp,
                extra_postargs=["-fopenmp"],
                target_lang="c++",
            )
        except Exception:  # any compile or link error means: no usable OpenMP
            return []
    return ["-fopenmp"]


class BuildExt(Pybind11BuildExt):
    """pybind11's build_ext plus OpenMP detection and a record of the flags used."""

    def build_extensions(self) -> None:
        openmp = _openmp_flags(self.compiler)
        for ext in self.extensions:
            flags = [] if sys.platform == "win32" else [*UNIX_FLAGS, *openmp]
            ext.extra_compile_args += flags
            ext.extra_link_args += openmp
            # Recorded in the binary so `zray report` can show how it was built.
            described = shlex.join(ext.extra_compile_args)  # includes pybind11's -std=c++17
            ext.define_macros.append(("ZRAY_CXX_FLAGS", '"' + described.replace('"', "") + '"'))
        super().build_extensions()


# Compile the .cpp files in parallel (one job per core); bindings.cpp dominates the time.
ParallelCompile(default=os.cpu_count() or 1).install()

setup(
    ext_modules=[
        Pybind11Extension(
            "zray._C",
            sources=SOURCES,
            depends=HEADERS,  # rebuild when a header changes
            include_dirs=["csrc"],
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)

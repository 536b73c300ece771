"""zray.ops kernels against their plain-PyTorch references, and the fallback when unbuilt.

With ZRAY_REQUIRE_EXT=1 (CI sets it) a missing or broken `zray._C` fails these tests instead
of skipping the compiled-path ones, so a build regression cannot pass silently.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from types import ModuleType

import pytest
import torch

from zray import ops
from zray.ops import _extension

REQUIRE_EXT = os.environ.get("ZRAY_REQUIRE_EXT", "") == "1"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Not multiples of the vector width (8/16 elements) nor of the 32 lanes, plus one length that
# spans 16 OpenMP chunks of 65,536 with a ragged last chunk.
LENGTHS = [0, 1, 7, 15, 16, 17, 1023, 1_000_003]


@pytest.fixture(scope="module")
def ext() -> ModuleType:
    """The compiled extension; skips (or fails under ZRAY_REQUIRE_EXT=1) when it is not built."""
    loader = _extension.EXTENSION
    if not loader.built:
        message = f"zray._C is not built: {loader.error}. Build it with `pip install -e .`"
        if REQUIRE_EXT:
            pytest.fail(message)
        pytest.skip(message)
    return loader._load()


def _random(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    # Magnitudes over ~4 decades (x * e^N(0,1)) so that the sum is not dominated by one scale;
    # bounded well inside float16's range (|x| <= ~65504).
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x *= torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    return x.to(dtype)


def _same(a: float, b: float) -> bool:
    """Equal, with nan equal to nan (the sum of a buffer holding nan)."""
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---- compiled kernel == reference ----------------------------------------------------------


def test_extension_built(ext: ModuleType) -> None:
    info = ext.build_info()
    assert info["isa_selected"] in info["isa_supported"]
    assert set(info["isa_supported"]) <= set(info["isa_compiled"])
    assert "scalar" in info["isa_supported"]
    assert set(ext.DTYPE_CODES) == {"float32", "bfloat16", "float16"}
    report = ops.kernel_report()
    assert report["built"] and report["error"] is None
    assert report["kernels"]["sumsq_nonfinite"] == "compiled"


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sumsq_matches_reference(ext: ModuleType, dtype: torch.dtype, n: int) -> None:
    t = _random(n, dtype, seed=1000 * n + DTYPES.index(dtype))
    got, got_nonfinite = ops.sumsq_nonfinite(t)
    want, want_nonfinite = ops.sumsq_nonfinite_reference(t)
    assert isinstance(got, float) and isinstance(got_nonfinite, bool)
    assert not got_nonfinite and not want_nonfinite
    assert abs(got - want) <= 1e-6 * abs(want), (got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sumsq_same_bits_for_every_isa_and_thread_count(
    ext: ModuleType, dtype: torch.dtype
) -> None:
    # The kernel promises one fixed summation order (32 lanes, pairwise tree, chunk order).
    t = _random(1_000_003, dtype, seed=7)
    code = ext.DTYPE_CODES[str(dtype).removeprefix("torch.")]
    results = {
        (isa, threads): ext.sumsq_nonfinite(
            t.data_ptr(), t.numel(), code, isa=isa, num_threads=threads
        )
        for isa in ext.build_info()["isa_supported"]
        for threads in (1, 2, 3)
    }
    assert len(set(results.values())) == 1, results
    want, _ = ops.sumsq_nonfinite_reference(t)
    (got, _), *_ = results.values()
    assert abs(got - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16bit_pattern_converts_exactly(ext: ModuleType, dtype: torch.dtype) -> None:
    # All 65,536 bit patterns (subnormals, +-0, +-inf, nans), summed 64 at a time so each call
    # runs the SIMD body (32 elements per step) and neighbouring patterns, of similar
    # magnitude, share a sum: one wrong conversion shows up far above rounding.
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    code = ext.DTYPE_CODES[str(dtype).removeprefix("torch.")]
    block = 64
    for isa in ext.build_info()["isa_supported"]:
        for start in range(0, patterns.numel(), block):
            piece = patterns[start : start + block]
            got, got_nonfinite = ext.sumsq_nonfinite(piece.data_ptr(), block, code, isa=isa)
            want, want_nonfinite = ops.sumsq_nonfinite_reference(piece)
            assert got_nonfinite == want_nonfinite, (isa, start)
            if want_nonfinite:
                assert _same(got, want), (isa, start, got, want)
            else:
                assert abs(got - want) <= 1e-12 * abs(want), (isa, start, got, want)


@pytest.mark.parametrize("n", [1, 17, 1_000_003])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_detected_anywhere(
    ext: ModuleType, dtype: torch.dtype, value: float, n: int
) -> None:
    clean = _random(n, dtype, seed=n)
    for position in sorted({0, n // 2, n - 1}):
        t = clean.clone()
        t[position] = value
        got, got_nonfinite = ops.sumsq_nonfinite(t)
        want, want_nonfinite = ops.sumsq_nonfinite_reference(t)
        assert got_nonfinite and want_nonfinite, position
        assert _same(got, want), (position, got, want)
        assert math.isnan(got) if math.isnan(value) else got == math.inf, position


def test_huge_finite_values_are_not_overflow(ext: ModuleType) -> None:
    # float32's largest values square to ~1e77: finite in float64, so no false overflow.
    t = torch.full((1000,), torch.finfo(torch.float32).max)
    got, nonfinite = ops.sumsq_nonfinite(t)
    want, _ = ops.sumsq_nonfinite_reference(t)
    assert not nonfinite and math.isfinite(got)
    assert abs(got - want) <= 1e-12 * want


def test_extension_rejects_bad_arguments(ext: ModuleType) -> None:
    t = torch.ones(4)
    with pytest.raises(ValueError, match="dtype: got code 9"):
        ext.sumsq_nonfinite(t.data_ptr(), 4, 9)
    with pytest.raises(ValueError, match="isa: got 'sse9'"):
        ext.sumsq_nonfinite(t.data_ptr(), 4, 0, isa="sse9")
    with pytest.raises(ValueError, match="numel: got -1"):
        ext.sumsq_nonfinite(t.data_ptr(), -1, 0)
    with pytest.raises(ValueError, match="null pointer"):
        ext.sumsq_nonfinite(0, 4, 0)
    assert ext.sumsq_nonfinite(0, 0, 0) == (0.0, False)


# ---- Python face: input checks and the fallback path ---------------------------------------


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (torch.ones(4, dtype=torch.float64), "dtype: got torch.float64"),
        (torch.ones(4, dtype=torch.int32), "dtype: got torch.int32"),
        (torch.ones(4, 4).t(), "must be contiguous"),
        (torch.ones(4, device="meta"), "device: got meta"),
    ],
    ids=["float64", "int32", "transposed", "meta"],
)
def test_sumsq_rejects_bad_input(tensor: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.sumsq_nonfinite(tensor)


def test_fallback_warns_once_and_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = _extension._Extension("zray._C_not_built_for_this_test")
    monkeypatch.setattr(_extension, "EXTENSION", missing)
    t = _random(1023, torch.bfloat16, seed=3)
    t_bad = t.clone()
    t_bad[5] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warn() call, not just the first per place
        first = ops.sumsq_nonfinite(t)
        second = ops.sumsq_nonfinite(t_bad)
    fallbacks = [w for w in caught if "zray._C_not_built_for_this_test" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert issubclass(fallbacks[0].category, RuntimeWarning)
    assert fallbacks[0].filename == __file__  # points at the caller, not at zray internals
    assert first == ops.sumsq_nonfinite_reference(t)
    assert second[1] and math.isnan(second[0])

    report = ops.kernel_report()
    assert report["extension"] == "zray._C_not_built_for_this_test"
    assert not report["built"] and "ModuleNotFoundError" in report["error"]
    assert report["build_info"] is None
    assert report["kernels"]["sumsq_nonfinite"] == "reference"


def test_stale_extension_without_kernel_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # An extension that imports but predates a kernel (e.g. not rebuilt after a pull).
    old_build = ModuleType("zray_test_stale_ext")
    old_build.build_info = lambda: {"isa_selected": "scalar"}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, old_build.__name__, old_build)
    monkeypatch.setattr(_extension, "EXTENSION", _extension._Extension(old_build.__name__))
    t = torch.arange(10, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="built without `sumsq_nonfinite`"):
        assert ops.sumsq_nonfinite(t) == (285.0, False)
    report = ops.kernel_report()
    assert report["built"] and report["build_info"] == {"isa_selected": "scalar"}
    assert report["kernels"]["sumsq_nonfinite"] == "reference"

"""linear_gelu (zray/ops/gpu_gelu.py) against F.gelu(F.linear(...)), under Triton's interpreter.

Fresh process per run of checks (TRITON_INTERPRET=1 before the kernel is defined); on a GPU,
tests/distributed/test_layernorm_gpu.py runs the GPT that uses it compiled. Reference: the
plain ops in float64 on the same inputs; fp32 within 1e-5 relative (the kernel's erf / exp in
fp32, sums in another order). Under CPU autocast (bf16) both sides compute the matmuls in bf16:
compared with the plain ops under the same autocast, 1e-2 (bf16 rounding of d(pre)); gradients
come back in the inputs' dtypes.
"""

from __future__ import annotations

import pytest

from tests.unit.test_gpu_adam import run_interpreted

pytest.importorskip("triton")

CHECKS = r"""
import json, torch
from zray.ops import gpu_gelu as gg

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

def run(fn, dt, x, w, b, dh, autocast=False):
    leaves = [t.detach().to(dt).clone().requires_grad_(True) if t is not None else None
              for t in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = fn(*leaves)
    h.backward(dh.to(h.dtype))
    return h, [t.grad for t in leaves if t is not None], [t.dtype for t in leaves if t is not None]

out = {}
torch.manual_seed(0)
for shape, n_out in (((3, 37, 24), 200), ((5, 16), 129)):
    for bias in (True, False):
        x = torch.randn(*shape) * 2
        w = torch.randn(n_out, shape[-1]) / shape[-1] ** 0.5
        b = torch.randn(n_out) if bias else None
        dh = torch.randn(*shape[:-1], n_out)
        h, g, _ = run(gg.linear_gelu, torch.float32, x, w, b, dh)
        h_ref, g_ref, _ = run(gg.linear_gelu_reference, torch.float64, x, w, b, dh)
        key = f"{shape}-{n_out}-bias{bias}"
        out[key] = {"out": rel(h, h_ref), "grad": max(rel(a, c) for a, c in zip(g, g_ref)),
                    "n_grads": len(g)}
        h, g, dts = run(gg.linear_gelu, torch.float32, x, w, b, dh, autocast=True)
        h_ref, g_ref, _ = run(gg.linear_gelu_reference, torch.float32, x, w, b, dh, autocast=True)
        out[key + "-autocast"] = {
            "out": rel(h, h_ref), "grad": max(rel(a, c) for a, c in zip(g, g_ref)),
            "dtypes": [str(h.dtype), str(h_ref.dtype)] + sorted({str(t.dtype) for t in g}),
        }
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(CHECKS)


def test_matches_plain_ops(results: dict) -> None:
    plain = {k: v for k, v in results.items() if not k.endswith("autocast")}
    assert len(plain) == 4
    for key, r in plain.items():
        assert r["out"] <= 1e-5 and r["grad"] <= 1e-5, (key, r)
        assert r["n_grads"] == (3 if "biasTrue" in key else 2)


def test_autocast_matches_plain_ops_under_autocast(results: dict) -> None:
    cast = {k: v for k, v in results.items() if k.endswith("autocast")}
    assert len(cast) == 4
    for key, r in cast.items():
        assert r["out"] <= 1e-2 and r["grad"] <= 1e-2, (key, r)
        assert r["dtypes"] == ["torch.bfloat16", "torch.bfloat16", "torch.float32"], key

"""zray's one-pass Adam kernel (zray/ops/gpu_adam.py) against its references.

Where no GPU is present the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 must be
set before the kernel is defined, so each check runs in a fresh interpreter process). On a GPU
the same checks run compiled (tests/distributed/test_shard_adam_gpu.py adds the engine).

Tolerances: the kernel and the references do the same fp32 operations in a different order
(scale multiplied vs divided, (step * m) / d vs step * (m / d)): a few ulp per step, 1e-6
relative after several steps. The 16-bit copy must equal the new master rounded to nearest
(the kernel rounds by bits under the interpreter, whose own conversion truncates).
"""

from __future__ import annotations

import pytest

from tests.unit._triton_interpreter import run_interpreted

pytest.importorskip("triton")

KERNEL_CHECKS = r"""
import json, math, torch
from zray.ops import gpu_adam as ga

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

out = {}
torch.manual_seed(0)
kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
# 1. One step against the plain-PyTorch definition: every dtype, both decays, odd sizes.
for gdt in (torch.bfloat16, torch.float16, torch.float32):
    for decoupled in (True, False):
        for n in (1, 2047, 2049, 5000):
            p = torch.randn(n); g = torch.randn(n).to(gdt)
            m = torch.randn(n) * 0.1; v = torch.rand(n) * 0.01
            lowp = torch.full((n,), float("nan"), dtype=torch.bfloat16)  # poisoned
            mine = [t.clone() for t in (p, g, m, v)]
            ref = [t.clone() for t in (p, g, m, v)]
            step = torch.tensor([3.0]); scale = torch.tensor([0.37])
            ga.adam_step_(*mine, step, scale, decoupled=decoupled, lowp=lowp, **kw)
            ga.adam_step_reference(*ref, step, scale, decoupled=decoupled, **kw)
            key = f"{gdt}-{decoupled}-{n}"
            out[key] = {
                "param": rel(mine[0], ref[0]), "m": rel(mine[2], ref[2]), "v": rel(mine[3], ref[3]),
                "grad_untouched": bool(torch.equal(mine[1], g)),
                "moved": rel(mine[0], p),
                # the new master rounded to nearest (every element written: nan otherwise)
                "lowp": bool(torch.equal(lowp, mine[0].to(torch.bfloat16))),
            }
# 2. Five steps against torch's own AdamW (fused, grad_scale), fed the widened bf16 gradient.
n = 6000
p0 = torch.randn(n)
ref_p = p0.clone().requires_grad_(True)
opt = torch.optim.AdamW([ref_p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
mine = p0.clone(); m = torch.zeros(n); v = torch.zeros(n); step = torch.zeros(1)
for s in range(5):
    g16 = torch.randn(n).to(torch.bfloat16)
    factor = torch.tensor([0.5 + 0.1 * s])
    ref_p.grad = g16.float()
    opt.grad_scale = factor.reciprocal()
    opt.step()
    step += 1
    ga.adam_step_(mine, g16, m, v, step, factor, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                  weight_decay=0.1, decoupled=True)
st = opt.state[ref_p]
out["torch"] = {"param": rel(mine, ref_p.detach()), "m": rel(m, st["exp_avg"]),
                "v": rel(v, st["exp_avg_sq"]), "moved": rel(mine, p0)}
# 3. Bad inputs are refused with the reason.
errs = []
for args in [
    (torch.randn(4).double(), torch.randn(4), torch.zeros(4), torch.zeros(4)),
    (torch.randn(4), torch.randn(5), torch.zeros(4), torch.zeros(4)),
    (torch.randn(8)[::2], torch.randn(4), torch.zeros(4), torch.zeros(4)),
]:
    try:
        ga.adam_step_(*args, torch.ones(1), torch.ones(1), decoupled=True, **kw)
        errs.append("accepted")
    except ValueError as e:
        errs.append(str(e))
out["errors"] = errs
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    return run_interpreted(KERNEL_CHECKS)


def test_one_step_matches_reference(kernel_results: dict) -> None:
    cases = {k: v for k, v in kernel_results.items() if "-" in k}
    assert len(cases) == 3 * 2 * 4
    for key, r in cases.items():
        assert r["param"] <= 1e-6 and r["m"] <= 1e-6 and r["v"] <= 1e-6, (key, r)
        assert r["moved"] > 1e-5, key  # the update happened
        assert r["grad_untouched"], key
        assert r["lowp"], key


def test_five_steps_match_torch_adamw(kernel_results: dict) -> None:
    r = kernel_results["torch"]
    assert r["moved"] > 1e-3
    assert r["param"] <= 1e-6 and r["m"] <= 1e-6 and r["v"] <= 1e-6, r


def test_bad_inputs_refused(kernel_results: dict) -> None:
    dtype, length, strided = kernel_results["errors"]
    assert "float32" in dtype
    assert "5 elements" in length
    assert "contiguous" in strided

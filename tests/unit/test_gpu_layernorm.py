"""The Triton LayerNorm (zray/ops/gpu_layernorm.py) against PyTorch's, under the interpreter.

As for the Adam kernel, TRITON_INTERPRET=1 must be set before the kernels are defined, so the
checks run in a fresh process (on a GPU, tests/distributed/test_layernorm_gpu.py runs them
compiled). Reference: the plain ops in float64 (x + residual, F.layer_norm) on the same
inputs. Tolerances: fp32 inputs 1e-5 relative (fp32 sums over a row in another order); bf16
inputs 1e-2 (outputs and gradients are stored in bf16, 2**-8 relative rounding, and s is
rounded to bf16 before it is normalised in both).
"""

from __future__ import annotations

import pytest

from tests.unit._triton_interpreter import run_interpreted

pytest.importorskip("triton")

CHECKS = r"""
import json, torch
import torch.nn.functional as F
from zray.ops import gpu_layernorm as ln

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

out = {}
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for rows, cols in ((37, 64), (5, 100), (9, 2048)):
        for residual in (False, True):
            for affine in (True, False):
                x = torch.randn(rows, cols) * 3 + 1
                r = torch.randn(rows, cols) if residual else None
                w = torch.randn(cols) if affine else None
                b = torch.randn(cols) if affine else None
                dy = torch.randn(rows, cols)
                ds = torch.randn(rows, cols)
                def run(fn, dt):
                    leaves = [t.detach().to(dt).clone().requires_grad_(True) if t is not None else None
                              for t in (x, r, w, b)]
                    res = fn(leaves[0], leaves[2], leaves[3], 1e-5,
                             residual=leaves[1])
                    if residual:
                        s, y = res
                        loss = (s.double() * ds.double()).sum() + (y.double() * dy.double()).sum()
                        outs = [s, y]
                    else:
                        y = res
                        loss = (y.double() * dy.double()).sum()
                        outs = [y]
                    loss.backward()
                    grads = [t.grad for t in leaves if t is not None]
                    return outs, grads
                mine_o, mine_g = run(ln.layer_norm, dtype)
                ref_o, ref_g = run(ln.layer_norm_reference, torch.float64)
                key = f"{dtype}-{rows}x{cols}-res{residual}-aff{affine}"
                out[key] = {
                    "out": max(rel(a, b) for a, b in zip(mine_o, ref_o)),
                    "grad": max(rel(a, b) for a, b in zip(mine_g, ref_g)),
                    "dtypes": sorted({str(t.dtype) for t in mine_o + mine_g}),
                }
# Under autocast the output is fp32 (as autocast runs layer_norm), s keeps the promoted dtype.
x = torch.randn(4, 64); r = torch.randn(4, 64).bfloat16()
with torch.autocast("cpu", dtype=torch.bfloat16):
    s, y = ln.layer_norm(x, torch.ones(64), torch.zeros(64), 1e-5, residual=r)
    y_ref = F.layer_norm(x + r, (64,), torch.ones(64), torch.zeros(64))
out["autocast"] = [str(s.dtype), str(y.dtype), str(y_ref.dtype)]
# zray's GPT (its LayerNorm modules and the block's fused residual add) against the same model
# on torch's ops: loss and every gradient, fp32.
from zray.models.gpt import GPT, GPTConfig
from zray.models.data import lm_batch, synthetic_tokens
batch = lm_batch(synthetic_tokens(4, 32, 64, seed=5))
def grads():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=32, n_layer=2, n_head=2, d_model=64))
    loss = model(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}
loss, mine = grads()
ln.available = lambda x: False  # torch's ops, as on a machine without Triton
loss_ref, ref = grads()
out["gpt"] = {"loss": rel(loss, loss_ref), "grad": max(rel(mine[n], ref[n]) for n in ref)}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(CHECKS)


def test_matches_pytorch_layer_norm(results: dict) -> None:
    cases = {k: v for k, v in results.items() if k not in ("autocast", "gpt")}
    assert len(cases) == 2 * 3 * 2 * 2
    for key, r in cases.items():
        tol = 1e-5 if key.startswith("torch.float32") else 1e-2
        assert r["out"] <= tol and r["grad"] <= tol, (key, r)
        want = "torch.float32" if key.startswith("torch.float32") else "torch.bfloat16"
        assert r["dtypes"] == [want], (key, r["dtypes"])


def test_autocast_output_dtype(results: dict) -> None:
    s, y, y_ref = results["autocast"]
    assert (s, y) == ("torch.float32", y_ref)


def test_gpt_with_kernels_matches_torch_ops(results: dict) -> None:
    assert results["gpt"]["loss"] <= 1e-6, results["gpt"]
    assert results["gpt"]["grad"] <= 1e-5, results["gpt"]

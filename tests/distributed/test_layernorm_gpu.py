"""zray's Triton LayerNorm compiled on a GPU, against torch's LayerNorm on the same inputs.

Skipped without CUDA (CI runs the same kernels under Triton's interpreter in
tests/unit/test_gpu_layernorm.py). On the GPU machine: `pytest tests/distributed/test_layernorm_gpu.py`.

The benchmark's shape ([16384, 2048], the 1.35B GPT's activations) and a ragged one, with and
without the residual add, fp32 against torch in fp64 (1e-5 relative: fp32 row sums in another
order) and bf16 against torch's own bf16 LayerNorm (1e-2: both round outputs and gradients to
bf16; observed ~4e-3); CUDA autocast gives an fp32 output like torch's; the GPT's loss and
gradients equal the torch-ops path within fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from zray.ops import gpu_layernorm as ln

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _run(fn, dtype: torch.dtype, inputs: list, residual: bool, grads_out: list) -> tuple:  # noqa: ANN001
    leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in inputs]
    x, r, w, b = leaves
    res = fn(x, w, b, 1e-5, residual=r if residual else None)
    outs = list(res) if residual else [res]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads_out, outs, strict=False)])
    used = leaves if residual else [x, w, b]
    return outs, [t.grad for t in used]


@pytest.mark.parametrize("shape", [(16384, 2048), (37, 100)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch(shape: tuple[int, int], residual: bool, dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, cols = shape
    inputs = [
        torch.randn(rows, cols, device="cuda", generator=g) * 3 + 1,
        torch.randn(rows, cols, device="cuda", generator=g),
        torch.randn(cols, device="cuda", generator=g),
        torch.randn(cols, device="cuda", generator=g),
    ]
    grads_out = [torch.randn(rows, cols, device="cuda", generator=g) for _ in range(2)]
    mine = _run(ln.layer_norm, dtype, inputs, residual, grads_out[: 1 + residual])
    ref_dtype = torch.float64 if dtype == torch.float32 else dtype
    ref = _run(ln.layer_norm_reference, ref_dtype, inputs, residual, grads_out[: 1 + residual])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(mine[0] + mine[1], ref[0] + ref[1], strict=True):
        assert a.dtype == dtype
        assert rel(a, b) <= tol, (rel(a, b), a.shape)


def test_autocast_output_is_fp32() -> None:
    x = torch.randn(8, 64, device="cuda")
    w, b = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s, y = ln.layer_norm(x, w, b, 1e-5, residual=torch.randn(8, 64, device="cuda").bfloat16())
        ref = torch.nn.functional.layer_norm(x, (64,), w, b)
    assert s.dtype == torch.float32 and y.dtype == ref.dtype == torch.float32


def test_gpt_matches_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from zray.models.data import lm_batch, synthetic_tokens
    from zray.models.gpt import GPT, GPTConfig

    batch = {k: v.cuda() for k, v in lm_batch(synthetic_tokens(4, 128, 256, seed=5)).items()}

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=256, seq_len=128, n_layer=2, n_head=4, d_model=256))
        loss = model.cuda()(**batch)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, mine = grads()
    monkeypatch.setattr(ln, "available", lambda x: False)
    loss_ref, ref = grads()
    assert rel(loss, loss_ref) <= 1e-5
    worst = max(ref, key=lambda n: rel(mine[n], ref[n]))
    assert rel(mine[worst], ref[worst]) <= 1e-4, (worst, rel(mine[worst], ref[worst]))

"""zray.models.loss.cross_entropy against F.cross_entropy on fp32 logits (the reference).

Tolerances: fp32 logits, 1e-6 relative (both compute in fp32; only the summation order
differs). bf16 logits: the loss is computed in fp32 from the same bf16 values, so 1e-6; with an
upstream gradient of 1 each gradient element is the same fp32 value rounded once into bf16 on
both sides (seen bit-identical); any other upstream factor is applied to the stored bf16
gradient, a second rounding: one bf16 ulp, at most 2^-7 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zray.models.gpt import GPT, GPTConfig
from zray.models.loss import cross_entropy


def _pair(dtype: torch.dtype, n: int = 300, v: int = 97) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(n, v, generator=g)).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100  # ignored positions
    return x.clone().requires_grad_(), x.clone().requires_grad_(), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64, 1000])  # slabs: one row, uneven (300 = 4x64 + 44), all
@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_matches_torch(dtype: torch.dtype, rows: int, upstream: float) -> None:
    x, ref, y = _pair(dtype)
    loss = cross_entropy(x, y, rows=rows)
    want = F.cross_entropy(ref.float(), y)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    (loss * upstream).backward()
    (want * upstream).backward()
    assert x.grad is not None and ref.grad is not None and x.grad.dtype == dtype
    got, exp = x.grad.float(), ref.grad.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-9)
    elif upstream == 1.0:
        assert torch.equal(got, exp)
    else:
        assert torch.all((got - exp).abs() <= 2.0**-7 * exp.abs())
    assert torch.all(got[::7] == 0)  # ignored rows get no gradient


def test_confident_label_keeps_its_gradient() -> None:
    # p(label) = 0.9989: p - 1 = -0.0011 must not be lost in p's bf16 rounding (0.9961 / 1.0).
    x = torch.zeros(1, 5)
    x[0, 1] = 8.2
    x = x.bfloat16().requires_grad_()
    cross_entropy(x, torch.tensor([1])).backward()
    p = torch.softmax(x.detach().float(), -1)[0, 1]
    assert x.grad is not None
    torch.testing.assert_close(x.grad[0, 1].float(), p - 1, rtol=2.0**-8, atol=0)


def test_no_grad_and_all_ignored() -> None:
    x, _, y = _pair(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy(x, y), F.cross_entropy(x, y))
    ignored = torch.full_like(y, -100)
    assert torch.isnan(cross_entropy(x, ignored))  # as F.cross_entropy: 0 / 0


def test_fp16_takes_the_fp32_path() -> None:
    x, ref, y = _pair(torch.float16)
    loss = cross_entropy(x, y)
    loss.backward()
    F.cross_entropy(ref.float(), y).backward()
    assert x.grad is not None and ref.grad is not None
    assert torch.equal(x.grad, ref.grad)


def test_gpt_loss_and_gradients_match_the_reference() -> None:
    """The GPT's loss through this function = F.cross_entropy of its logits against the labels
    shifted by one (Hugging Face's causal-LM convention), gradients too."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32))
    ids = torch.randint(0, 64, (3, 16))
    labels = torch.randint(0, 64, (3, 16))
    labels[:, :3] = -100
    loss = model(input_ids=ids, labels=labels)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=ids)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 64).float(), labels[:, 1:].reshape(-1))
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)

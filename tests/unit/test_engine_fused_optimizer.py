"""A fused torch optimizer takes the step's unscale/clip factor through `grad_scale` (one pass
over the gradients instead of two); the result must equal the unfused path's."""

from __future__ import annotations

import pytest
import torch

import zray
from zray.models.data import lm_batch, synthetic_tokens
from zray.models.gpt import GPT, GPTConfig

# No biases: the key bias gets a zero gradient in exact arithmetic (softmax ignores a constant
# shift), so its Adam updates are normalised rounding noise and differ between any two paths.
CFG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, bias=False)
STEPS, LR, CLIP = 4, 1e-2, 0.05  # a small clip so the factor is not 1 on every step


def _batches() -> list[dict[str, torch.Tensor]]:
    toks = synthetic_tokens(4 * STEPS, 16, 64, seed=3)
    return [lm_batch(toks[i * 4 : i * 4 + 4]) for i in range(STEPS)]


def _reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(CFG)
    # The same fused kernel, fed gradients that clip_grad_norm_ scaled in a separate pass.
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=True)
    for batch in _batches():
        opt.zero_grad()
        model(**batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.skipif(not hasattr(torch, "_fused_adamw_"), reason="torch has no fused AdamW")
def test_fused_client_optimizer_equals_reference() -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    client = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=True)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": 0},
    }
    engine, *_ = zray.initialize(model=model, optimizer=client, config=config)
    assert all(g["fused"] for g in engine.optimizer.param_groups)
    for batch in _batches():
        engine.backward(engine(**batch))
        engine.step()
    assert not hasattr(engine.optimizer.optimizer, "grad_scale")  # not left behind
    assert engine.last_grad_norm is not None and float(engine.last_grad_norm) > CLIP
    ref = _reference()
    state = engine.consolidated_state_dict()
    for k, v in ref.items():
        err = float((state[k] - v).norm() / v.norm())
        # Dividing by 1/factor inside the kernel vs multiplying by factor before it: fp32
        # rounding only.
        assert err <= 1e-5, (k, err)

"""Engine.save_16bit_model (DeepSpeed's, what Hugging Face's Trainer saves a model with)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import zray
from zray.launch import launch_local
from zray.models.data import lm_batch, synthetic_tokens
from zray.models.gpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def _trained(stage: int, gather: bool, out: str) -> dict:
    """2 ranks, bf16, two steps; then save_16bit_model. Runs in each rank's process."""
    ctx = zray.init_distributed()
    torch.manual_seed(0)
    model = GPT(CFG)
    model.lm_head.weight.requires_grad_(False)  # a frozen parameter, for exclude_frozen
    config = {
        "train_batch_size": 4,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {
            "stage": stage,
            "stage3_gather_16bit_weights_on_model_save": gather,
            "stage3_param_persistence_threshold": 0,
        },
    }
    engine, *_ = zray.initialize(model=model, config=config)
    tokens = synthetic_tokens(8, CFG.seq_len, CFG.vocab_size, seed=1)
    for step in range(2):
        rows = tokens[step * 4 + 2 * ctx.dp_rank : step * 4 + 2 * ctx.dp_rank + 2]
        engine.backward(engine(**lm_batch(rows)))
        engine.step()
    whole = engine.consolidated_state_dict()
    saved = engine.save_16bit_model(out, "model.bin")
    kept = engine.save_16bit_model(out, "trainable.bin", exclude_frozen_parameters=True)
    return {"whole": whole, "saved": saved, "kept": kept}


@pytest.mark.parametrize("stage", [2, 3])
def test_the_whole_16bit_weights_are_written_by_rank_0(stage: int, tmp_path: Path) -> None:
    runs = launch_local(_trained, 2, stage, True, str(tmp_path))
    assert [r["saved"] for r in runs] == [True, True]
    got = torch.load(tmp_path / "model.bin", weights_only=True)
    whole = runs[0]["whole"]
    assert got.keys() == whole.keys()
    for name, value in whole.items():
        # The compute dtype's rounding of the fp32 master weights, whole.
        assert got[name].dtype == torch.bfloat16 and got[name].shape == value.shape, name
        assert torch.equal(got[name], value.to(torch.bfloat16)), name
    trainable = torch.load(tmp_path / "trainable.bin", weights_only=True)
    assert "lm_head.weight" not in trainable and trainable.keys() < got.keys()


def test_stage_3_without_the_key_writes_nothing_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = launch_local(_trained, 2, 3, False, str(tmp_path))
    assert [r["saved"] for r in runs] == [False, False]
    assert not (tmp_path / "model.bin").exists()
    # The same at stage 3 in this process (world 1), to see the message.
    config = {"train_batch_size": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    engine, *_ = zray.initialize(
        model=GPT(CFG), config={**config, "zero_optimization": {"stage": 3}}
    )
    with caplog.at_level(logging.WARNING, logger="zray"):
        assert engine.save_16bit_model(str(tmp_path)) is False
    assert "stage3_gather_16bit_weights_on_model_save is false" in caplog.text
    assert not (tmp_path / "pytorch_model.bin").exists()

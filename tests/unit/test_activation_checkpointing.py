"""Activation checkpointing on the GPT: same gradients, same names, real recomputation."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from zray.activation_checkpointing import (
    apply_activation_checkpointing,
    is_checkpointed,
    remove_activation_checkpointing,
)
from zray.models.data import lm_batch, synthetic_tokens
from zray.models.gpt import GPT, Block, GPTConfig

CFG = GPTConfig(n_layer=3, dropout=0.0)


def _model(seed: int = 0, cfg: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def _batch(cfg: GPTConfig = CFG) -> dict[str, torch.Tensor]:
    return lm_batch(synthetic_tokens(4, cfg.seq_len, cfg.vocab_size, seed=1))


def _grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("modules", ["blocks", ["Block"], ["MLP", "CausalSelfAttention"]])
def test_gradients_match_without_checkpointing(modules: str | list[str]) -> None:
    batch = _batch()
    plain = _model()
    ckpt = _model()
    apply_activation_checkpointing(ckpt, modules)
    want, got = _grads(plain, batch), _grads(ckpt, batch)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_gradients_match_with_dropout() -> None:
    # preserve_rng_state replays the forward's dropout masks in the recompute.
    cfg = CFG.with_(dropout=0.2)
    batch = _batch(cfg)
    plain, ckpt = _model(cfg=cfg), _model(cfg=cfg)
    apply_activation_checkpointing(ckpt, "blocks")
    torch.manual_seed(5)
    want = _grads(plain, batch)
    torch.manual_seed(5)
    got = _grads(ckpt, batch)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_names_and_state_dict_unchanged() -> None:
    model = _model()
    keys = list(model.state_dict())
    params = [n for n, _ in model.named_parameters()]
    wrapped = apply_activation_checkpointing(model, "blocks")
    assert wrapped == ["blocks.0", "blocks.1", "blocks.2"]
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == params
    assert all(isinstance(model.get_submodule(n), Block) for n in wrapped)
    # A checkpoint saved with checkpointing loads into a model without, and back.
    _model(seed=1).load_state_dict(model.state_dict())
    model.load_state_dict(_model(seed=2).state_dict())


def test_selection_by_class_name() -> None:
    model = _model()
    assert apply_activation_checkpointing(model, None) == []
    assert apply_activation_checkpointing(model, ["MLP"]) == [f"blocks.{i}.mlp" for i in range(3)]
    assert apply_activation_checkpointing(model, "LayerNorm") == [
        *(f"blocks.{i}.{ln}" for i in range(3) for ln in ("ln1", "ln2")),
        "ln_f",
    ]


def _count_block_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = Block.forward

    def counting(self: Block, x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(self, x)

    monkeypatch.setattr(Block, "forward", counting)
    return calls


@pytest.mark.parametrize("checkpointed", [False, True])
def test_recompute_happens(monkeypatch: pytest.MonkeyPatch, checkpointed: bool) -> None:
    model = _model()
    if checkpointed:
        apply_activation_checkpointing(model, "blocks")
    calls = _count_block_forwards(monkeypatch)
    batch = _batch()
    for step in range(1, 3):
        model(**batch).backward()
        # Per step and block: the forward, plus the recompute in backward when checkpointed.
        assert calls[0] == step * CFG.n_layer * (2 if checkpointed else 1)


def test_no_recompute_without_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    apply_activation_checkpointing(model, "blocks")
    calls = _count_block_forwards(monkeypatch)
    with torch.no_grad():
        logits = model(input_ids=_batch()["input_ids"])
    assert logits.shape == (4, CFG.seq_len, CFG.vocab_size)
    assert calls[0] == CFG.n_layer


def test_hooks_run_once_around_checkpointed_forward() -> None:
    model = _model()
    apply_activation_checkpointing(model, "blocks")
    events: list[str] = []
    block = model.blocks[1]
    block.register_forward_pre_hook(lambda m, args: events.append("pre"))
    block.register_forward_hook(lambda m, args, out: events.append("post"))
    block.mlp.register_forward_pre_hook(lambda m, args: events.append("mlp-pre"))
    block.mlp.register_forward_hook(lambda m, args, out: events.append("mlp-post"))
    model(**_batch()).backward()
    # The block's own hooks run once, around the forward; the recompute in backward calls
    # the original forward directly, so only the submodule's hooks run again, as a full pair.
    assert events == ["pre", "mlp-pre", "mlp-post", "post", "mlp-pre", "mlp-post"]


def test_idempotent() -> None:
    model = _model()
    first = apply_activation_checkpointing(model, "blocks")
    wrapper = model.blocks[0].forward
    assert apply_activation_checkpointing(model, ["Block"]) == first
    assert model.blocks[0].forward is wrapper
    assert remove_activation_checkpointing(model) == first
    assert not any(is_checkpointed(m) for m in model.modules())
    assert "forward" not in model.blocks[0].__dict__


def test_copies_stay_checkpointed_and_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    apply_activation_checkpointing(model, "blocks")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert is_checkpointed(clone.blocks[0])
        # The copy's wrapper runs the copy's block, not the original's.
        assert clone.blocks[0].forward.module is clone.blocks[0]
        calls = _count_block_forwards(monkeypatch)
        clone(**_batch()).backward()
        assert calls[0] == 2 * CFG.n_layer
        assert model.blocks[0].attn.qkv.weight.grad is None
        monkeypatch.undo()


def test_unknown_class_name_error() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"\['Blok'\].*present: \[.*'Block'.*'GPT'.*\]"):
        apply_activation_checkpointing(model, ["Block", "Blok"])
    assert not any(is_checkpointed(m) for m in model.modules())


def test_blocks_without_module_list_error() -> None:
    with pytest.raises(ValueError, match=r"found no nn.ModuleList.*\['Linear', 'Sequential'\]"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)), "blocks")

"""The slicing policy on one process: what it finds, and the errors for what it cannot slice.

At tp size 1 (no group) slicing is the identity on values, so the sliced model must compute
exactly what the whole one does; the multi-rank behaviour is in tests/distributed/test_tp_hf.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zray.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    apply_tensor_parallel,
    tp_slices,
)


class FusedAttention(nn.Module):
    """A fused qkv attention with a forward zray does not know (no split_size / head_dim)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


class HeadlessAttention(nn.Module):
    """Separate q/k/v/o projections but neither head_dim nor a head count."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)


class Block(nn.Module):
    def __init__(self, attn: nn.Module, d: int = 8) -> None:
        super().__init__()
        self.attn, self.mlp = attn, MLP(d)


def test_no_block_names_the_model_and_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"no transformer block found in Sequential.*attention"):
        apply_tensor_parallel(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), None, 0, 1)


def test_unknown_fused_attention_names_the_module() -> None:
    model = nn.Sequential(Block(FusedAttention(8)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"attention '0\.attn' \(FusedAttention\).*fused qkv"):
        apply_tensor_parallel(model, None, 0, 1)
    # Nothing was replaced: the checks all run before the first edit.
    assert type(model[0].mlp.up) is nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_attention_without_heads_names_the_module() -> None:
    model = nn.ModuleDict({"layer": Block(HeadlessAttention(8))})
    with pytest.raises(ValueError, match=r"attention 'layer\.attn'.*head_dim.*head count"):
        apply_tensor_parallel(model, None, 0, 1)


def _hf_model(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4, use_cache=False
        )
        return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_models_sliced_at_size_one_compute_the_same(name: str) -> None:
    model = _hf_model(name).eval()
    whole = copy.deepcopy(model)
    sliced = apply_tensor_parallel(model, None, 0, 1)
    prefix = "transformer.h.0" if name == "gpt2" else "model.layers.0"
    attn = (
        ("attn.c_attn", "attn.c_proj")
        if name == "gpt2"
        else ("self_attn.q_proj", "self_attn.o_proj")
    )
    mlp = ("mlp.c_fc", "mlp.c_proj") if name == "gpt2" else ("mlp.up_proj", "mlp.down_proj")
    for col, row in (attn, mlp):
        assert isinstance(model.get_submodule(f"{prefix}.{col}"), ColumnParallelLinear)
        assert isinstance(model.get_submodule(f"{prefix}.{row}"), RowParallelLinear)
        assert f"{prefix}.{col}" in sliced
    # State-dict keys and shapes are those of the whole model (Conv1D keeps its [in, out]).
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in whole.state_dict().items()
    }
    assert tp_slices(model)  # markers present, even at size 1
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, whole(input_ids=ids).logits)

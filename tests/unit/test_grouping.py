"""Tests for zray.zero.grouping: gradient buckets (stages 0-2) and stage-3 module units."""

from __future__ import annotations

import random

import torch
from torch import nn

from zray.models.gpt import GPT, GPTConfig
from zray.zero.grouping import UnitSpec, block_modules, bucket_units, module_units


class Flat(nn.Module):
    """Parameters p0, p1, ... of the given sizes, registered in order."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        for i, n in enumerate(sizes):
            self.register_parameter(f"p{i}", nn.Parameter(torch.zeros(n)))


def _small_gpt(tie: bool = False) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layer=2, n_head=2, d_model=8, tie_embeddings=tie)
    return GPT(cfg)


def _names(spec: UnitSpec) -> list[str]:
    return [n for n, _ in spec.params]


# ---- bucket_units ----------------------------------------------------------------------------


def test_bucket_units_literal() -> None:
    model = Flat([3, 5, 2, 10, 1, 4])
    specs = bucket_units(model, bucket_numel=6)
    # Reverse order: p5(4) p4(1) | p3(10, alone over the limit) | p2(2) | p1(5) | p0(3).
    assert [_names(s) for s in specs] == [["p5", "p4"], ["p3"], ["p2"], ["p1"], ["p0"]]
    assert [s.name for s in specs] == ["bucket0", "bucket1", "bucket2", "bucket3", "bucket4"]
    assert all(s.module is model and s.on_demand is False for s in specs)
    assert specs[0].params[0][1] is model.p5


def test_bucket_units_fills_up_to_the_exact_size() -> None:
    specs = bucket_units(Flat([3, 3, 3]), bucket_numel=6)
    assert [_names(s) for s in specs] == [["p2", "p1"], ["p0"]]


def test_bucket_units_one_bucket_when_everything_fits() -> None:
    specs = bucket_units(Flat([1, 2, 3]), bucket_numel=10**6)
    assert [_names(s) for s in specs] == [["p2", "p1", "p0"]]


def test_bucket_units_empty_model() -> None:
    assert bucket_units(nn.Module(), bucket_numel=8) == []


def test_bucket_units_random_invariants() -> None:
    rng = random.Random(7)
    for _ in range(300):
        sizes = [rng.randint(1, 50) for _ in range(rng.randint(1, 20))]
        bucket = rng.randint(1, 80)
        model = Flat(sizes)
        specs = bucket_units(model, bucket_numel=bucket)
        flat = [n for s in specs for n in _names(s)]
        # Every parameter once, in reverse registration order.
        assert flat == [f"p{i}" for i in reversed(range(len(sizes)))]
        for s in specs:
            total = sum(p.numel() for _, p in s.params)
            assert s.params, "no empty bucket"
            assert total <= bucket or len(s.params) == 1, (sizes, bucket, _names(s))


def test_bucket_units_tied_parameter_counted_once() -> None:
    model = _small_gpt(tie=True)
    specs = bucket_units(model, bucket_numel=300)
    seen = [id(p) for s in specs for _, p in s.params]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    names = [n for s in specs for n in _names(s)]
    assert "lm_head.weight" not in names and "tok_emb.weight" in names
    # The first bucket starts from the last registered parameter.
    assert names[:2] == ["ln_f.bias", "ln_f.weight"]


# ---- block_modules ---------------------------------------------------------------------------


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sub = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Inner(), Inner()])


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(2, 2)
        self.enc = Encoder()
        self.heads = nn.ModuleList([nn.Linear(2, 3)])
        self.heads_extra = nn.ModuleList([nn.Linear(3, 3)])


def test_block_modules_gpt() -> None:
    model = _small_gpt()
    blocks = block_modules(model)
    assert [n for n, _ in blocks] == ["blocks.0", "blocks.1"]
    assert blocks[0][1] is model.blocks[0] and blocks[1][1] is model.blocks[1]


def test_block_modules_outermost_lists_only() -> None:
    model = Nested()
    blocks = block_modules(model)
    # enc.layers.*.sub lists lie inside blocks and stay part of them; a sibling whose name
    # merely starts with the same letters ("heads_extra") is its own outermost list.
    assert [n for n, _ in blocks] == ["enc.layers.0", "enc.layers.1", "heads.0", "heads_extra.0"]
    assert blocks[0][1] is model.enc.layers[0]
    assert blocks[2][1] is model.heads[0]


def test_block_modules_none_without_module_lists() -> None:
    assert block_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []


def test_block_modules_root_module_list() -> None:
    model = nn.ModuleList([Inner(), nn.Linear(2, 2)])
    assert [n for n, _ in block_modules(model)] == ["0", "1"]


# ---- module_units ----------------------------------------------------------------------------


def test_module_units_gpt_literal() -> None:
    model = _small_gpt()
    specs = module_units(model, persistence_threshold=8)
    assert [s.name for s in specs] == ["root", "blocks.0", "blocks.1", "persistent"]
    assert [s.on_demand for s in specs] == [True, True, True, False]
    assert specs[0].module is model
    assert specs[1].module is model.blocks[0] and specs[2].module is model.blocks[1]
    assert specs[3].module is model
    assert _names(specs[0]) == ["tok_emb.weight", "pos_emb.weight", "lm_head.weight"]
    for i in (0, 1):
        b = f"blocks.{i}"
        assert _names(specs[1 + i]) == [
            f"{b}.attn.qkv.weight",
            f"{b}.attn.qkv.bias",  # 24 elements: above the threshold of 8
            f"{b}.attn.proj.weight",
            f"{b}.mlp.fc.weight",
            f"{b}.mlp.fc.bias",
            f"{b}.mlp.proj.weight",
        ]
    small = [
        "ln1.weight",
        "ln1.bias",
        "attn.proj.bias",
        "ln2.weight",
        "ln2.bias",
        "mlp.proj.bias",
    ]
    assert _names(specs[3]) == [
        *(f"blocks.0.{n}" for n in small),
        *(f"blocks.1.{n}" for n in small),
        "ln_f.weight",
        "ln_f.bias",
    ]


def test_module_units_threshold_is_inclusive() -> None:
    model = _small_gpt()
    specs = {s.name: _names(s) for s in module_units(model, persistence_threshold=24)}
    assert "blocks.0.attn.qkv.bias" in specs["persistent"]  # exactly 24 elements
    assert "blocks.0.mlp.fc.bias" in specs["blocks.0"]  # 32 elements


def test_module_units_threshold_zero_no_persistent_unit() -> None:
    model = _small_gpt()
    specs = module_units(model, persistence_threshold=0)
    assert [s.name for s in specs] == ["root", "blocks.0", "blocks.1"]
    assert _names(specs[0]) == [
        "tok_emb.weight",
        "pos_emb.weight",
        "ln_f.weight",
        "ln_f.bias",
        "lm_head.weight",
    ]
    assert len(specs[1].params) == 12


def test_module_units_cover_every_parameter_once() -> None:
    for tie in (False, True):
        model = _small_gpt(tie=tie)
        for threshold in (0, 8, 24, 10**9):
            specs = module_units(model, persistence_threshold=threshold)
            seen = [id(p) for s in specs for _, p in s.params]
            assert len(seen) == len(set(seen))
            assert set(seen) == {id(p) for p in model.parameters()}


def test_module_units_huge_threshold_everything_persistent() -> None:
    model = _small_gpt()
    specs = module_units(model, persistence_threshold=10**9)
    assert [s.name for s in specs] == ["persistent"]
    assert len(specs[0].params) == len(list(model.parameters()))


def test_module_units_tied_embeddings_in_root_once() -> None:
    model = _small_gpt(tie=True)
    specs = module_units(model, persistence_threshold=8)
    assert _names(specs[0]) == ["tok_emb.weight", "pos_emb.weight"]
    assert specs[0].params[0][1] is model.lm_head.weight


class LinBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)


class TiedAcrossBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([LinBlock(), LinBlock(), LinBlock()])
        self.blocks[2].lin.weight = self.blocks[0].lin.weight


def test_module_units_parameter_tied_across_blocks_goes_to_root() -> None:
    model = TiedAcrossBlocks()
    specs = {s.name: _names(s) for s in module_units(model, persistence_threshold=0)}
    assert specs == {
        "root": ["inp.weight", "inp.bias", "blocks.0.lin.weight"],
        "blocks.0": ["blocks.0.lin.bias"],
        "blocks.1": ["blocks.1.lin.weight", "blocks.1.lin.bias"],
        "blocks.2": ["blocks.2.lin.bias"],
    }


class TiedBlockAndRoot(nn.Module):
    """A root-level head sharing its weight with a layer inside block 0."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([LinBlock(), LinBlock()])
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.blocks[0].lin.weight


def test_module_units_parameter_tied_between_block_and_root_goes_to_root() -> None:
    model = TiedBlockAndRoot()
    specs = {s.name: _names(s) for s in module_units(model, persistence_threshold=0)}
    assert specs.get("root") == ["blocks.0.lin.weight"]
    assert specs["blocks.0"] == ["blocks.0.lin.bias"]

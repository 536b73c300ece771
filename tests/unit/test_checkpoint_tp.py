"""Checkpoints of tensor-sliced parameters: saved at one dp x tp mesh, read at any other.

Synthetic shards are cut the way the engine cuts them: each parameter sliced by its `TPSlice`
(fused qkv rows part by part, Conv1D-style columns, vocabulary rows) or replicated; each rank's
local parameters partitioned over the data-parallel ranks as ZeRO does (flat concatenation in
dp equal shards); replicated parameters saved by tp rank 0 only. Everything is read back,
by full tensor and by the slices of other tp sizes, and compared exactly with the truth.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_checkpoint_format import ENGINE, SAMPLER, save_all
from zray.checkpoint.consolidate import consolidate, inspect
from zray.checkpoint.format import MANIFEST, CheckpointFormatError, step_dir_name
from zray.checkpoint.memory import MemoryReader
from zray.checkpoint.reader import CheckpointReader
from zray.checkpoint.reshard import reshard
from zray.checkpoint.shard import ParamRange, RankShard
from zray.parallel.tp_slice import TPSlice

# name -> (full shape, sliced dim or None, parts). Every sliced length divides by 4 x parts.
PARAMS: dict[str, tuple[tuple[int, ...], int | None, int]] = {
    "tok.weight": ((16, 8), 0, 1),  # vocabulary rows
    "attn.qkv.weight": ((24, 8), 0, 3),  # fused q; k; v, part by part
    "attn.qkv.bias": ((24,), 0, 3),
    "attn.proj.weight": ((8, 8), 1, 1),  # row-parallel: input columns of [out, in]
    "mlp.c_fc.weight": ((8, 16), 1, 1),  # Conv1D [in, out] column-parallel: dim 1
    "ln.weight": ((8,), None, 1),  # replicated
}
KEYS = ("master", "exp_avg")


def truth() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        n: {k: torch.randn(shape, generator=g) for k in KEYS} for n, (shape, _, _) in PARAMS.items()
    }


def spec(name: str, tp: int, tp_rank: int) -> TPSlice | None:
    shape, dim, parts = PARAMS[name]
    return None if dim is None else TPSlice(dim, tp, tp_rank, shape, parts)


def local(full: torch.Tensor, s: TPSlice | None) -> torch.Tensor:
    return (full if s is None else s.take(full)).reshape(-1)


def mesh_shards(dp: int, tp: int, full: dict[str, dict[str, torch.Tensor]]) -> list[RankShard]:
    """The RankShards of a dp x tp job (global rank = dp_rank * tp + tp_rank), ZeRO stage 1."""
    shards = []
    for rank in range(dp * tp):
        dp_rank, tp_rank = divmod(rank, tp)
        specs = {n: spec(n, tp, tp_rank) for n in PARAMS}
        sizes = {n: local(full[n]["master"], specs[n]).numel() for n in PARAMS}
        per = -(-sum(sizes.values()) // dp)
        a, b = dp_rank * per, (dp_rank + 1) * per
        ranges, offset = [], 0
        for name, n in sizes.items():
            lo, hi = max(a, offset) - offset, min(b, offset + n) - offset
            offset += n
            if lo >= hi or (specs[name] is None and tp_rank != 0):
                continue
            tensors = {k: local(full[name][k], specs[name])[lo:hi].clone() for k in KEYS}
            ranges.append(ParamRange(name, PARAMS[name][0], lo, hi, tensors, tp=specs[name]))
        shards.append(
            RankShard(
                rank=rank,
                world_size=dp * tp,
                zero_stage=1,
                ranges=ranges,
                tp_size=tp,
                group_scalars=[{"step": 3.0}],
                param_groups=[{"lr": 1e-3}],
                engine=ENGINE,
                sampler=SAMPLER,
                rng={},
                client_state={"rank": rank},
            )
        )
    return shards


def check_reads(reader: CheckpointReader | MemoryReader, full: dict) -> None:
    """Whole tensors, and every slice of tp 1, 2, 4 in three uneven pieces, equal the truth."""
    for name, (shape, _, _) in PARAMS.items():
        assert tuple(reader.params()[name]) == shape
        for key in KEYS:
            n = full[name][key].numel()
            assert torch.equal(reader.read(name, 0, n, key), full[name][key].reshape(-1))
            for tp in (1, 2, 4):
                for r in range(tp):
                    s = spec(name, tp, r)
                    want = local(full[name][key], s)
                    n_loc = len(want)
                    cuts = [0, n_loc // 3, min(n_loc // 3 + 5, n_loc), n_loc]
                    parts = [reader.read(name, a, b, key, tp=s) for a, b in pairwise(cuts)]
                    got = torch.cat(parts)
                    assert torch.equal(got, want), (name, key, tp, r)


@pytest.mark.parametrize(("dp", "tp"), [(2, 2), (4, 1), (1, 4)], ids=lambda x: str(x))
def test_saved_at_one_mesh_reads_at_every_tp_size(tmp_path: Path, dp: int, tp: int) -> None:
    full = truth()
    shards = mesh_shards(dp, tp, full)
    assert save_all(tmp_path, 7, shards) == [None] * (dp * tp)
    step_dir = tmp_path / step_dir_name(7)
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["tp_size"] == tp
    layouts = manifest["tp_layouts"]
    if tp > 1:
        assert layouts["attn.qkv.weight"] == {"dim": 0, "size": tp, "parts": 3}
        assert layouts["mlp.c_fc.weight"] == {"dim": 1, "size": tp, "parts": 1}
        assert "ln.weight" not in layouts
    assert inspect(step_dir)["tp_size"] == tp
    with CheckpointReader(step_dir) as reader:
        assert reader.tp_size == tp and reader.world_size == dp * tp
        check_reads(reader, full)
        assert reader.rank_state(3)["client_state"] == {"rank": 3}
    check_reads(MemoryReader(shards), full)
    # Offline tools see full tensors: consolidate, and reshard (written whole, tp 1).
    out = consolidate(step_dir, tmp_path / "full.safetensors")
    flat = load_file(out)
    assert all(torch.equal(flat[n], full[n]["master"]) for n in PARAMS)
    new = reshard(step_dir, tmp_path / "resharded", 3)
    with CheckpointReader(new) as reader:
        assert reader.tp_size == 1
        check_reads(reader, full)


def test_slices_cut_differently_by_two_ranks_are_refused(tmp_path: Path) -> None:
    full = truth()
    shards = mesh_shards(1, 2, full)
    # Rank 1 claims its qkv slice without the fused parts: not the layout rank 0 used.
    bad = shards[1]
    for i, r in enumerate(bad.ranges):
        if r.name == "attn.qkv.weight":
            s = TPSlice(0, 2, 1, r.shape, 1)
            bad.ranges[i] = ParamRange(r.name, r.shape, r.lo, r.hi, r.tensors, tp=s)
    errors = save_all(tmp_path, 1, shards)
    assert isinstance(errors[0], CheckpointFormatError)
    assert "'attn.qkv.weight': rank 1 saved it sliced as" in str(errors[0])


def test_missing_slice_is_refused(tmp_path: Path) -> None:
    shards = mesh_shards(1, 2, truth())
    shards[1].ranges = [r for r in shards[1].ranges if r.name != "mlp.c_fc.weight"]
    errors = save_all(tmp_path, 1, shards)
    assert isinstance(errors[0], CheckpointFormatError)
    assert "'mlp.c_fc.weight (tp slice 1 of 2)' of shape [8, 16]: elements [0, 64)" in str(
        errors[0]
    )


def test_slice_of_another_shape_is_refused(tmp_path: Path) -> None:
    assert save_all(tmp_path, 1, mesh_shards(2, 2, truth())) == [None] * 4
    with CheckpointReader(tmp_path / step_dir_name(1)) as reader:
        other = TPSlice(0, 2, 0, (32, 8), 1)
        with pytest.raises(CheckpointFormatError, match=r"full shape \[16, 8\].*\[32, 8\]"):
            reader.read("tok.weight", 0, 4, tp=other)

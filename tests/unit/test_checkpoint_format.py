"""Tests for the sharded checkpoint format: save from every rank, read back by range.

Synthetic RankShards are cut the way ZeRO cuts them: the parameters' flat concatenation split
into `world` equal ranges (padding at the end excluded), a range that crosses a parameter
boundary split per parameter; at stage 0 every rank holds whole copies. Every rank saves from its
own thread (rank 0's commit waits for the others through the filesystem, as across processes),
then everything is read back and compared exactly.

Other test_checkpoint_*.py files import the helpers here.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zray.checkpoint.consolidate import consolidate, inspect
from zray.checkpoint.format import COMMITTED, LATEST, MANIFEST, data_file_name, step_dir_name
from zray.checkpoint.reader import CheckpointReader, latest_valid
from zray.checkpoint.shard import ParamRange, RankShard
from zray.checkpoint.writer import save_shard

PARAMS: dict[str, tuple[int, ...]] = {
    "emb.weight": (7, 5),
    "block.0.w": (5, 3),
    "block.0.b": (3,),
    "head.w": (3, 4),
    "scale": (),
}
KEYS = ("master", "exp_avg", "exp_avg_sq")


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def full_tensors(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{param: {key: flat fp32 tensor of the whole parameter}}: the ground truth."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: {k: torch.randn(numel(shape), generator=g) for k in KEYS}
        for name, shape in PARAMS.items()
    }


def zero_ranges(world: int, rank: int) -> list[tuple[str, int, int]]:
    """(name, lo, hi) that `rank` owns when the flat concatenation is split into `world`
    equal shards of ceil(total / world) elements (the tail padding owned by nobody)."""
    total = sum(numel(s) for s in PARAMS.values())
    per = -(-total // world)
    a, b = rank * per, min((rank + 1) * per, total)
    out = []
    offset = 0
    for name, shape in PARAMS.items():
        n = numel(shape)
        lo, hi = max(a, offset), min(b, offset + n)
        if lo < hi:
            out.append((name, lo - offset, hi - offset))
        offset += n
    return out


def rank_rng(rank: int) -> dict[str, Any]:
    torch_state = torch.Generator().manual_seed(100 + rank).get_state()
    return {
        "torch": torch_state,
        "cuda": None,
        "python": random.Random(rank).getstate(),
        "numpy": np.random.RandomState(rank).get_state(),
    }


ENGINE = {
    "global_steps": 12,
    "micro_steps": 48,
    "skipped_steps": 1,
    "scaler": {"scale": 65536.0, "iteration": 12, "last_overflow_iter": -1, "hysteresis_left": 2},
    "scheduler": {"last_epoch": 12, "base_lrs": [0.001, 0.0005]},
}
SAMPLER = {"epoch": 2, "index": 384, "seed": 1234}
TIED = {"head.weight": "emb.weight"}  # another name of a saved parameter


def make_shards(
    world: int, stage: int = 1, full: dict[str, dict[str, torch.Tensor]] | None = None
) -> list[RankShard]:
    full = full if full is not None else full_tensors()
    shards = []
    for rank in range(world):
        if stage == 0:
            spans = [(name, 0, numel(shape)) for name, shape in PARAMS.items()]
        else:
            spans = zero_ranges(world, rank)
        ranges = [
            ParamRange(
                name,
                PARAMS[name],
                lo,
                hi,
                {k: full[name][k][lo:hi].clone() for k in KEYS},
            )
            for name, lo, hi in spans
        ]
        shards.append(
            RankShard(
                rank=rank,
                world_size=world,
                zero_stage=stage,
                ranges=ranges,
                group_scalars=[{"step": 12.0}, {"step": 12.0}],
                param_groups=[
                    {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0},
                    {"lr": 5e-4, "betas": (0.9, 0.95), "weight_decay": 0.1},
                ],
                engine=ENGINE,
                sampler=SAMPLER,
                tied=TIED,
                rng=rank_rng(rank),
                client_state={"rank": rank, "best": float("inf"), "ids": {3: (1, "x")}},
            )
        )
    return shards


def save_all(
    root: Path, step: int, shards: list[RankShard], ranks: list[int] | None = None, **kw: Any
) -> list[BaseException | None]:
    """Every rank (or `ranks`) saves from its own thread, rank 0 started last so that it
    really waits; returns each thread's exception (None when it succeeded)."""
    ranks = list(range(len(shards))) if ranks is None else ranks
    errors: dict[int, BaseException | None] = {}

    def run(r: int) -> None:
        try:
            save_shard(root, step, shards[r], **kw)
            errors[r] = None
        except BaseException as e:
            errors[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in sorted(ranks, reverse=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [errors[r] for r in ranks]


def save_ok(root: Path, step: int, shards: list[RankShard], **kw: Any) -> Path:
    errors = save_all(root, step, shards, **kw)
    for e in errors:
        if e is not None:
            raise e
    return root / step_dir_name(step)


# ---- save everywhere, read back --------------------------------------------------------------


@pytest.mark.parametrize(("world", "stage"), [(1, 1), (2, 1), (3, 2), (4, 3), (3, 0)])
def test_round_trip_full_and_random_subranges(tmp_path: Path, world: int, stage: int) -> None:
    full = full_tensors()
    step_dir = save_ok(tmp_path, 12, make_shards(world, stage, full))

    assert (step_dir / COMMITTED).is_file()
    assert (tmp_path / LATEST).read_text() == step_dir.name
    rng = random.Random(world)
    with CheckpointReader(step_dir) as r:
        assert (r.step, r.world_size, r.zero_stage) == (12, world, stage)
        assert r.params() == PARAMS
        assert list(r.params()) == list(PARAMS)  # order kept
        for name, shape in PARAMS.items():
            n = numel(shape)
            assert r.keys(name) == set(KEYS)
            for k in KEYS:
                assert torch.equal(r.read(name, 0, n, k), full[name][k])
            for _ in range(10):
                lo = rng.randrange(n)
                hi = rng.randrange(lo, n) + 1
                k = rng.choice(KEYS)
                got = r.read(name, lo, hi, k)
                assert got.dtype == torch.float32 and got.shape == (hi - lo,)
                assert torch.equal(got, full[name][k][lo:hi])
        assert r.read("emb.weight", 4, 4).numel() == 0


def test_stage0_full_copies_are_deduplicated(tmp_path: Path) -> None:
    step_dir = save_ok(tmp_path, 1, make_shards(3, stage=0))
    manifest = json.loads((step_dir / MANIFEST).read_text())
    # One range per parameter, read from rank 0's copy; every rank's file still vouched for.
    assert [(d["name"], d["rank"]) for d in manifest["ranges"]] == [(n, 0) for n in PARAMS]
    assert all(data_file_name(r, 3) in manifest["files"] for r in range(3))


def test_stage0_ranges_from_rank0_only(tmp_path: Path) -> None:
    # An engine may skip the dead copies at stage 0: ranks > 0 save their state, no ranges.
    full = full_tensors()
    shards = make_shards(2, stage=0, full=full)
    shards[1].ranges = []
    step_dir = save_ok(tmp_path, 1, shards)
    with CheckpointReader(step_dir) as r:
        assert torch.equal(r.read("head.w", 0, 12), full["head.w"]["master"])
        assert r.rank_state(1)["client_state"]["rank"] == 1


def test_reshard_by_reading_world4_as_world3(tmp_path: Path) -> None:
    full = full_tensors()
    step_dir = save_ok(tmp_path, 3, make_shards(4, full=full))
    with CheckpointReader(step_dir) as r:
        for new_rank in range(3):
            for name, lo, hi in zero_ranges(3, new_rank):
                for k in KEYS:
                    assert torch.equal(r.read(name, lo, hi, k), full[name][k][lo:hi])


def test_rank_and_global_state_round_trip(tmp_path: Path) -> None:
    world = 3
    step_dir = save_ok(tmp_path, 5, make_shards(world))
    with CheckpointReader(step_dir) as r:
        assert r.global_state() == {"engine": ENGINE, "sampler": SAMPLER, "tied": TIED}
        for rank in range(world):
            st = r.rank_state(rank)
            assert st is not None
            want = rank_rng(rank)
            assert torch.equal(st["rng"]["torch"], want["torch"])
            assert st["rng"]["cuda"] is None
            assert st["rng"]["python"] == want["python"]
            a, b = st["rng"]["numpy"], want["numpy"]
            assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]
            # The restored states drive the generators exactly as the saved ones would.
            py = random.Random()
            py.setstate(st["rng"]["python"])
            assert py.random() == random.Random(rank).random()
            g = torch.Generator()
            g.set_state(st["rng"]["torch"])
            assert torch.equal(
                torch.rand(4, generator=g),
                torch.rand(4, generator=torch.Generator().manual_seed(100 + rank)),
            )
            nps = np.random.RandomState()
            nps.set_state(st["rng"]["numpy"])
            assert nps.rand() == np.random.RandomState(rank).rand()
            assert st["client_state"] == {"rank": rank, "best": float("inf"), "ids": {3: (1, "x")}}
            assert st["param_groups"][0]["betas"] == (0.9, 0.999)
            assert st["group_scalars"] == [{"step": 12.0}, {"step": 12.0}]
        assert r.rank_state(world) is None


# ---- consolidation and inspection ------------------------------------------------------------


def test_consolidate_safetensors_streams_exact_tensors(tmp_path: Path) -> None:
    full = full_tensors()
    step_dir = save_ok(tmp_path / "ckpt", 7, make_shards(3, full=full))
    out = consolidate(step_dir, tmp_path / "model.safetensors")
    sd = load_file(out)
    assert set(sd) == set(PARAMS) | set(TIED)  # a tied name is written as a copy
    assert torch.equal(sd["head.weight"], sd["emb.weight"])
    for name, shape in PARAMS.items():
        assert sd[name].shape == shape and sd[name].dtype == torch.float32
        assert torch.equal(sd[name].reshape(-1), full[name]["master"])

    half = load_file(consolidate(step_dir, tmp_path / "bf16.safetensors", dtype=torch.bfloat16))
    assert torch.equal(half["emb.weight"], full["emb.weight"]["master"].bfloat16().view(7, 5))
    avg = load_file(consolidate(step_dir, tmp_path / "m.safetensors", key="exp_avg"))
    assert torch.equal(avg["head.w"].reshape(-1), full["head.w"]["exp_avg"])


def test_consolidate_torch_format(tmp_path: Path) -> None:
    full = full_tensors()
    step_dir = save_ok(tmp_path / "ckpt", 7, make_shards(2, full=full))
    sd = torch.load(consolidate(step_dir, tmp_path / "model.pt", fmt="torch"), weights_only=True)
    for name, shape in PARAMS.items():
        assert torch.equal(sd[name], full[name]["master"].view(shape))
    with pytest.raises(ValueError, match="fmt: got 'npz'"):
        consolidate(step_dir, tmp_path / "x", fmt="npz")


def test_inspect_committed_and_uncommitted(tmp_path: Path) -> None:
    step_dir = save_ok(tmp_path, 7, make_shards(2))
    info = inspect(step_dir)
    assert info["committed"] and info["checksums_ok"] and info["problems"] == []
    assert (info["step"], info["world_size"], info["zero_stage"]) == (7, 2, 1)
    assert info["num_params"] == len(PARAMS)
    assert info["total_elements"] == sum(numel(s) for s in PARAMS.values())
    assert info["keys"] == sorted(KEYS)
    names = {f["name"] for f in info["files"]}
    assert {MANIFEST, COMMITTED, data_file_name(0, 2), data_file_name(1, 2)} <= names

    save_all(tmp_path, 8, make_shards(2), ranks=[1])
    info = inspect(tmp_path / step_dir_name(8))
    assert not info["committed"] and info["checksums_ok"] is None
    assert any("shard_00000.json" in p for p in info["problems"])


def test_latest_valid_on_empty_root(tmp_path: Path) -> None:
    assert latest_valid(tmp_path) is None
    assert latest_valid(tmp_path / "absent") is None

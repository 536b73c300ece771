"""Tests for AsyncSaver: the snapshot is taken at save(), errors come back through wait()."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tests.unit.test_checkpoint_format import PARAMS, full_tensors, make_shards, numel
from zray.checkpoint.async_saver import AsyncSaver
from zray.checkpoint.format import CheckpointCommitTimeout, step_dir_name
from zray.checkpoint.reader import CheckpointReader, latest_valid


def _savers_run(root: Path, step: int, shards: list, savers: list[AsyncSaver]) -> None:
    for saver, shard in zip(savers, reversed(shards), strict=True):
        saver.save(root, step, shard, commit_timeout=30.0)


def test_snapshot_isolation(tmp_path: Path) -> None:
    full = full_tensors()
    shards = make_shards(2, full=full)
    savers = [AsyncSaver(), AsyncSaver()]
    _savers_run(tmp_path, 1, shards, savers)
    # Training goes on at once: every tensor changes in place, the state dicts too.
    for shard in shards:
        for r in shard.ranges:
            for t in r.tensors.values():
                t.add_(1.0)
        shard.rng["torch"].zero_()
        shard.client_state["rank"] = 99
    results = [s.wait() for s in savers]
    assert results[1] == tmp_path / step_dir_name(1)  # savers[1] saved rank 0
    with CheckpointReader(latest_valid(tmp_path)) as r:
        for name, shape in PARAMS.items():
            for k in ("master", "exp_avg"):
                assert torch.equal(r.read(name, 0, numel(shape), k), full[name][k])
        st = r.rank_state(0)
        assert st["client_state"]["rank"] == 0
        assert st["rng"]["torch"].any()


def test_second_save_waits_for_the_first(tmp_path: Path) -> None:
    shards = make_shards(1)
    saver = AsyncSaver()
    saver.save(tmp_path, 1, shards[0])
    saver.save(tmp_path, 2, shards[0])
    assert saver.wait() == tmp_path / step_dir_name(2)
    assert saver.wait() is None
    assert latest_valid(tmp_path) == tmp_path / step_dir_name(2)


def test_exception_is_raised_by_wait_then_cleared(tmp_path: Path) -> None:
    shards = make_shards(1)
    shards[0].client_state["bad"] = threading.Lock()  # not saveable
    saver = AsyncSaver()
    saver.save(tmp_path, 1, shards[0])
    with pytest.raises(ValueError, match=r"client_state/bad: a value of type _thread.lock"):
        saver.wait()
    assert saver.wait() is None  # reported once
    del shards[0].client_state["bad"]
    saver.save(tmp_path, 2, shards[0])
    assert saver.wait() == tmp_path / step_dir_name(2)


def test_failed_save_is_reported_by_the_next_save(tmp_path: Path) -> None:
    shards = make_shards(2)
    saver = AsyncSaver()
    saver.save(tmp_path, 1, shards[0], commit_timeout=0.1)  # rank 1 never saves
    with pytest.raises(CheckpointCommitTimeout, match=r"\[1\]"):
        saver.save(tmp_path, 2, shards[0])
    assert not saver.busy


def test_copy_ranges_false_keeps_the_callers_private_tensors(tmp_path: Path) -> None:
    full = full_tensors()
    shards = make_shards(1, full=full)
    saver = AsyncSaver()
    saver.save(tmp_path, 1, shards[0], copy_ranges=False)
    shards[0].client_state["rank"] = 5  # the small state is still snapshotted
    saver.wait()
    with CheckpointReader(latest_valid(tmp_path)) as r:
        assert torch.equal(r.read("head.w", 0, 12), full["head.w"]["master"])
        assert r.rank_state(0)["client_state"]["rank"] == 0

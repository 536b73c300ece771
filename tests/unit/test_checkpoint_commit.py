"""Tests for the commit protocol: what is visible after failed, interrupted, corrupt and
repeated saves, retention (keep_last), and the coverage check rank 0 runs before committing."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.unit.test_checkpoint_format import (
    PARAMS,
    full_tensors,
    make_shards,
    numel,
    save_all,
    save_ok,
)
from zray.checkpoint.format import (
    COMMITTED,
    LATEST,
    CheckpointCommitTimeout,
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointWarning,
    data_file_name,
    piece_name,
    step_dir_name,
)
from zray.checkpoint.reader import CheckpointReader, latest_valid
from zray.checkpoint.shard import ParamRange
from zray.checkpoint.writer import save_shard


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _steps(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir())


# ---- interrupted and failed saves ------------------------------------------------------------


def test_timeout_names_missing_ranks_and_keeps_previous(tmp_path: Path) -> None:
    save_ok(tmp_path, 1, make_shards(3))
    shards = make_shards(3, full=full_tensors(seed=1))
    # Rank 1 finished; ranks 2 never came (crashed): rank 0 gives up after the timeout.
    (err0, err1) = save_all(tmp_path, 2, shards, ranks=[0, 1], commit_timeout=0.3)
    assert err1 is None
    assert isinstance(err0, CheckpointCommitTimeout)
    assert err0.missing_ranks == [2]
    assert "[2]" in str(err0) and piece_name(2) in str(err0) and step_dir_name(2) in str(err0)
    assert not (tmp_path / step_dir_name(2) / COMMITTED).exists()
    assert latest_valid(tmp_path) == tmp_path / step_dir_name(1)
    assert (tmp_path / LATEST).read_text() == step_dir_name(1)


def test_interrupted_writer_process_leaves_previous_latest(tmp_path: Path) -> None:
    """A rank killed while writing its file: no committed step, no torn file under its name."""
    save_ok(tmp_path, 1, make_shards(2))
    script = textwrap.dedent(
        f"""
        import os, sys
        import zray.checkpoint.safetensors_io as io
        from tests.unit.test_checkpoint_format import make_shards
        from zray.checkpoint.writer import save_shard
        real = io.open_atomic
        def dying(path):
            cm = real(path)
            f = cm.__enter__()
            f.write(b"half a file")
            f.flush()
            os._exit(9)  # killed mid-write: no cleanup, no exception handling
        io.open_atomic = dying
        save_shard({str(tmp_path)!r}, 2, make_shards(2)[1])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[2], env=dict(os.environ)
    )
    assert proc.returncode == 9
    step2 = tmp_path / step_dir_name(2)
    assert not (step2 / data_file_name(1, 2)).exists()  # only a hidden temp file is left
    assert not (step2 / piece_name(1)).exists()
    # Rank 0 of that save waits for rank 1's piece, which never comes.
    (err,) = save_all(tmp_path, 2, make_shards(2), ranks=[0], commit_timeout=0.2)
    assert isinstance(err, CheckpointCommitTimeout) and err.missing_ranks == [1]
    assert latest_valid(tmp_path) == tmp_path / step_dir_name(1)


def test_corrupt_shard_raises_and_latest_valid_falls_back(tmp_path: Path) -> None:
    full = full_tensors()
    save_ok(tmp_path, 1, make_shards(2, full=full))
    step2 = save_ok(tmp_path, 2, make_shards(2, full=full_tensors(seed=2)))
    bad = step2 / data_file_name(1, 2)
    _flip_byte(bad)

    with CheckpointReader(step2) as r:
        r.read("emb.weight", 0, 5)  # rank 0's file: fine
        with pytest.raises(CheckpointCorruptError) as info:
            r.read("head.w", 0, 12)  # in rank 1's range
    assert info.value.path == str(bad)
    assert str(bad) in str(info.value)
    assert info.value.expected in str(info.value) and info.value.actual in str(info.value)

    with pytest.warns(CheckpointWarning, match=data_file_name(1, 2)):
        good = latest_valid(tmp_path)
    assert good == tmp_path / step_dir_name(1)
    with CheckpointReader(good) as r:
        assert torch.equal(r.read("head.w", 0, 12), full["head.w"]["master"])


def test_missing_file_and_corrupt_manifest_fall_back(tmp_path: Path) -> None:
    save_ok(tmp_path, 1, make_shards(2))
    step2 = save_ok(tmp_path, 2, make_shards(2))
    step3 = save_ok(tmp_path, 3, make_shards(2))
    (step3 / "manifest.json").write_text("{}")
    (step2 / piece_name(1)).unlink()
    with pytest.warns(CheckpointWarning) as record:
        assert latest_valid(tmp_path) == tmp_path / step_dir_name(1)
    messages = [str(w.message) for w in record]
    assert any("manifest.json" in m for m in messages)
    assert any(piece_name(1) in m and "missing" in m for m in messages)
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json"):
        CheckpointReader(step3)


def test_uncommitted_dir_is_not_readable(tmp_path: Path) -> None:
    save_all(tmp_path, 4, make_shards(2), ranks=[1])
    with pytest.raises(CheckpointFormatError, match="not a committed checkpoint"):
        CheckpointReader(tmp_path / step_dir_name(4))


def test_resave_uncommits_first_and_ignores_stale_pieces(tmp_path: Path) -> None:
    old, new = full_tensors(seed=1), full_tensors(seed=2)
    step1 = save_ok(tmp_path, 1, make_shards(2, full=old), save_id="attempt-0")
    # The step is saved again by a restarted job. Rank 0 is first: rank 1's piece on disk is from
    # the old attempt and must not be committed with rank 0's new one.
    (err,) = save_all(
        tmp_path, 1, make_shards(2, full=new), ranks=[0], commit_timeout=0.2, save_id="attempt-1"
    )
    assert isinstance(err, CheckpointCommitTimeout) and err.missing_ranks == [1]
    assert "attempt-0" in str(err)  # says why the piece on disk did not count
    assert not (step1 / COMMITTED).exists()
    assert latest_valid(tmp_path) is None

    save_ok(tmp_path, 1, make_shards(2, full=new), save_id="attempt-1")
    with CheckpointReader(latest_valid(tmp_path)) as r:
        for name, shape in PARAMS.items():
            assert torch.equal(r.read(name, 0, numel(shape)), new[name]["master"])


def test_resave_at_another_world_size(tmp_path: Path) -> None:
    full = full_tensors(seed=3)
    save_ok(tmp_path, 1, make_shards(3))
    step1 = save_ok(tmp_path, 1, make_shards(2, full=full))
    with CheckpointReader(step1) as r:
        assert r.world_size == 2
        assert torch.equal(r.read("emb.weight", 0, 35), full["emb.weight"]["master"])


def test_newest_commit_wins_over_highest_step(tmp_path: Path) -> None:
    # A job that went back to an older checkpoint and saves again: its new save is the latest.
    save_ok(tmp_path, 5, make_shards(1))
    save_ok(tmp_path, 3, make_shards(1))
    assert latest_valid(tmp_path) == tmp_path / step_dir_name(3)
    assert (tmp_path / LATEST).read_text() == step_dir_name(3)


# ---- retention -------------------------------------------------------------------------------


def test_keep_last_prunes_old_commits_and_failed_leftovers(tmp_path: Path) -> None:
    shards = make_shards(2)
    save_ok(tmp_path, 1, shards, keep_last=2)
    save_all(tmp_path, 2, shards, ranks=[1])  # a failed save: rank 0 never came
    save_all(tmp_path, 9, shards, ranks=[1])  # "in progress" at a higher step
    for step in (3, 4, 5):
        save_ok(tmp_path, step, shards, keep_last=2)
    assert _steps(tmp_path) == [step_dir_name(s) for s in (4, 5, 9)]
    assert latest_valid(tmp_path) == tmp_path / step_dir_name(5)


def test_keep_last_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last: got 0"):
        save_shard(tmp_path, 1, make_shards(1)[0], keep_last=0)


# ---- coverage check --------------------------------------------------------------------------


def test_gap_in_ranges_is_refused_naming_parameter_and_elements(tmp_path: Path) -> None:
    shards = make_shards(2)
    dropped = shards[1].ranges.pop(0)  # a rank forgot part of a parameter
    (err0, err1) = save_all(tmp_path, 1, shards)
    assert err1 is None
    assert isinstance(err0, CheckpointFormatError)
    assert f"parameter {dropped.name!r}" in str(err0)
    assert f"elements [{dropped.lo}, {dropped.hi}) saved by no rank" in str(err0)
    assert latest_valid(tmp_path) is None


def test_partial_overlap_is_refused(tmp_path: Path) -> None:
    full = full_tensors()
    shards = make_shards(2, full=full)
    t = full["head.w"]["master"]
    # head.w is whole on rank 1 already; add two overlapping fragments as well.
    shards[1].ranges.append(ParamRange("head.w", (3, 4), 2, 6, {"master": t[2:6].clone()}))
    shards[0].ranges.append(ParamRange("head.w", (3, 4), 0, 4, {"master": t[0:4].clone()}))
    (err0, _) = save_all(tmp_path, 1, shards)
    assert isinstance(err0, CheckpointFormatError)
    assert "'head.w'" in str(err0) and "overlaps" in str(err0)


def test_manifest_records_one_copy_per_range(tmp_path: Path) -> None:
    step_dir = save_ok(tmp_path, 1, make_shards(4))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    per_param: dict[str, list[tuple[int, int]]] = {}
    for d in manifest["ranges"]:
        per_param.setdefault(d["name"], []).append((d["lo"], d["hi"]))
    for name, spans in per_param.items():
        assert spans[0][0] == 0 and spans[-1][1] == numel(PARAMS[name])
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_latest_valid_without_data_hashes_checks_sizes(tmp_path: Path) -> None:
    save_ok(tmp_path, 1, make_shards(2))
    step2 = save_ok(tmp_path, 2, make_shards(2))
    bad = step2 / data_file_name(0, 2)
    _flip_byte(bad)  # same size: only a hash finds it, when a reader opens the file
    assert latest_valid(tmp_path, verify_data=False) == step2
    with CheckpointReader(step2) as r, pytest.raises(CheckpointCorruptError):
        r.read("emb.weight", 0, 35)
    bad.write_bytes(bad.read_bytes()[:-4])  # truncated: the size check finds it
    with pytest.warns(CheckpointWarning, match="bytes; the manifest recorded"):
        assert latest_valid(tmp_path, verify_data=False) == tmp_path / step_dir_name(1)


def test_errors_survive_pickling() -> None:
    # Errors cross process boundaries (Ray actors): same type, same message, same fields.
    for e in (
        CheckpointCorruptError("/c/x.safetensors", "aa", "bb"),
        CheckpointCommitTimeout("/c/step_00000001", [1, 3], 2.5, "stale piece"),
    ):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)


def test_a_newest_checkpoint_without_its_marker_is_skipped_with_a_warning(tmp_path: Path) -> None:
    save_ok(tmp_path, 1, make_shards(2))
    step2 = save_ok(tmp_path, 2, make_shards(2))
    (step2 / COMMITTED).unlink()  # removed by hand, or a save that never finished
    with pytest.warns(
        CheckpointWarning, match=rf"skipping checkpoint .*{step_dir_name(2)}: it has no"
    ):
        assert latest_valid(tmp_path) == tmp_path / step_dir_name(1)


def test_a_full_disk_names_the_file_and_the_bytes_and_keeps_the_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import zray.checkpoint.atomic_stream as stream
    from zray.checkpoint.format import CheckpointWriteError

    save_ok(tmp_path, 1, make_shards(2))
    real = stream.open_atomic

    class Full:
        def __init__(self, f: object) -> None:
            self.f = f

        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(self.f, name)

    from contextlib import contextmanager

    @contextmanager
    def full_disk(path: Path):  # noqa: ANN202 (a context manager like open_atomic)
        with real(path) as f:
            yield Full(f)

    monkeypatch.setattr("zray.checkpoint.safetensors_io.open_atomic", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save_shard(tmp_path, 2, make_shards(2)[0])
    msg = str(info.value)
    assert f"writing {tmp_path / step_dir_name(2) / data_file_name(0, 2)}" in msg
    assert "No space left on device" in msg and "GB wanted" in msg and "GB free there" in msg
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert str(pickle.loads(pickle.dumps(info.value))) == msg  # crosses Ray to the driver
    monkeypatch.undo()
    assert latest_valid(tmp_path) == tmp_path / step_dir_name(1)


def test_a_piece_left_by_an_earlier_run_is_never_committed_with_a_new_runs(tmp_path: Path) -> None:
    """Two zray.fit runs in one directory: the first was killed after rank 1 wrote its piece of
    step 4; the second run's rank 0 saves step 4 (same attempt number, 0) and must not commit
    the first run's rank-1 piece beside its own (before run ids, both ids were 'attempt0-step4')."""
    from zray.checkpoint.manager import checkpoint_save_id
    from zray.run_records import RunSpec

    first, second = RunSpec({}, "m:f", None), RunSpec({}, "m:f", None)
    assert first.run_id != second.run_id
    old, new = full_tensors(seed=1), full_tensors(seed=2)
    (err,) = save_all(
        tmp_path,
        4,
        make_shards(2, full=old),
        ranks=[1],
        save_id=checkpoint_save_id(first.run_id, 0, 4),
    )
    assert err is None
    (err,) = save_all(
        tmp_path,
        4,
        make_shards(2, full=new),
        ranks=[0],
        commit_timeout=0.2,
        save_id=checkpoint_save_id(second.run_id, 0, 4),
    )
    assert isinstance(err, CheckpointCommitTimeout) and err.missing_ranks == [1]
    assert latest_valid(tmp_path) is None  # nothing mixed was committed

"""Disk faults under `zray fit`, on real small disks (tmpfs mounts of a few hundred KB).

- The metrics log's disk fills mid-run: the run completes, one warning names the file, and
  every line in the log is whole JSON (a write cut off by the full disk is taken back).
- The checkpoint disk fills mid-save: the run stops with one line naming the file, and the
  previous committed checkpoint is still the newest valid one and loads.
- A second run in a directory where an earlier run's save was cut off: what it commits is its
  own state, bit for bit the same as the same run in an empty directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zray
from tests.cluster import _runs
from zray.checkpoint.reader import CheckpointReader, latest_valid

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    mounted: list[Path] = []

    def mount(name: str, size_kb: int) -> Path:
        where = tmp_path / name
        where.mkdir()
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            pytest.skip(f"needs tmpfs mounts (root with CAP_SYS_ADMIN): {out.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fit_cli(cfg: dict, tmp_path: Path, data: Path) -> subprocess.CompletedProcess:
    cfg = json.loads(json.dumps(cfg))
    cfg["zray"]["data"] = str(data)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    return subprocess.run(
        [sys.executable, "-m", "zray.cli", "fit", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_a_full_metrics_disk_warns_once_and_the_run_completes(
    parquet_tokens: Path, tmp_path: Path, small_disk: Callable[[str, int], Path]
) -> None:
    logs = small_disk("metrics", 16)  # a few dozen report lines fit, then the disk is full
    cfg = _runs.config(2, steps=40, num_workers=2, metrics_dir=str(logs))
    out = fit_cli(cfg, tmp_path, parquet_tokens)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == 40
    warned = [line for line in out.stderr.splitlines() if "metrics log" in line]
    assert len(warned) == 1, out.stderr[-3000:]
    (log,) = logs.glob("*.jsonl")
    assert str(log) in warned[0] and "No space left on device" in warned[0]
    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line)["run"] for line in lines)  # no half-written line


def test_a_full_checkpoint_disk_names_the_file_and_keeps_the_previous(
    parquet_tokens: Path, tmp_path: Path, small_disk: Callable[[str, int], Path]
) -> None:
    # One checkpoint of the tiny GPT (2 ranks, stage 2) takes ~350 KB: the first save fits,
    # the second does not.
    ckpt = small_disk("ckpt", 600)
    cfg = _runs.config(
        2, steps=8, num_workers=2, checkpoint_dir=str(ckpt), checkpoint_interval=4, keep_last=2
    )
    out = fit_cli(cfg, tmp_path, parquet_tokens)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "No space left on device" in line]
    assert lines and str(ckpt / "step_00000008") in lines[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step 8 is an uncommitted save: warned about
        newest = latest_valid(ckpt)
    assert newest == ckpt / "step_00000004"
    reader = CheckpointReader(newest)
    for name, shape in reader.params().items():
        assert reader.read(name, 0, int(torch.Size(shape).numel())).isfinite().all()


@pytest.mark.usefixtures("ray_cluster")
def test_a_second_run_commits_only_its_own_state(parquet_tokens: Path, tmp_path: Path) -> None:
    first, second, clean = tmp_path / "first", tmp_path / "second", tmp_path / "clean"
    run_a = _runs.config(2, steps=4, num_workers=2, checkpoint_interval=4)
    run_b = json.loads(json.dumps(run_a))
    run_b["optimizer"]["params"]["lr"] = 1e-3  # another run: other weights at step 4
    data = str(parquet_tokens)
    zray.fit(config=run_a, data=data, checkpoint_dir=str(first), progress=False)
    zray.fit(config=run_b, data=data, checkpoint_dir=str(clean), progress=False)
    # What a save of run A cut off after rank 1's piece leaves: rank 1's files, no commit.
    kept = second / "step_00000004"
    kept.mkdir(parents=True)
    for f in (first / "step_00000004").iterdir():
        if "00001" in f.name:
            shutil.copy(f, kept / f.name)
    assert len(list(kept.iterdir())) == 2  # rank 1's piece and its data file

    # (The controller warns about the uncommitted leftover: tests/unit/test_checkpoint_commit.py.)
    run = zray.fit(config=run_b, data=data, checkpoint_dir=str(second), progress=False)
    assert [s for s, _ in run.losses] == [1, 2, 3, 4]  # a fresh start, not a resume
    for f in sorted((clean / "step_00000004").glob("*.safetensors")):
        got, want = load_file(kept / f.name), load_file(f)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (f.name, k)

"""zray.fit on a real local Ray cluster (CPU workers, gloo)."""

from __future__ import annotations

import functools
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import zray
from tests.cluster import _runs
from zray.checkpoint.reader import CheckpointReader, latest_valid

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("ray_cluster")]


def masters(step_dir: str) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(step_dir)
    return {
        name: reader.read(name, 0, int(torch.Size(shape).numel())).view(shape)
        for name, shape in reader.params().items()
    }


def test_two_workers_stage2_from_parquet_loss_falls(parquet_tokens: Path, tmp_path: Path) -> None:
    result = zray.fit(
        config=_runs.config(2, steps=30, global_batch=16, num_workers=2),
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path),
        progress=False,
    )
    assert result.steps == 30 and result.world_size == 2 and result.restarts == 0
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < first - 1.0, result.losses
    assert result.checkpoint == str(latest_valid(tmp_path))


_micro_steps = {"n": 0}  # per worker process


def kill_self_once(outputs: Any, batch: Any, step: int, rank: int, marker: str) -> Any:
    """The loss as the model gave it; rank `rank`'s process SIGKILLs itself at its `step`-th
    micro-step (one per step here), the first time only (a marker file remembers)."""
    _micro_steps["n"] += 1
    if dist.get_rank() == rank and _micro_steps["n"] == step and not Path(marker).exists():
        Path(marker).write_text("killed once")
        os.kill(os.getpid(), signal.SIGKILL)
    return outputs


# The uninterrupted run the fault tests compare with (one run for both: each costs ~10 s).
FAULT_CFG = _runs.config(1, steps=8, num_workers=2, checkpoint_interval=2, max_failures=2)


@pytest.fixture(scope="module")
def clean_run(parquet_tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return zray.fit(
        config=FAULT_CFG,
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path_factory.mktemp("clean")),
        progress=False,
    )


def test_killed_worker_recovers_exactly(
    parquet_tokens: Path, tmp_path: Path, clean_run: Any
) -> None:
    """SIGKILL one worker mid-run: the run completes from the last checkpoint and its final
    fp32 weights are bit-identical to an uninterrupted run's.

    The worker kills itself at step 5 (from the loss function), so the kill lands mid-run on
    every machine; a kill from the progress callback depended on a poll seeing step 5 before
    the run ended (once, in CI, it did not)."""
    cfg, clean = FAULT_CFG, clean_run
    marker = tmp_path / "killed"
    timelines: list[dict[str, float]] = []
    broken = zray.fit(
        config=cfg,
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path / "broken"),
        loss=functools.partial(kill_self_once, step=5, rank=1, marker=str(marker)),
        progress=lambda st: timelines.append(dict(st.timeline)),
    )
    assert marker.exists() and broken.restarts == 1 and broken.steps == 8
    # The recovery's timeline (benchmarks/recovery.py splits a restart with it): every phase
    # recorded, in order, the workers' from the new group.
    order = ["failure_seen", "torn_down", "slots_free", "group_started"]
    ranks = ["process", "run", "rendezvous", "built", "restored", "first_step"]
    line = next(t for t in reversed(timelines) if "failure_seen" in t)
    assert set(order + ranks) <= line.keys(), line
    assert [line[k] for k in order] == sorted(line[k] for k in order), line
    assert [line[k] for k in ranks] == sorted(line[k] for k in ranks), line
    assert line["torn_down"] <= line["process"] <= line["group_started"], line
    assert any(d.startswith("restart: rank") for d in broken.decisions), broken.decisions
    a, b = masters(clean.checkpoint), masters(broken.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def sigterm_self_once(outputs: Any, batch: Any, step: int, rank: int, marker: str) -> Any:
    """The loss as the model gave it; rank `rank`'s process sends itself SIGTERM (what Kubernetes
    sends a pod it evicts) at its `step`-th micro-step, the first time only."""
    _micro_steps["n"] += 1
    if dist.get_rank() == rank and _micro_steps["n"] == step and not Path(marker).exists():
        Path(marker).write_text("terminated once")
        os.kill(os.getpid(), signal.SIGTERM)
    return outputs


def test_sigterm_pauses_the_group_and_loses_no_step(
    parquet_tokens: Path, tmp_path: Path, clean_run: Any
) -> None:
    """SIGTERM to one worker mid-run (a preemption): the group pauses at the next step, hands its
    state over in memory and starts again; no restart, no step lost, and every loss and the
    final fp32 weights equal an uninterrupted run's bit for bit (the same computation resumed
    from the same state at the same world size)."""
    cfg, clean = FAULT_CFG, clean_run
    marker = tmp_path / "terminated"
    stopped = zray.fit(
        config=cfg,
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path / "stopped"),
        loss=functools.partial(sigterm_self_once, step=4, rank=1, marker=str(marker)),
        progress=False,
    )
    assert marker.exists() and stopped.steps == 8
    assert stopped.restarts == 0 and stopped.resizes == 1 and stopped.lost_steps == 0
    assert any(d.startswith("preempted: rank(s) [1] got SIGTERM") for d in stopped.decisions), (
        stopped.decisions
    )
    assert stopped.losses == clean.losses
    a, b = masters(clean.checkpoint), masters(stopped.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def four_worker_run(parquet_tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Stage 3 on 4 workers for 6 steps, a checkpoint at step 3 kept."""
    ckpt = tmp_path_factory.mktemp("four_workers")
    run = zray.fit(
        config=_runs.config(3, steps=6, num_workers=4, checkpoint_interval=3, keep_last=5),
        data=str(parquet_tokens),
        checkpoint_dir=str(ckpt),
        progress=False,
    )
    return ckpt, dict(run.losses)


@pytest.mark.parametrize(("workers", "stage"), [(2, 1), (3, 2)])
def test_resume_at_another_size_and_stage(
    parquet_tokens: Path, tmp_path: Path, four_worker_run: tuple, workers: int, stage: int
) -> None:
    """Saved at 4 workers / stage 3; resumed at `workers` / `stage`: the losses after resuming
    equal the uninterrupted 4-worker run's (same global batch) within 1e-5."""
    ckpt, uninterrupted = four_worker_run
    shutil.copytree(ckpt / "step_00000003", tmp_path / "step_00000003")
    (tmp_path / "latest").write_text("step_00000003")
    run = zray.fit(
        config=_runs.config(stage, steps=6, num_workers=workers),
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path),
        progress=False,
    )
    # Steps 1-3 come from the checkpoint's history, 4-6 were trained at the new size.
    assert [s for s, _ in run.losses] == [1, 2, 3, 4, 5, 6]
    for step, loss in run.losses:
        assert abs(loss - uninterrupted[step]) <= 1e-5 * abs(uninterrupted[step]), step

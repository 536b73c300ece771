"""Failures on a real local Ray cluster: a collective that times out, a run that gives up."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import zray
from tests.cluster import _runs
from zray.checkpoint.reader import CheckpointReader, latest_valid
from zray.cluster.controller import RunFailedError

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("ray_cluster")]

_calls = {"n": 0}  # per worker process: micro-steps seen by the loss function


def loss_that_hangs_once(outputs: Any, batch: Any, marker: str) -> torch.Tensor:
    """Rank 1 stalls at its 3rd micro-step, the first time only (a marker file remembers)."""
    _calls["n"] += 1
    if dist.get_rank() == 1 and _calls["n"] == 3 and not Path(marker).exists():
        Path(marker).write_text("hung once")
        time.sleep(120)  # rank 0 waits in a collective until the group's timeout
    return outputs


def loss_that_raises(outputs: Any, batch: Any) -> torch.Tensor:
    _calls["n"] += 1
    if dist.get_rank() == 1 and _calls["n"] == 2:
        raise RuntimeError("bad batch on rank 1")
    return outputs


def loss_nan_at(outputs: Any, batch: Any, step: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s loss is NaN at step `step` (one micro-batch per step)."""
    _calls["n"] += 1
    if dist.get_rank() == rank and _calls["n"] == step:
        return outputs * float("nan")
    return outputs


@pytest.mark.parametrize("nan_step", [10, 8])  # 8: the NaN step is also a checkpoint step
def test_a_nan_loss_stops_the_run_at_its_step_without_a_restart(
    parquet_tokens: Path, tmp_path: Path, nan_step: int
) -> None:
    cfg = _runs.config(2, steps=20, num_workers=2, checkpoint_interval=4, max_failures=2)
    with pytest.raises(RunFailedError) as e:
        zray.fit(
            config=cfg,
            data=str(parquet_tokens),
            checkpoint_dir=str(tmp_path),
            loss=functools.partial(loss_nan_at, step=nan_step, rank=1),
            progress=False,
        )
    msg = str(e.value)
    assert f"step {nan_step}: the loss is nan on rank(s) [1]" in msg, msg
    assert "not retryable" in msg and e.value.restarts == 0
    # Nothing after the NaN was saved: the newest committed checkpoint is from before it and
    # holds finite weights.
    newest = latest_valid(tmp_path)
    assert newest is not None and int(newest.name[5:]) == (nan_step - 1) // 4 * 4
    reader = CheckpointReader(newest)
    for name, shape in reader.params().items():
        assert torch.isfinite(reader.read(name, 0, int(torch.Size(shape).numel()))).all(), name


def test_with_the_switch_a_nan_step_is_skipped_and_the_run_goes_on(
    parquet_tokens: Path, tmp_path: Path
) -> None:
    """zray.skip_nonfinite_steps: the NaN step's update is skipped on every rank, nothing
    restarts, the run trains to the end and its checkpoints hold finite weights."""
    cfg = _runs.config(
        2, steps=20, num_workers=2, checkpoint_interval=4, max_failures=2, skip_nonfinite_steps=True
    )
    run = zray.fit(
        config=cfg,
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path),
        loss=functools.partial(loss_nan_at, step=10, rank=1),
        progress=False,
    )
    assert run.steps == 20 and run.restarts == 0, run.decisions
    losses = dict(run.losses)
    assert math.isnan(losses[10])
    assert all(math.isfinite(v) for s, v in losses.items() if s != 10), losses
    newest = latest_valid(tmp_path)
    assert newest is not None and newest.name == "step_00000020"
    reader = CheckpointReader(newest)
    assert reader.global_state()["engine"]["skipped_steps"] == 1
    for name, shape in reader.params().items():
        assert torch.isfinite(reader.read(name, 0, int(torch.Size(shape).numel()))).all(), name


def test_collective_timeout_restarts_the_group_and_names_the_rank_that_stalled(
    parquet_tokens: Path, tmp_path: Path
) -> None:
    cfg = _runs.config(
        2, steps=6, num_workers=2, checkpoint_interval=2, collective_timeout_s=10.0, max_failures=1
    )
    run = zray.fit(
        config=cfg,
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path),
        loss=functools.partial(loss_that_hangs_once, marker=str(tmp_path / "hung")),
        progress=False,
    )
    assert run.steps == 6 and run.restarts == 1
    restart = next(d for d in run.decisions if d.startswith("restart"))
    assert "rank 0 error" in restart, run.decisions
    # The rank the collective waited for is named, with the function it was stuck in.
    assert "rank 1 timeout: stalled in loss_that_hangs_once (" in restart, restart


def test_gives_up_after_max_failures_with_the_ranks_error(parquet_tokens: Path) -> None:
    cfg = _runs.config(2, steps=6, num_workers=2, max_failures=1)
    with pytest.raises(RunFailedError) as e:
        zray.fit(config=cfg, data=str(parquet_tokens), loss=loss_that_raises, progress=False)
    msg = str(e.value)
    assert "failed ranks: [1]" in msg and "RuntimeError: bad batch on rank 1" in msg
    assert "already restarted 1 time(s) (max_failures = 1)" in msg


def loss_not_a_scalar(outputs: Any, batch: Any) -> torch.Tensor:
    return outputs.reshape(1).expand(4)  # a user's loss that forgot to reduce


def test_code_that_fails_at_the_first_step_is_not_restarted(parquet_tokens: Path) -> None:
    cfg = _runs.config(2, steps=6, num_workers=2, max_failures=3)
    t0 = time.monotonic()
    with pytest.raises(RunFailedError) as e:
        zray.fit(config=cfg, data=str(parquet_tokens), loss=loss_not_a_scalar, progress=False)
    msg = str(e.value)
    assert "raised before the group completed a step" in msg, msg
    assert "grad can be implicitly created only for scalar outputs" in msg
    assert e.value.restarts == 0
    assert time.monotonic() - t0 < 60

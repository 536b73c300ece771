"""Tensor slicing through zray.fit: 4 CPU workers as 2 data-parallel ranks x 2 tensor ranks.

- zray.fit's losses equal the Trainer's under `zray.launch` (the engine with the same data,
  no Ray) bit for bit, and plain data-parallel training's (tp 1) to 1e-5: fp32, the sliced
  matmuls and the all-reduce of partial products only change the order of sums.
- A worker killed mid-run: the run recovers from the in-memory copies, losses bit-identical.
- Mistakes refused before any worker starts: a tp size that does not divide the heads, or
  no worker count in the range that is a multiple of it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import zray
from tests.cluster import _runs
from zray.cluster.controller import RunStatus
from zray.errors import ConfigError

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def tp_config(tp: int, **run: object) -> dict:
    cfg = _runs.config(2, steps=STEPS, num_workers=4 if tp > 1 else 2, **run)
    cfg["tensor_parallel"] = {"tp_size": tp}
    return cfg


@pytest.mark.usefixtures("ray_cluster")
def test_dp2_tp2_fit_equals_the_launched_trainer_and_plain_data_parallel(
    parquet_tokens: Path, tmp_path: Path
) -> None:
    cfg = tp_config(2)
    fitted = zray.fit(config=cfg, data=str(parquet_tokens), progress=False)
    assert fitted.world_size == 4 and fitted.steps == STEPS

    cfg["zray"]["data"] = str(parquet_tokens)
    launched = _runs.launch_trainer(cfg, 4, tmp_path)
    assert [tuple(x) for x in launched["losses"]] == fitted.losses

    plain = zray.fit(config=tp_config(1), data=str(parquet_tokens), progress=False)
    assert [s for s, _ in plain.losses] == [s for s, _ in fitted.losses]
    for (step, want), (_, got) in zip(plain.losses, fitted.losses, strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (step, got, want)


@pytest.mark.usefixtures("ray_cluster")
def test_a_killed_tensor_rank_recovers_bit_identically(parquet_tokens: Path) -> None:
    cfg = tp_config(2, replica_interval=1, max_failures=2)
    cfg["zray"]["max_steps"] = 16
    clean = zray.fit(config=cfg, data=str(parquet_tokens), progress=False)
    killed: list[int] = []

    def kill(st: RunStatus) -> None:
        if not killed and st.step >= 6 and len(st.worker_pids) == 4 and st.copy_step:
            killed.append(st.copy_step)
            os.kill(st.worker_pids[3], signal.SIGKILL)  # tensor rank 1 of data rank 1

    run = zray.fit(config=cfg, data=str(parquet_tokens), progress=kill)
    assert killed and run.restarts == 1
    assert any(d.startswith("recover from in-memory snapshots") for d in run.decisions)
    assert run.losses == clean.losses


def test_a_tp_size_that_does_not_divide_the_heads_is_refused_before_ray(
    parquet_tokens: Path,
) -> None:
    cfg = tp_config(2)
    cfg["zray"]["model_kwargs"] = {**_runs.MODEL_KWARGS, "n_head": 1}
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"tensor_parallel\.tp_size.*n_head 1 is not divisible"):
        zray.fit(config=cfg, data=str(parquet_tokens), progress=False)
    assert time.monotonic() - started < 10


def test_worker_counts_that_tp_does_not_divide_are_refused_before_ray(
    parquet_tokens: Path,
) -> None:
    cfg = tp_config(2)
    cfg["zray"]["num_workers"] = 3
    with pytest.raises(ConfigError, match=r"zray\.num_workers.*not a multiple of tensor_parallel"):
        zray.fit(config=cfg, data=str(parquet_tokens), progress=False)


def test_an_elastic_tp2_run_grows_from_2_to_4_workers_on_the_fixed_runs_losses(
    parquet_tokens: Path,
) -> None:
    """dp 1 x tp 2 -> dp 2 x tp 2 when a node joins: every step's loss equals the fixed
    dp 2 x tp 2 run's (same global batch, fp32, 1e-5: the data-parallel size changes the
    order of sums)."""
    r = _runs.scenario("tests.cluster._elastic_tp", parquet_tokens)
    assert r["fixed_world"] == r["elastic_world"] == 4, r
    assert r["world_sizes"] == [2, 4] and r["resizes"] == 1 and "added" in r["events"], r
    fixed, elastic = dict(map(tuple, r["fixed"])), dict(map(tuple, r["elastic"]))
    assert sorted(elastic) == sorted(fixed) == list(range(1, 101))
    for step, loss in fixed.items():
        assert abs(elastic[step] - loss) <= 1e-5 * abs(loss), (step, elastic[step], loss)

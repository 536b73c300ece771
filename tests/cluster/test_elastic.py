"""Elastic training on real Ray clusters: nodes join and leave, workers die mid-resize.

The multi-node scenarios run in subprocesses (each builds its own ray.cluster_utils.Cluster,
which cannot share a process with the package's local cluster); the single-kill scenario uses
the package's cluster.
"""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

import pytest

import zray
from tests.cluster import _runs
from zray.cluster.controller import RunStatus

pytestmark = pytest.mark.cluster


def test_grows_and_shrinks_with_the_loss_of_a_fixed_size_run(parquet_tokens: Path) -> None:
    """2 nodes, a third joins (grow 2 -> 3), one leaves (shrink 3 -> 2): every step's loss
    equals the fixed 2-worker run's (same global batch, fp32, 1e-5), the shrink recovers from the
    newest in-memory copy every rank had, and no checkpoint directory exists at all."""
    r = _runs.scenario("tests.cluster._elastic", parquet_tokens)
    assert set(r["events"]) == {"added", "grown", "removed"}, r
    assert r["world_sizes"] == [2, 3] and r["resizes"] == 1 and r["restarts"] == 1
    # Copies are taken off the step's path (at best every 2nd step, later when sending lags),
    # so a few steps may be redone; the recovery must go back no further than the newest copy
    # every rank had when the node was removed.
    recovered = [d for d in r["decisions"] if d.startswith("recover from in-memory snapshots")]
    assert len(recovered) == 1, r["decisions"]
    step = int(recovered[0].split("of step ")[1].split()[0])
    had = r["copy_step_at_removal"]
    assert had is not None and step >= had, (step, had)
    fixed, elastic = dict(map(tuple, r["fixed"])), dict(map(tuple, r["elastic"]))
    assert sorted(elastic) == sorted(fixed) == list(range(1, 201))
    for step, loss in fixed.items():
        assert abs(elastic[step] - loss) <= 1e-5 * abs(loss), step
    # The step goes back once, at the recovery, by no more than the steps redone.
    steps = [s for s, *_ in r["seen"]]
    drops = [a - b for a, b in itertools.pairwise(steps) if b < a]
    assert len(drops) <= 1 and sum(drops) <= r["lost_steps"], (drops, r["lost_steps"])


def test_faults_during_resize_and_below_min(parquet_tokens: Path) -> None:
    """A worker killed while the group pauses for a grow, then two nodes lost at once (below
    the minimum): the run recovers (in memory when it can, else from the last committed
    checkpoint), waits for capacity, resumes when a node returns, and completes."""
    r = _runs.scenario("tests.cluster._elastic_faults", parquet_tokens)
    assert set(r["events"]) == {"added", "killed", "shrunk", "readded"}, r
    assert r["steps"] == 200 and r["restarts"] >= 2 and r["waited"] and r["committed"]
    assert [s for s, _ in r["losses"]] == list(range(1, 201))
    assert any(d.startswith("wait: capacity") for d in r["decisions"])


@pytest.mark.usefixtures("ray_cluster")
def test_one_worker_killed_recovers_from_the_newest_copy_and_reads_no_disk(
    parquet_tokens: Path,
) -> None:
    """replica_interval 1: a SIGKILLed worker's state comes from its peer's in-memory copy, of
    a step no older than the newest copy every rank had when it was killed."""
    cfg = _runs.config(1, steps=60, num_workers=2, replica_interval=1, max_failures=2)
    clean = zray.fit(config=cfg, data=str(parquet_tokens), progress=False)
    killed: list[int | None] = []  # the newest step every rank had a copy of, at the kill

    def kill(st: RunStatus) -> None:
        if not killed and st.step >= 20 and len(st.worker_pids) == 2 and st.copy_step:
            killed.append(st.copy_step)
            os.kill(st.worker_pids[1], signal.SIGKILL)

    run = zray.fit(config=cfg, data=str(parquet_tokens), progress=kill)  # no checkpoint_dir
    assert killed and run.restarts == 1
    recovered = [d for d in run.decisions if d.startswith("recover from in-memory snapshots")]
    assert len(recovered) == 1, run.decisions
    assert int(recovered[0].split("of step ")[1].split()[0]) >= killed[0]
    assert run.losses == clean.losses  # bit-identical: same size, same order of sums

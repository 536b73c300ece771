"""What the process group of an embedded run listens on: loopback only.

A Ray worker process listens on Ray's own ports (its gRPC server; outside zray's control, token
protected). On top of those, a zray worker used to open the rendezvous TCP store (rank 0, all
interfaces, no authentication) and gloo's pair listeners on the node's address. With every rank
on one node, the ranks now meet through a file and gloo binds the loopback interface: a zray
worker listens on nothing beyond what any Ray worker listens on, except on loopback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

import zray
from tests.cluster import _runs
from tests.cluster._listeners import Listener, listeners
from zray.cluster.controller import RunStatus

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("ray_cluster")]


@ray.remote(num_cpus=0)
class _PlainActor:
    def pid(self) -> int:
        import os

        return os.getpid()


def _outward(pid: int, seen: list[Listener]) -> list[tuple[str, int]]:
    return sorted((x.address, x.port) for x in seen if x.pid == pid and not x.loopback)


def test_an_embedded_runs_process_group_listens_on_loopback_only(parquet_tokens: Path) -> None:
    plain = _PlainActor.remote()
    pid = ray.get(plain.pid.remote())
    ray_own = len(_outward(pid, listeners()))  # what any Ray worker process listens on
    ray.kill(plain)

    seen: dict[int, tuple[int, int]] = {}  # worker pid -> (outward, loopback) listeners

    def look(st: RunStatus) -> None:
        if seen or st.step < 3 or len(st.worker_pids) != 2:
            return
        now = listeners()
        for worker in st.worker_pids:
            mine = [x for x in now if x.pid == worker]
            seen[worker] = (len(_outward(worker, now)), sum(x.loopback for x in mine))

    cfg = _runs.config(2, steps=30, num_workers=2)
    zray.fit(config=cfg, data=str(parquet_tokens), progress=look)
    assert len(seen) == 2, "the run ended before its listeners were looked at"
    for worker, (outward, loopback) in seen.items():
        assert outward == ray_own, (worker, outward, ray_own)
        assert loopback >= 1, "gloo's pair listener is on loopback"

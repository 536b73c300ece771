"""What an embedded run listens on: loopback only.

- `zray fit` without --address (the demo as a user runs it): every listening socket of its
  process tree, Ray's own servers included, is bound to a loopback address (Ray in its
  single-machine mode; a FileStore rendezvous; gloo on `lo`; metrics on 127.0.0.1).
- A zray group inside a Ray started elsewhere on this machine (the test session's, on the
  machine's address): a zray worker listens on nothing beyond what any Ray worker listens on,
  except on loopback. Before, rank 0 also opened the rendezvous TCP store (all interfaces, no
  authentication) and gloo listened on the node's address.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

import zray
from tests.cluster import _runs
from tests.cluster._listeners import Listener, descendants, listeners
from zray.cluster.controller import RunStatus

pytestmark = pytest.mark.cluster


@ray.remote(num_cpus=0)
class _PlainActor:
    def pid(self) -> int:
        import os

        return os.getpid()


def _outward(pid: int, seen: list[Listener]) -> list[tuple[str, int]]:
    return sorted((x.address, x.port) for x in seen if x.pid == pid and not x.loopback)


@pytest.mark.usefixtures("ray_cluster")
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


def test_zray_fit_on_the_embedded_cluster_listens_on_loopback_only(tmp_path: Path) -> None:
    """`zray fit` with no --address, as a user runs the demo: every listening socket of its
    process tree (Ray's GCS, raylet, agents and workers, the process group, the metrics
    endpoint) is bound to a loopback address."""
    cfg = json.loads((_runs.ROOT / "examples" / "tiny_gpt.json").read_text())
    cfg["zray"]["max_steps"] = 60
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    run = subprocess.Popen(
        [sys.executable, "-m", "zray.cli", "fit", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=_runs.ROOT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    seen: set[Listener] = set()
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:
        tree = descendants(run.pid)
        seen.update(x for x in listeners() if x.pid in tree)
        time.sleep(0.5)
    out = run.communicate(timeout=60)[0]
    assert run.returncode == 0, out[-3000:]
    commands = {x.command.split()[0].rsplit("/", 1)[-1] for x in seen}
    assert len(seen) >= 5 and "raylet" in commands, sorted(seen, key=str)  # it looked in time
    outward = sorted(f"{x.address}:{x.port} {x.command[:40]}" for x in seen if not x.loopback)
    assert not outward, outward

"""A real Prometheus scrapes a real run; every dashboard panel's PromQL returns data.

The run is made to exercise every metric: 2 workers, checkpoints, and one worker killed so that
a restart, a checkpoint load and lost steps happen. Prometheus (Debian package `prometheus`,
installed by .ci/run) scrapes the controller's endpoint every second on loopback; afterwards each
expression of each panel is evaluated through the HTTP API at a moment the run was training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import zray
from tests.cluster import _runs
from tests.unit.test_dashboards import dashboard_expressions
from zray.cluster.controller import RunStatus
from zray.cluster.state import RunState
from zray.metrics.registry import METRICS

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("ray_cluster")]

ROOT = Path(__file__).resolve().parents[2]
RUN = "promtest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query(base: str, expr: str, at: float) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.fixture
def prometheus(tmp_path: Path) -> tuple[str, int]:
    if shutil.which("prometheus") is None:
        how = (
            "the `prometheus` binary is missing: `apt-get install prometheus` (Debian/Ubuntu) "
            "or a release from prometheus.io on the PATH"
        )
        if os.environ.get("ZRAY_REQUIRE_PROMETHEUS"):
            pytest.fail(how + "; CI (.ci/run) installs it and requires this test")
        pytest.skip(how + " (CI runs this test)")
    metrics_port, web_port = free_port(), free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: zray\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{web_port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield base, metrics_port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_every_dashboard_expression_returns_data(
    prometheus: tuple[str, int], parquet_tokens: Path, tmp_path: Path
) -> None:
    base, metrics_port = prometheus
    seen: list[float] = []  # moments the run was training after the restart
    killed: list[int] = []

    def watch(st: RunStatus) -> None:
        if not killed and st.step >= 12 and len(st.worker_pids) == 2:
            killed.append(st.worker_pids[1])
            os.kill(st.worker_pids[1], signal.SIGKILL)
        if (
            killed
            and st.restarts == 1
            and st.state is RunState.RUNNING
            and st.phase == "training"
            and st.step > 0
        ):
            seen.append(time.time())

    cfg = _runs.config(
        2,
        steps=150,
        num_workers=2,
        checkpoint_interval=5,
        max_failures=2,
        run_name=RUN,
        metrics_port=metrics_port,
    )
    result = zray.fit(
        config=cfg, data=str(parquet_tokens), checkpoint_dir=str(tmp_path), progress=watch
    )
    assert result.restarts == 1 and result.metrics_url.endswith(f":{metrics_port}/metrics")
    assert seen, "never saw the restarted run training"
    time.sleep(2.5)  # the last scrapes land
    # Mid-way through the restarted run: every gauge fresh, every rate window full.
    at = seen[len(seen) // 2]
    missing = []
    for expr in dashboard_expressions(ROOT / "dashboards" / "zray.json", run=RUN):
        if not query(base, expr, at):
            missing.append(expr)
    assert not missing, f"{len(missing)} panel expressions returned no data: {missing}"
    # Every declared metric was exported during the run.
    names = {s.name for s in METRICS}
    exported = {r["metric"]["__name__"] for r in query(base, '{job="zray"}', at)}
    assert names <= exported, names - exported
    # And the JSONL log: a line per rank each time the controller saw a new step (it polls, so
    # fast steps are sampled), ending with the last step of both ranks.
    rows = [json.loads(ln) for ln in (tmp_path / f"{RUN}.metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == {RUN} and {r["rank"] for r in rows} == {0, 1}
    assert max(r["zray_step"] for r in rows if r["rank"] == 0) == 150

"""A real Prometheus scrapes a real run; every dashboard panel's PromQL returns data.

The run is made to exercise every metric: 2 workers, checkpoints, and one worker killed so that
a restart, a checkpoint load and lost steps happen. Prometheus (Debian package `prometheus`,
installed by .ci/run) scrapes the controller's endpoint every second on loopback; afterwards each
expression of each panel is evaluated through the HTTP API at a moment the run was training.
"""

from __future__ import annotations

import functools
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
from tests.cluster.test_fit import kill_self_once
from tests.unit.test_dashboards import dashboard_expressions
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
    marker = tmp_path / "killed"
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
        config=cfg,
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path),
        # Rank 1 SIGKILLs itself at step 12: a restart, a checkpoint load and lost steps.
        loss=functools.partial(kill_self_once, step=12, rank=1, marker=str(marker)),
        progress=False,
    )
    assert result.restarts == 1 and result.metrics_url.endswith(f":{metrics_port}/metrics")
    # The moments rank 0 trained after the restart, from the run's own JSONL log (written as
    # the controller saw each step), not from a poll that had to land mid-run.
    rows = [json.loads(ln) for ln in (tmp_path / f"{RUN}.metrics.jsonl").read_text().splitlines()]
    killed_at = marker.stat().st_mtime
    seen = sorted(r["time"] for r in rows if r["rank"] == 0 and r["time"] > killed_at)
    assert len(seen) > 10, "too few steps logged after the restart"
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
    assert {r["run"] for r in rows} == {RUN} and {r["rank"] for r in rows} == {0, 1}
    assert max(r["zray_step"] for r in rows if r["rank"] == 0) == 150

"""A node that goes away mid-run: the run restarts on the node that is left and completes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


def test_node_removed_mid_run(parquet_tokens: Path) -> None:
    # Its own Ray cluster (several nodes) cannot share this process with the session's one.
    out = subprocess.run(
        [sys.executable, "-m", "tests.cluster._node_loss", str(parquet_tokens)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # not another Ray's
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["removed"]) == 1
    assert report["steps"] == 40 and report["restarts"] >= 1, report
    assert any(d.startswith("restart: rank") for d in report["decisions"]), report

"""A node that goes away mid-run: the run restarts on the node that is left and completes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import _runs

pytestmark = pytest.mark.cluster


def test_node_removed_mid_run(parquet_tokens: Path) -> None:
    report = _runs.scenario("tests.cluster._node_loss", parquet_tokens, timeout=300)
    assert len(report["removed"]) == 1
    assert report["steps"] == 40 and report["restarts"] >= 1, report
    assert any(d.startswith("restart: rank") for d in report["decisions"]), report

"""The controller's JSONL metrics log: a failed write (disk full, read-only, a directory where
the file should be) never takes training down; it is warned about once, the lines are kept and
written when the file can be written again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zray.metrics.exporter import RunMetrics


def values(step: int) -> dict[str, float]:
    return {"zray_step": float(step), "zray_loss": 1.0 / step}


def test_a_failing_log_is_warned_once_and_caught_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "run.metrics.jsonl"
    m = RunMetrics("run", path)
    m.update_rank(0, "n", 2, values(1))
    path.unlink()
    path.mkdir()  # the file cannot be opened for writing now (root ignores permission bits)
    with caplog.at_level("WARNING", logger="zray.metrics"):
        for step in (2, 3, 4):
            m.update_rank(0, "n", 2, values(step))  # no exception: training goes on
    warned = [r for r in caplog.records if "metrics log" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0].getMessage()
    assert "Is a directory" in warned[0].getMessage() and m.write_failures == 3
    path.rmdir()
    m.update_rank(0, "n", 2, values(5))
    steps = [json.loads(line)["zray_step"] for line in path.read_text().splitlines()]
    assert steps == [2.0, 3.0, 4.0, 5.0]  # step 1's file was replaced; the rest came through


def test_a_log_directory_that_cannot_be_made_does_not_stop_the_run(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    m = RunMetrics("run", blocker / "sub" / "run.metrics.jsonl")
    m.update_rank(0, "n", 2, values(1))
    assert m.write_failures == 2  # the directory, then the first line

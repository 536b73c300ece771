"""The `zray` command: fit (local workers), report, and a clear error for a bad config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def zray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zray.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.cluster
def test_fit_demo_config_trains(tmp_path: Path) -> None:
    cfg = json.loads((ROOT / "examples" / "tiny_gpt.json").read_text())
    cfg["zray"].update(max_steps=30, checkpoint_dir=str(tmp_path / "ckpt"))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    out = zray("fit", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 30
    assert summary["final_loss"] < 3.0  # from ~5.5 (uniform over 256)
    assert (tmp_path / "ckpt" / "step_00000030" / "COMMITTED").exists()


def test_report_lists_kernels() -> None:
    out = zray("report")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert "sumsq_nonfinite" in info["kernels"]["kernels"]
    assert info["torch"].startswith("2.")


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"zero_optimization": {"stgae": 2}}))
    out = zray("fit", str(path))
    assert out.returncode == 2
    assert "zero_optimization.stgae" in out.stderr and "stage" in out.stderr
    assert "Traceback" not in out.stderr

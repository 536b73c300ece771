"""The `zray` command: fit (local workers), report, and a clear error for a bad config."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
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
    # The demo sets no key zray warns about: the workers, which read the driver's to_dict()
    # (every key written), must not warn either.
    assert "ZrayConfigWarning" not in out.stderr, out.stderr[-3000:]


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


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    out = zray("fit", str(tmp_path / "nope.json"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.json" in lines[0] and "No such file" in lines[0], out.stderr


def test_gpus_asked_for_on_a_machine_without_is_refused_before_ray_starts(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = json.loads((ROOT / "examples" / "tiny_gpt.json").read_text())
    cfg["zray"]["use_gpu"] = True
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    t0 = time.monotonic()
    out = zray("fit", str(path))
    assert out.returncode == 2 and time.monotonic() - t0 < 30
    assert "zray.use_gpu" in out.stderr and "no CUDA device" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Started a local Ray" not in out.stderr


@pytest.mark.cluster
def test_ctrl_c_stops_the_run_and_says_where_to_resume(tmp_path: Path) -> None:
    cfg = json.loads((ROOT / "examples" / "tiny_gpt.json").read_text())
    cfg["zray"].update(
        max_steps=100_000, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_interval=5
    )
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "zray.cli", "fit", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "ckpt").glob("step_*/COMMITTED")):
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint committed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("zray fit: interrupted; workers stopped; the last committed checkpoint")
    assert str(tmp_path / "ckpt" / "step_") in last
    assert "[zray] metrics: http://127.0.0.1:" in err  # the URL was printed at the start


def test_a_missing_data_path_fails_in_seconds_before_ray(tmp_path: Path) -> None:
    cfg = json.loads((ROOT / "examples" / "tiny_gpt.json").read_text())
    cfg["zray"]["data"] = str(tmp_path / "missing.parquet")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    t0 = time.monotonic()
    out = zray("fit", str(path))
    assert out.returncode == 2 and time.monotonic() - t0 < 15, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.parquet" in lines[0] and "does not exist" in lines[0]
    assert "Started a local Ray" not in out.stderr

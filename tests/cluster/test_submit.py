"""`zray submit` against a real Ray head with the Jobs API and token authentication on.

The head is this module's own (`ray start --head --block` in a new session, loopback dashboard,
its own --temp-dir and ports), not the session's `ray_cluster` fixture: the Jobs API needs the
dashboard, which that cluster leaves out. It is stopped by pid, never with `ray stop`, which
would kill every Ray process on the machine, including other tests' and other users' clusters.
Cost: ~5 s to start the head, ~8 s per job (job supervisor actor, runtime env, driver).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAD_START_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 180.0


@dataclass
class Head:
    url: str  # the dashboard (Jobs API) URL, on loopback
    token: str
    proc: subprocess.Popen[bytes]
    temp_dir: Path
    log: Path

    def env(self, token: str | None = None, auth: bool = True) -> dict[str, str]:
        """The environment of a `zray submit` process talking to this head."""
        env = dict(os.environ)
        # Ray's Jobs client prefers these over any address it is given; a value left over from
        # elsewhere would send the test's jobs to another cluster.
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_API_SERVER_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        if auth:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN"] = token or self.token
        else:
            env.pop("RAY_AUTH_MODE", None)
            env.pop("RAY_AUTH_TOKEN", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_pids(session_id: int, marker: str) -> list[int]:
    """Live processes in session `session_id` or whose command line names `marker` (the head's
    temp dir): this head's processes and nobody else's."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        state, sid = fields[0], int(fields[3])
        if state != "Z" and (sid == session_id or marker in cmdline):
            found.append(int(entry.name))
    return found


def stop_head(head: Head) -> None:
    """SIGTERM to `ray start --block` makes it drain and stop every process it started; then
    whatever of this head is still alive is killed by pid."""
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.proc.kill()
            head.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (left := session_pids(head.proc.pid, str(head.temp_dir))) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def wait_ready(head: Head) -> None:
    """Until the Jobs API answers an authenticated request (the dashboard starts its job module
    after the HTTP server)."""
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    request = urllib.request.Request(
        f"{head.url}/api/jobs/", headers={"Authorization": f"Bearer {head.token}"}
    )
    while True:
        if head.proc.poll() is not None:
            raise RuntimeError(
                f"ray start exited with {head.proc.returncode}:\n{head.log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Jobs API at {head.url} not ready after {HEAD_START_TIMEOUT_S} s:\n"
                f"{head.log.read_text()[-3000:]}"
            )
        time.sleep(0.5)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # A short path: Ray's Unix sockets live under it and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="zsub", dir="/tmp"))
    token = secrets.token_hex(32)
    (gcs, client, dash, agent_http, agent_grpc, metrics, env_agent, node_mgr, obj_mgr) = free_ports(
        9
    )
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    log = temp_dir / "ray_start.log"
    cmd = [
        *(sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"),
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--ray-client-server-port={client}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    with open(log, "wb") as out:
        # A new session: its id (= this pid) marks every process of this head for stop_head.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    h = Head(f"http://127.0.0.1:{dash}", token, proc, temp_dir, log)
    try:
        wait_ready(h)
        yield h
    finally:
        stop_head(h)
        # Keep the temp dir (logs, sockets) only if some process of the head refused to die.
        if not session_pids(proc.pid, str(temp_dir)):
            shutil.rmtree(temp_dir, ignore_errors=True)


def zray_submit(
    head: Head, *command: str, working_dir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "zray.cli", "submit"),
            *("--address", head.url, "--working-dir", str(working_dir), "--"),
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        env=env or head.env(),
        cwd=working_dir,
    )


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """A working dir with a file the job lists, and dirs the upload must leave out."""
    (tmp_path / "data.txt").write_text("payload\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000001")
    (tmp_path / "runs" / "step_00000002").mkdir(parents=True)
    (tmp_path / "runs" / "step_00000002" / "COMMITTED").write_text("{}")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "junk.o").write_bytes(b"\0" * 16)
    return tmp_path


LIST_FILES = (
    "import os; print('hello from zray job', "
    "sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk('.') for f in fs))"
)


@pytest.mark.cluster
def test_a_job_that_succeeds_exits_0_with_its_output(head: Head, job_dir: Path) -> None:
    out = zray_submit(head, "python", "-c", LIST_FILES, working_dir=job_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("hello from zray job")]
    assert lines, out.stdout
    # The working dir came along, minus checkpoints (by root name or step dir) and build/.
    assert lines[0] == "hello from zray job ['data.txt']", lines[0]
    assert "SUCCEEDED" in out.stderr


@pytest.mark.cluster
def test_a_job_that_fails_exits_1_with_the_failed_status(head: Head, job_dir: Path) -> None:
    out = zray_submit(head, "python", "-c", "raise SystemExit(3)", working_dir=job_dir)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    status = [ln for ln in out.stderr.splitlines() if ln.startswith("[zray] job ")]
    assert status and "FAILED (exit code 3)" in status[-1], out.stderr[-3000:]
    assert "exit code 3" in status[-1]


@pytest.mark.cluster
def test_the_token_is_required_and_checked(head: Head, job_dir: Path) -> None:
    for env, why in (
        (head.env(auth=False), "Authentication required"),  # no token sent: 401
        (head.env(token=secrets.token_hex(32)), "Authentication failed"),  # wrong token: 403
    ):
        out = zray_submit(head, "python", "-c", "print('never runs')", working_dir=job_dir, env=env)
        assert out.returncode == 2, out.stderr[-3000:]
        assert why in out.stderr and head.url in out.stderr, out.stderr[-3000:]
        assert "Traceback" not in out.stderr and "never runs" not in out.stdout


@pytest.mark.cluster
def test_an_explicit_address_is_not_silently_replaced(head: Head, job_dir: Path) -> None:
    # Ray's Jobs client would use RAY_ADDRESS (this head) instead of --address: refused.
    env = dict(head.env(), RAY_ADDRESS=head.url)
    other = f"http://127.0.0.1:{free_ports(1)[0]}"
    out = subprocess.run(
        [sys.executable, "-m", "zray.cli", "submit", "--address", other, "--", "true"],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        env=env,
        cwd=job_dir,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert other in out.stderr and "RAY_ADDRESS" in out.stderr, out.stderr[-3000:]


@pytest.mark.cluster
def test_no_wait_returns_once_the_job_is_accepted(head: Head, job_dir: Path) -> None:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "zray.cli", "submit", "--no-wait"),
            *("--address", head.url, "--no-working-dir", "--", "python", "-c", "print(1)"),
        ],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        env=head.env(),
        cwd=job_dir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"submitted job (raysubmit_\w+)", out.stderr)
    assert match and "ray job logs" in out.stderr, out.stderr[-3000:]
    request = urllib.request.Request(
        f"{head.url}/api/jobs/{match.group(1)}",
        headers={"Authorization": f"Bearer {head.token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        job = json.loads(r.read())
    assert job["entrypoint"] == "python -c 'print(1)'"
    assert job["metadata"] == {"submitted_by": "zray"}


@pytest.mark.cluster
def test_zray_fit_runs_as_a_job(head: Head, tmp_path: Path) -> None:
    """`zray submit -- zray fit run.json`: the job's driver joins the head (RAY_ADDRESS)."""
    run = {
        "train_batch_size": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        "zero_optimization": {"stage": 1},
        "zray": {
            "model": "zray.models.gpt:build",
            "model_kwargs": {"size": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
            "data": {"synthetic": {"seq_len": 32, "vocab_size": 256, "n_samples": 256}},
            "num_workers": 2,
            "max_steps": 6,
            "log_interval": 3,
        },
    }
    (tmp_path / "run.json").write_text(json.dumps(run))
    out = zray_submit(head, "zray", "fit", "run.json", working_dir=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("{")))
    assert summary["steps"] == 6 and summary["world_size"] == 2

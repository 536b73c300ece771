"""`zray submit`: hand a command to a Ray cluster as a Ray Job, follow its logs to the end.

    zray submit --address http://head:8265 -- zray fit config.json

The command runs on the cluster's head node (the job's driver), in a copy of the local working
directory that Ray uploads (runtime_env "working_dir"), minus what never belongs in a job
package: VCS data, build output, wheels, checkpoints (DEFAULT_EXCLUDES; Ray also honours the
directory's .gitignore and .rayignore files). Ray packs and uploads the directory on every
submit: a large working dir costs its zip time and upload.

Address: the Jobs API speaks HTTP to the head's dashboard, so the address is the dashboard's URL
(default DEFAULT_ADDRESS) or a Ray Client address ("ray://head:10001", which Ray translates).
Ray's Jobs client lets RAY_API_SERVER_ADDRESS or RAY_ADDRESS, when set, replace whatever address
it is given: zray does not read them itself (Ray does), and refuses an explicit --address that
Ray would silently replace.

Authentication: Ray's token authentication stays as Ray configures it. With RAY_AUTH_MODE=token
the Jobs client sends the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
with every request; a cluster that requires a token refuses requests without it (401/403, which
surface as SubmitError naming the address).
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from zray.errors import ZrayError

# The Jobs API's usual address on a head node; loopback, so a default never reaches out.
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# gitignore-style patterns (relative to the working dir) left out of the uploaded package.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    "build/",
    ".whl/",  # wheels carried for GPU machines (see DESIGN.md, Machines)
    "*.whl",
    "__pycache__/",
    "checkpoints/",
    # zray checkpoint step dirs wherever they sit (step_ + 8 or more digits: format.py's
    # step_dir_name): a checkpoint root may have any name, its step dirs never do.
    "step_[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]*/",
)

# Ray's job states that end a job (JobStatus.is_terminal()), for messages.
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

# Status polling after the log stream ends: the stream closes when the driver exits, and the
# status turns terminal a moment later.
_POLL_S = 0.5


class SubmitError(ZrayError):
    """The job could not be submitted or followed (address, connection, authentication)."""


@dataclass
class JobOutcome:
    """How a submitted job ended (status None: submitted with wait=False, not followed)."""

    submission_id: str
    address: str  # the dashboard URL the Jobs client used
    status: str | None  # "SUCCEEDED", "FAILED", "STOPPED", or None when not waited for
    message: str | None = None  # Ray's explanation ("Job entrypoint command failed ...")
    driver_exit_code: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


def submit(
    entrypoint: Sequence[str] | str,
    address: str | None = None,
    working_dir: Path | str | None = ".",
    *,
    wait: bool = True,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    logs: TextIO | None = None,
    info: TextIO | None = None,
) -> JobOutcome:
    """Submit `entrypoint` as a Ray Job at `address` and (with wait) follow it to its end.

    entrypoint: argv (quoted for the shell the Jobs API runs it with) or one shell string.
    address: the dashboard URL or a ray:// address; None for DEFAULT_ADDRESS (which Ray replaces
        with RAY_ADDRESS when that is set).
    working_dir: uploaded as the job's working directory, minus `excludes`; None uploads nothing
        (the command then runs in the head's default directory).
    logs: where the job's output goes (default stdout); info: zray's own lines (default stderr),
        so that `zray submit ... > job.log` captures the job's output alone.
    Raises SubmitError when the cluster cannot be reached, refuses the token, or rejects the job.
    """
    logs = logs or sys.stdout
    info = info or sys.stderr
    command = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
    if not command.strip():
        raise SubmitError(
            f"entrypoint: got {entrypoint!r}; allowed: a non-empty command, e.g. "
            "`zray submit -- zray fit config.json`"
        )
    runtime_env = _runtime_env(working_dir, excludes)
    client = _connect(address)
    used = client.get_address()
    try:
        job_id = client.submit_job(
            entrypoint=command,
            runtime_env=runtime_env,
            metadata={"submitted_by": "zray"},
        )
    except Exception as e:  # Ray raises RuntimeError / AuthenticationError / upload errors
        raise SubmitError(f"{used}: submitting {command!r} failed: {e}") from e
    print(f"[zray] submitted job {job_id} to {used}: {command}", file=info, flush=True)
    if not wait:
        print(
            f"[zray] follow it with: ray job logs --address {used} --follow {job_id}",
            file=info,
            flush=True,
        )
        return JobOutcome(job_id, used, None)
    try:
        _follow_logs(client, job_id, logs, info)
        details = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        # Stop following, not the job: it runs on the cluster whatever this process does.
        print(
            f"\n[zray] stopped following job {job_id}; it keeps running. Stop it with: "
            f"ray job stop --address {used} {job_id}",
            file=info,
            flush=True,
        )
        raise
    outcome = JobOutcome(
        job_id,
        used,
        str(details.status),
        details.message,
        getattr(details, "driver_exit_code", None),
    )
    code = "" if outcome.driver_exit_code is None else f" (exit code {outcome.driver_exit_code})"
    print(
        f"[zray] job {job_id} {outcome.status}{code}: {outcome.message or ''}".rstrip(": "),
        file=info,
        flush=True,
    )
    return outcome


def _runtime_env(working_dir: Path | str | None, excludes: Sequence[str]) -> dict[str, Any]:
    if working_dir is None:
        return {}
    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise SubmitError(f"working_dir: {str(working_dir)!r} is not a directory")
    return {"working_dir": str(wd), "excludes": list(excludes)}


def _connect(address: str | None) -> Any:
    """A JobSubmissionClient for `address`; SubmitError when the cluster cannot be reached."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    wanted = address or DEFAULT_ADDRESS
    try:
        client = JobSubmissionClient(wanted)
    except AuthenticationError as e:
        # Ray's message says which of "no token sent" (401) / "wrong token" (403) it was.
        raise SubmitError(
            f"address {wanted!r}: the cluster refused the request: {e}\n(the Jobs client sends "
            "a token only with RAY_AUTH_MODE=token; it reads RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        ) from e
    except Exception as e:  # ConnectionError, ValueError for unknown schemes, ...
        raise SubmitError(
            f"address {wanted!r}: cannot reach the Ray Jobs API: {e}; allowed: the head's "
            "dashboard URL (http://HOST:8265) or a Ray Client address (ray://HOST:10001)"
        ) from e
    used = client.get_address()
    # Ray replaces the given address with RAY_API_SERVER_ADDRESS / RAY_ADDRESS when set. For the
    # default that is the point; an address typed on the command line must not be overruled
    # silently. Only http(s) addresses can be compared: Ray translates the others.
    if (
        address is not None
        and address.startswith(("http://", "https://"))
        and used.rstrip("/") != address.rstrip("/")
    ):
        raise SubmitError(
            f"address: got {address!r}, but Ray's Jobs client uses {used!r} from the "
            "RAY_API_SERVER_ADDRESS or RAY_ADDRESS environment variable; unset it, or drop "
            "--address"
        )
    return client


def _follow_logs(client: Any, job_id: str, logs: TextIO, info: TextIO) -> None:
    """Copy the job's output to `logs` as it comes, until the driver exits."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            logs.write(chunk)
            logs.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:
        # The stream broke (head restarted, proxy timeout); the status poll below still tells
        # how the job ended, and `ray job logs` has the rest.
        print(f"[zray] log stream of job {job_id} ended early: {e}", file=info, flush=True)


def _wait_terminal(client: Any, job_id: str) -> Any:
    """The job's details once its status is terminal (polls every _POLL_S seconds)."""
    while True:
        try:
            details = client.get_job_info(job_id)
        except Exception as e:
            raise SubmitError(f"job {job_id}: cannot read its status: {e}") from e
        if str(details.status) in _TERMINAL:
            return details
        time.sleep(_POLL_S)

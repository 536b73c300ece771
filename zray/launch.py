"""Local multi-process launching (until the Ray runtime lands, and for tests).

Two ways in:
- `launch_local(fn, nprocs, *args)`: run a picklable function on N spawned processes joined in a
  gloo (or NCCL) group; returns each rank's result. Errors from all ranks come back as one
  `WorkerGroupError` naming every failed rank.
- `python -m zray.launch --nproc N script.py [args...]`: run a script N times with the launcher
  variables set, like torchrun or the `deepspeed` launcher (`--local_rank` is passed as well).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import queue
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

from zray.env import DistEnv, export_dist_env
from zray.errors import ZrayError


class WorkerGroupError(ZrayError):
    """One report for the failures of several ranks."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = failures
        ranks = ", ".join(str(r) for r in sorted(failures))
        parts = [f"{len(failures)} rank(s) failed: {ranks}"]
        for r in sorted(failures):
            parts.append(f"--- rank {r} ---\n{failures[r].rstrip()}")
        super().__init__("\n".join(parts))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (loopback: nothing listens outside)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _child(
    env: DistEnv, threads: int, fn: Callable[..., Any], args: tuple[Any, ...], out: mp.Queue
) -> None:
    os.environ.update(export_dist_env(env))
    try:
        import torch

        torch.set_num_threads(threads)
        # Plain pickle bytes, not the queue's own pickler: torch's multiprocessing reductions
        # would pass tensors as shared-memory handles that die with this process.
        out.put((env.rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        out.put((env.rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch_local(
    fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = 600.0
) -> list[Any]:
    """Run `fn(*args)` on `nprocs` fresh processes; return the results in rank order."""
    ctx = mp.get_context("spawn")
    results: queue.Queue = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    procs = []
    for rank in range(nprocs):
        env = DistEnv(rank, nprocs, rank, "127.0.0.1", port)
        p = ctx.Process(target=_child, args=(env, threads, fn, args, results), daemon=True)
        p.start()
        procs.append(p)
    got: dict[int, Any] = {}
    failures: dict[int, str] = {}
    try:
        while len(got) + len(failures) < nprocs:
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue.Empty:
                missing = set(range(nprocs)) - set(got) - set(failures)
                for r in missing:
                    code = procs[r].exitcode
                    failures[r] = (
                        f"no result after {timeout:.0f} s"
                        if code is None
                        else f"process exited with code {code} before reporting"
                    )
                break
            if ok:
                got[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
            if not ok:
                # One rank's failure leaves its peers blocked in collectives: end them too.
                timeout = min(timeout, 30.0)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if failures:
        raise WorkerGroupError(failures)
    return [got[r] for r in range(nprocs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zray.launch", description="Run a training script on N local processes."
    )
    parser.add_argument(
        "--nproc", "--nproc_per_node", "--num_gpus", dest="nproc", type=int, default=1
    )
    parser.add_argument("--master_port", type=int, default=0)
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    a = parser.parse_args(argv)
    if a.nproc < 1:
        parser.error(f"--nproc: got {a.nproc}; allowed: 1 or more")
    port = a.master_port or free_port()
    procs = []
    for rank in range(a.nproc):
        env = dict(os.environ)
        env.update(export_dist_env(DistEnv(rank, a.nproc, rank, "127.0.0.1", port)))
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.nproc)))
        cmd = [sys.executable, a.script, f"--local_rank={rank}", *a.script_args]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    failed = [r for r, c in enumerate(codes) if c != 0]
    if failed:
        print(
            f"zray.launch: rank(s) {failed} exited with codes {[codes[r] for r in failed]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

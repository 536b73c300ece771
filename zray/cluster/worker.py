"""The Worker actor: one per GPU (or CPU slot), hosting one Trainer (zray/trainer.py).

Several threads (max_concurrency): `run()` trains in one; `report()`, `request_pause()`,
`keep_replica()` and `snapshots()` answer in the others, also while training is blocked in a
collective whose peer has died.

SIGTERM (a KubeRay pod deleted, a node drained, a spot instance reclaimed) while training asks
the group to pause, as a resize does: every rank stops at the same step and hands its state
over in memory, and the controller starts the group again from it, so no step is lost. The
process then ends when the controller ends the group. A second SIGTERM, or one that comes while
this process is not training, gets Ray's own handling (the process exits).
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from types import FrameType
from typing import Any

import ray

from zray.checkpoint.manager import Resume
from zray.checkpoint.replica import ReplicaStore
from zray.checkpoint.shard import PackedShard
from zray.env import DistEnv
from zray.launch import free_port
from zray.run_records import Report, RunOutcome, RunSpec
from zray.trainer import Trainer


def send_to(holder: Any, rank: int) -> Callable[[int, PackedShard], Callable[[], None]]:
    """A Trainer `send_copy` that hands copies to `holder`'s keep_replica (an actor)."""

    def send(step: int, packed: PackedShard) -> Callable[[], None]:
        ref = holder.keep_replica.remote(rank, step, packed)
        return lambda: ray.get(ref)

    return send


@ray.remote(max_concurrency=4)
class Worker:
    def __init__(self) -> None:
        self.loop: Trainer | None = None
        self.replicas = ReplicaStore()
        self._training_thread: int | None = None  # the thread running `run`, for `stack`
        self._store_dir: str | None = None  # made by store_file(), removed after run()
        self._pause_requested = False
        self._created = time.time()  # for the recovery timeline (Report.milestones)
        # What the first model and engine build would import, started now, to overlap the
        # group's rendezvous instead of following it. Measured on 2 cores (RESULTS.md,
        # "Recovery"): ~1 s moved from "build" to "rendezvous", no clear net gain there.
        threading.Thread(target=_prewarm, name="zray-prewarm", daemon=True).start()
        self._training = False  # inside run()
        self.preempted = False  # a SIGTERM came while training: the group pauses and hands over
        # Ray's actor __init__ runs on the process's main thread, where handlers must be set.
        self._ray_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._training and not self.preempted:
            self.preempted = True
            self.request_pause()
            return
        if callable(self._ray_sigterm):
            self._ray_sigterm(signum, frame)
        elif self._ray_sigterm != signal.SIG_IGN:  # SIG_DFL: end as the default would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def reset(self) -> None:
        """Ready this process for a new group after its group failed (zray.cluster.group
        .Survivors): the old Trainer and process group gone, the old group's state copies
        dropped (they are of another group's steps and shards), no pause pending."""
        import torch.distributed as dist

        self.loop = None
        self.replicas = ReplicaStore()
        self._pause_requested = False
        self.preempted = False
        self._training_thread = None
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()  # the old engine's tensors, before the new one is built

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it: rank 0's process group store."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def store_file(self) -> str:
        """A file path in a new private directory on this node, for a group whose ranks all
        run here to meet through (torch's FileStore): no TCP store listens. The directory
        goes when rank 0's run ends."""
        self._store_dir = tempfile.mkdtemp(prefix="zray-rendezvous-")  # mode 0700
        return os.path.join(self._store_dir, "store")

    def run(
        self,
        spec: RunSpec,
        rank: int,
        world: int,
        master_addr: str,
        master_port: int,
        resume: Resume,
        attempt: int,
        holder: Any = None,
        store_file: str | None = None,
    ) -> RunOutcome:
        self._training_thread = threading.get_ident()
        self._training = True
        send = send_to(holder, rank) if holder is not None else None
        # What the Trainer gets holds no Ray objects: the data and the in-memory state to
        # resume from may come as refs into the object store.
        spec = replace(spec, data=_resolve(spec.data))
        if isinstance(resume, list):
            resume = [_resolve(item) for item in resume]
        env = DistEnv(rank, world, 0, master_addr, master_port, store_file)
        self.loop = Trainer(spec, env, resume, attempt, send, created=self._created)
        if self._pause_requested:
            self.loop.request_pause()
        try:
            outcome = self.loop.train()
            return replace(outcome, preempted=self.preempted) if self.preempted else outcome
        finally:
            self._training = False
            if self._store_dir is not None:
                shutil.rmtree(self._store_dir, ignore_errors=True)

    def stack(self) -> tuple[str, str] | None:
        """Where the training thread is now: its Python stack (innermost call last) and the
        innermost frame as `function (file:line)`. None before training starts or after it
        ended. Answered on another of the actor's threads, also while training is stuck."""
        frame = sys._current_frames().get(self._training_thread or -1)
        if frame is None:
            return None
        summary = traceback.extract_stack(frame)
        last = summary[-1]
        return "".join(summary.format()), f"{last.name} ({last.filename}:{last.lineno})"

    def report(self) -> Report | None:
        if self.loop is None:
            return None
        # The Ray node id, so that the controller (and tests) know where each rank runs.
        return replace(self.loop.report(), node=ray.get_runtime_context().get_node_id())

    def request_pause(self) -> None:
        # Asked before `run` built its Trainer (it may still be fetching the state to resume
        # from): remembered and passed on, or the group would never pause and the controller
        # would wait in RESIZING until the run ends.
        self._pause_requested = True
        if self.loop is not None:
            self.loop.request_pause()

    def keep_replica(self, rank: int, step: int, packed: PackedShard) -> None:
        self.replicas.keep(rank, step, packed)

    def snapshots(self) -> dict[int, list[tuple[int, PackedShard]]]:
        """Every complete copy this process holds: its own rank's and its peer's, by rank."""
        out = self.replicas.held()
        if self.loop is not None:
            out.setdefault(self.loop.rank, []).extend(self.loop.snapshots())
        return out


def _prewarm() -> None:
    """Import what building a Trainer imports on first use. torch's optimizers import
    torch._dynamo (a second and a half on one core) the first time one is constructed."""
    import torch._dynamo  # noqa: F401

    import zray.data.collate
    import zray.data.loader
    import zray.data.prefetch
    import zray.engine  # noqa: F401


def _resolve(item: Any) -> Any:
    return ray.get(item) if isinstance(item, ray.ObjectRef) else item

"""A group of Worker actors in one placement group, as the controller sees it.

The controller talks to a group only through the `WorkerGroup` protocol (`start`, `poll`,
`survivors`, `shutdown`, ...), so its state machine can be driven in tests by a fake group.

After a failure on CPU workers the processes that are still alive and idle are kept for the
next group at the same size (`Survivors`): only the lost ranks get new processes. Starting a worker process and
its first model and engine build cost seconds each (imports, first-time set-up of torch and
zray); a kept process has paid them already.
"""

from __future__ import annotations

import contextlib
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

from zray.checkpoint.manager import Resume
from zray.checkpoint.shard import PackedShard
from zray.cluster.policy import Failure, FailureKind
from zray.errors import ConfigError, NonFiniteError, ZrayError
from zray.run_records import Report, RunOutcome, RunSpec


class GroupStartError(ZrayError):
    def __init__(self, failures: list[Failure]) -> None:
        self.failures = failures
        super().__init__("; ".join(f"rank {f.rank} {f.kind}: {f.message}" for f in failures))


@dataclass
class GroupPoll:
    reports: list[Report] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    outcome: RunOutcome | None = None  # rank 0's, once every rank has finished
    # Every rank's outcome, by rank, once all have finished (all paused, for a resize).
    outcomes: dict[int, RunOutcome] = field(default_factory=dict)


@dataclass
class Survivors:
    """What a failed group leaves to the next: its placement group (`size` bundles) and, by
    rank, the workers whose processes are alive and idle (reset for a new run). Rank r runs in
    bundle r, so a new group of the same size gives each kept worker its old rank and starts new
    workers in the bundles of the ranks that were lost."""

    pg: Any
    size: int
    actors: dict[int, Any]

    def discard(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)
        self.actors = {}


class WorkerGroup(Protocol):
    size: int

    def start(self, resume: Resume, attempt: int, reuse: Survivors | None = None) -> None: ...
    def survivors(self, grace_s: float) -> Survivors | None: ...
    def poll(self) -> GroupPoll: ...
    def request_pause(self) -> None: ...
    def snapshots(self) -> dict[int, list[tuple[int, PackedShard]]]: ...
    def shutdown(self) -> None: ...


class RayWorkerGroup:
    """N Worker actors, one bundle each ({"CPU": 1} or {"CPU": 1, "GPU": 1}), packed."""

    def __init__(
        self,
        spec: RunSpec,
        size: int,
        use_gpu: bool,
        start_timeout_s: float,
        replicas: bool = False,
        solo_holder: Any = None,
        tp: int = 1,
    ) -> None:
        assert size % tp == 0, (size, tp)  # the batch plan only offers multiples of tp
        self.spec, self.size, self.use_gpu, self.replicas = spec, size, use_gpu, replicas
        self.tp = tp
        self.start_timeout_s = start_timeout_s
        # Who keeps a copy of a single worker's state (the controller): with peers, each rank's
        # copy goes to the next rank.
        self.solo_holder = solo_holder
        self.pgs: list[Any] = []
        self.actors: list[Any] = []
        self.runs: list[Any] = []
        self._finished: dict[int, RunOutcome] = {}

    def start(self, resume: Resume, attempt: int, reuse: Survivors | None = None) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from zray.cluster.worker import Worker

        if reuse is not None and (reuse.size != self.size or self.tp != 1):
            reuse.discard()  # another size (or tensor groups): a new placement
            reuse = None
        kept = reuse.actors if reuse is not None else {}
        if reuse is not None:
            self.pgs = [reuse.pg]
        else:
            self._place()
        per_group = self.size // len(self.pgs)
        self.actors = [
            kept[i]
            if i in kept
            else Worker.options(
                num_cpus=1,
                num_gpus=1 if self.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pgs[i // per_group],
                    placement_group_bundle_index=i % per_group,
                ),
            ).remote()
            for i in range(self.size)
        ]
        self._launch(resume, attempt)

    def _place(self) -> None:
        """New placement groups for the whole group; waits until they are placed."""
        import ray
        from ray.util.placement_group import placement_group

        bundle = {"CPU": 1.0, "GPU": 1.0} if self.use_gpu else {"CPU": 1.0}
        # One placement group per tensor group, all of it on one node (its collectives run in
        # every layer); the data-parallel groups may spread. Without tensor slicing, one group
        # packed as tightly as the cluster allows. Rank r is bundle r % tp of group r // tp
        # (tensor ranks contiguous: see zray.parallel.context's Note on the mesh).
        if self.tp == 1:
            self.pgs = [placement_group([bundle] * self.size, strategy="PACK")]
        else:
            self.pgs = [
                placement_group([bundle] * self.tp, strategy="STRICT_PACK")
                for _ in range(self.size // self.tp)
            ]
        try:
            ray.get([pg.ready() for pg in self.pgs], timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise GroupStartError(
                [
                    Failure(
                        -1,
                        FailureKind.TIMEOUT,
                        (
                            f"{self.size} worker bundles of {bundle}"
                            + (f" (tensor groups of {self.tp} on one node)" if self.tp > 1 else "")
                            + " not placed within "
                            f"{self.start_timeout_s:.0f} s (zray.start_timeout_s): the cluster lacks "
                            "the resources"
                        ),
                    )
                ]
            ) from None

    def _launch(self, resume: Resume, attempt: int) -> None:
        """Rendezvous through rank 0, then start every rank's run."""
        import ray

        try:
            addr, port = ray.get(self.actors[0].rendezvous.remote(), timeout=self.start_timeout_s)
            nodes = ray.get([a.node.remote() for a in self.actors], timeout=self.start_timeout_s)
            # All ranks on one node (an embedded cluster, a small run): they meet through a
            # file there, and no socket of the process group faces the network.
            one_node = len(set(nodes)) == 1
            store_file = ray.get(self.actors[0].store_file.remote()) if one_node else None
        except Exception as e:
            raise GroupStartError(
                [Failure(0, FailureKind.DIED, f"rendezvous failed: {e!r}")]
            ) from e
        if isinstance(resume, list):
            # Into the object store once, not serialised again for every worker.
            resume = [ray.put(resume)]
        self.runs = [
            actor.run.remote(
                self.spec,
                rank,
                self.size,
                addr,
                port,
                resume,
                attempt,
                self._holder(rank),
                store_file,
            )
            for rank, actor in enumerate(self.actors)
        ]
        self._finished = {}

    def _holder(self, rank: int) -> Any:
        if not self.replicas:
            return None
        return self.actors[(rank + 1) % self.size] if self.size > 1 else self.solo_holder

    def poll(self) -> GroupPoll:
        import ray

        out = GroupPoll()
        ready, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        for ref in ready:
            rank = self.runs.index(ref)
            if rank in self._finished:
                continue
            try:
                self._finished[rank] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                out.failures.append(Failure(rank, FailureKind.DIED, _first_line(e)))
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if hasattr(e, "cause") else None
                out.failures.append(
                    Failure(
                        rank,
                        FailureKind.ERROR,
                        _tail(e),
                        retryable=_retryable(cause),
                        progressed=self._progressed(rank),
                    )
                )
        if out.failures:
            if any(_TIMED_OUT.search(f.message) for f in out.failures):
                out.failures += self._stragglers({f.rank for f in out.failures})
            return out
        refs = [a.report.remote() for a in self.actors]
        for rank, ref in enumerate(refs):
            try:
                report = ray.get(ref, timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                out.failures.append(Failure(rank, FailureKind.DIED, _first_line(e)))
                continue
            except ray.exceptions.GetTimeoutError:
                continue  # a busy worker answers next time; a dead one shows up above
            if report is not None:
                out.reports.append(report)
        if len(self._finished) == self.size:
            out.outcome = self._finished[0]
            out.outcomes = dict(self._finished)
        return out

    def _stragglers(self, failed: set[int]) -> list[Failure]:
        """After a collective timed out: the ranks that did not arrive, with where they were.

        The ranks waiting in the collective time out together; a rank still running a moment
        later (stuck in its own code, or waiting elsewhere) is the one they waited for."""
        import ray

        pending = [r for r in range(self.size) if r not in failed and r not in self._finished]
        if not pending:
            return []
        _, running = ray.wait(
            [self.runs[r] for r in pending], num_returns=len(pending), timeout=_ARRIVAL_GRACE_S
        )
        out = []
        for ref in running:
            rank = self.runs.index(ref)
            try:
                where = ray.get(self.actors[rank].stack.remote(), timeout=10)
            except Exception as e:  # the report goes on without the stack
                text = f"its stack could not be read ({type(e).__name__})"
            else:
                text = (
                    "it was not training"
                    if where is None
                    else f"its training thread (innermost call last):\n{where[0].rstrip()}\n"
                    f"stalled in {where[1]}"
                )
            message = f"did not arrive at the collective the other ranks timed out in; {text}"
            out.append(Failure(rank, FailureKind.TIMEOUT, message))
        return out

    def _progressed(self, rank: int) -> bool:
        """Whether the rank completed a step before its run raised (its actor still answers)."""
        import ray

        try:
            report = ray.get(self.actors[rank].report.remote(), timeout=10)
        except Exception:
            return True  # unknown: treat as transient
        return report is None or report.steps_done > 0

    def request_pause(self) -> None:
        for actor in self.actors:
            actor.request_pause.remote()

    def snapshots(self) -> dict[int, list[tuple[int, PackedShard]]]:
        """In-memory snapshots held by the workers still alive, merged by rank."""
        import ray

        merged: dict[int, list[tuple[int, PackedShard]]] = {}
        for actor in self.actors:
            try:
                held = ray.get(actor.snapshots.remote(), timeout=60)
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.GetTimeoutError,
                # The answer was stored on the holder's node, which went away before it was
                # fetched (two nodes lost at once): as good as a dead holder.
                ray.exceptions.ObjectLostError,
            ):
                continue  # dead (or hung): its snapshots died with it
            for rank, snaps in held.items():
                merged.setdefault(rank, []).extend(snaps)
        return merged

    def survivors(self, grace_s: float) -> Survivors | None:
        """End this group, keeping what the next group at the same size can reuse: the
        placement group and every worker whose run ended (within `grace_s`) because a peer
        failed and that answers a reset. A worker still running (blocked in a collective), one
        whose own code failed, or a dead one is ended. None (everything ended) on GPUs (see
        below), with tensor groups, or when the placement group lost bundles with a node."""
        import ray
        from ray.util.placement_group import placement_group_table

        # GPUs: not yet. A rank whose NCCL collective failed may need its communicator
        # aborted, and its CUDA context may not be usable; unmeasured, so every process goes.
        if self.use_gpu or self.tp != 1 or len(self.pgs) != 1 or not self.runs:
            self.shutdown()
            return None
        # Each run that ends is reset at once, so that a rank blocked on it (gloo waits on a
        # live peer until that peer's sockets close) can fail within the grace too. Measured:
        # one rank of 4 still stays blocked in a reduce-scatter and is replaced (RESULTS.md,
        # "Recovery").
        resets: dict[int, Any] = {}
        waiting = list(self.runs)
        deadline = time.monotonic() + grace_s
        while waiting and (left := deadline - time.monotonic()) > 0:
            ended, waiting = ray.wait(waiting, num_returns=1, timeout=left)
            for ref in ended:
                rank = self.runs.index(ref)
                if _ended_by_a_peer(ref):  # a rank whose own code failed gets a new process
                    resets[rank] = self.actors[rank].reset.remote()
            if not ended:
                break
        kept: dict[int, Any] = {}
        for rank, actor in enumerate(self.actors):
            if rank in resets:
                try:
                    ray.get(resets[rank], timeout=10)
                except Exception:  # dead, or stuck: a new process takes its rank
                    pass
                else:
                    kept[rank] = actor
                    continue
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        out = Survivors(self.pgs[0], self.size, kept)
        self.actors, self.runs, self.pgs = [], [], []
        if placement_group_table(out.pg).get("state") != "CREATED":
            out.discard()  # bundles went with a node: place the next group afresh
            return None
        return out

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        for pg in self.pgs:
            remove_placement_group(pg)
        self.actors, self.runs, self.pgs = [], [], []

    def pids(self) -> list[int]:
        """Worker process ids (for tests and benchmarks that kill one)."""
        return [r.pid for r in self.poll().reports]


# A collective that timed out, in the words of gloo, NCCL and torch.distributed.
_TIMED_OUT = re.compile(r"timed ?out|timeout", re.IGNORECASE)
# How long the other ranks get to end their runs after the first timeout is seen: the ranks
# waiting in one collective time out within moments of each other.
_ARRIVAL_GRACE_S = 2.0


# What gloo and torch.distributed say when a peer's process or connection went away.
_PEER_LOST = re.compile(
    r"connection (reset|closed|refused)|closed by peer|broken pipe|gloo/transport", re.IGNORECASE
)


def _ended_by_a_peer(ref: Any) -> bool:
    """Whether a run that ended did so because another rank failed (its process is then as
    good as new): it raised torch.distributed's error or a lost connection. A run that failed
    in its own code (user code, a CUDA error) may have left its process broken: not reused."""
    import ray
    import torch.distributed as dist

    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        return isinstance(cause, dist.DistError) or bool(_PEER_LOST.search(str(cause)))
    except Exception:
        return False  # the process died
    return True  # it ended normally (paused or finished): idle


def _retryable(cause: BaseException | None) -> bool:
    """Errors a restart cannot cure: bad configs or data, code that does not import."""
    from zray.checkpoint.format import CheckpointWriteError
    from zray.data.errors import DataError

    # A disk that cannot take the checkpoint stays so across a restart: say so once, at once.
    permanent = (
        ConfigError,
        DataError,
        NonFiniteError,
        CheckpointWriteError,
        ImportError,
        SyntaxError,
    )
    return not isinstance(cause, permanent)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _tail(e: BaseException, lines: int = 12) -> str:
    text = str(e) or "".join(traceback.format_exception(e))
    return "\n".join(text.strip().splitlines()[-lines:])

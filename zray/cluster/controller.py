"""The controller: a state machine that starts the worker group, watches it, and recovers.

`Controller.step()` runs one iteration (one state's work) and returns the new state, so tests
drive it one step at a time with a fake WorkerGroup. `ControllerActor` runs the loop in Ray.

[Note: recovery] Any worker failure (its process or node gone, an exception, a collective
timeout surfacing as an exception) ends the whole group: survivors are blocked in collectives
with a dead peer and cannot continue. The failure policy decides restart or give up; a restart
tears the group down and starts a new one on the resources there are — the largest valid world
size between min and max workers — resuming from the newest state it can assemble: in-memory
snapshots (each rank's own, plus the copy its peer keeps, refreshed every `replica_interval`
steps) when every rank's state of one step survives, else the last committed checkpoint.

[Note: resizing] Every `scale_interval_s` the controller compares the capacity (workers running
plus free worker slots) with the current size. When a larger valid size fits, it asks the
workers to pause: they agree on the step through the vote in the logging all-reduce, hand over
their state in memory, and a group of the new size restores it (a reshard, not a replay): no
step is lost. Shrinking happens on a failure, at once, to whatever size the capacity allows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from zray.checkpoint.manager import Resume
from zray.checkpoint.shard import PackedShard
from zray.cluster.group import GroupPoll, GroupStartError, WorkerGroup
from zray.cluster.policy import Action, Decision, Failure, FailureKind, FailurePolicy
from zray.cluster.state import (
    ControllerState,
    Errored,
    Finished,
    Initializing,
    Recovering,
    Resizing,
    Running,
    RunState,
    Scheduling,
    Waiting,
    check_transition,
)
from zray.errors import ZrayError
from zray.run_records import Report, RunOutcome, WorkerPhase

if TYPE_CHECKING:
    from zray.metrics.exporter import RunMetrics

log = logging.getLogger("zray.controller")


# After a failure, how long the other ranks' runs get to end before their processes are ended
# instead of kept. Ranks that end do so within milliseconds (gloo raises when a peer's
# connection drops); a rank blocked in a collective on a live peer can wait until its timeout
# (seen: a reduce-scatter on gloo), and starting a new process for it is the faster way.
SURVIVOR_GRACE_S = 0.5


class RunFailedError(ZrayError):
    """The run gave up: one report merging what every failed rank said."""

    def __init__(self, decision: Decision, failures: list[Failure], restarts: int = 0) -> None:
        self.decision, self.failures, self.restarts = decision, failures, restarts
        ranks = sorted({f.rank for f in failures})
        lines = [f"training failed ({decision.reason}); failed ranks: {ranks}"]
        for f in failures:
            lines.append(f"--- rank {f.rank} ({f.kind}) ---\n{f.message.rstrip()}")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[type, tuple[Decision, list[Failure], int]]:
        # Crosses from the controller actor to the driver: rebuild from the parts.
        return (RunFailedError, (self.decision, self.failures, self.restarts))


@dataclass
class RunStatus:
    state: RunState
    step: int = 0
    loss: float | None = None
    tokens_per_s: float = 0.0  # all ranks, over the last ~20 s
    mfu: float | None = None  # rank 0's model FLOPs utilisation over the same window
    copy_interval: float = 0.0  # steps between rank 0's last two in-memory state copies
    # The newest step every rank has an acknowledged in-memory copy of: where a recovery
    # without disk would go back to, at least (None: no copy everywhere yet).
    copy_step: int | None = None
    world_size: int = 0
    restarts: int = 0
    resizes: int = 0
    lost_steps: int = 0
    checkpoint_step: int | None = None
    worker_pids: list[int] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)
    phase: WorkerPhase = WorkerPhase.STARTING  # rank 0's
    decisions: list[str] = field(default_factory=list)  # every decision, with its reason
    error: str | None = None
    metrics_url: str | None = None  # where the run's metrics are served, if they are
    # Wall-clock times (time.time()) of the last (re)start, for recovery and resize benchmarks:
    # the controller's "failure_seen" (a recovery) or "pause_asked" and "handed_over" (a grow:
    # the group asked to pause, every rank's state in), "torn_down" (the old group ended),
    # "slots_free" (capacity for the new group seen), "group_started" (its actors answering),
    # then the workers' Report.milestones, each the latest over the ranks (the group is as far
    # as its slowest rank).
    timeline: dict[str, float] = field(default_factory=dict)


class Controller:
    def __init__(
        self,
        make_group: Callable[[int], WorkerGroup],
        num_workers: int | tuple[int, int],
        policy: FailurePolicy,
        latest_checkpoint: Callable[[], str | None],
        metrics: RunMetrics | None = None,
        *,
        valid_sizes: list[int] | None = None,
        capacity: Callable[[int], int] | None = None,
        scale_interval_s: float = 5.0,
        min_wait_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        held: Callable[[], dict[int, list[tuple[int, PackedShard]]]] | None = None,
    ) -> None:
        lo, hi = (num_workers, num_workers) if isinstance(num_workers, int) else num_workers
        self.min_workers, self.max_workers = lo, hi
        self.valid_sizes = sorted(valid_sizes or list(range(lo, hi + 1)))
        self.make_group, self.policy = make_group, policy
        self.latest_checkpoint = latest_checkpoint
        # Without a capacity probe (tests, fixed runs) the largest valid size is assumed to fit.
        self.capacity = capacity or (lambda current: self.valid_sizes[-1])
        self.scale_interval_s, self.min_wait_s, self.clock = scale_interval_s, min_wait_s, clock
        # Copies of workers' state held outside the group (the controller's own, for a single
        # worker): they survive the group.
        self.held = held or dict
        self.at: ControllerState = Initializing()  # the state, with what it carries
        self.group: WorkerGroup | None = None
        self.restarts = 0
        self.resizes = 0
        self.status = RunStatus(RunState.INITIALIZING)
        self.metrics = metrics
        self.lost_steps = 0
        self.resize_seconds = 0.0
        self._last_scale_check = clock()
        self._last_capacity = 0  # the capacity the last sizing decision saw

    @property
    def state(self) -> RunState:
        return self.at.kind

    @property
    def outcome(self) -> RunOutcome | None:
        return self.at.outcome if isinstance(self.at, Finished) else None

    @property
    def error(self) -> Exception | None:
        return self.at.error if isinstance(self.at, Errored) else None

    @property
    def elastic(self) -> bool:
        return len(self.valid_sizes) > 1

    # ---- bookkeeping ---------------------------------------------------------------------------

    def _go(self, new: ControllerState) -> RunState:
        check_transition(self.state, new.kind)
        self.at = new
        self.status.state = new.kind
        self._publish()
        return new.kind

    def _note(self, line: str) -> None:
        log.warning("controller decision: %s", line)
        self.status.decisions.append(line)

    def _publish(self) -> None:
        if self.metrics is None:
            return
        self.metrics.update_controller(
            {
                "zray_world_size": float(self.status.world_size if self.group else 0),
                "zray_restarts_total": float(self.restarts),
                "zray_resizes_total": float(self.resizes),
                "zray_lost_steps_total": float(self.lost_steps),
                "zray_resize_seconds_total": self.resize_seconds,
                "zray_controller_state": {s.value: float(s is self.state) for s in RunState},
            }
        )

    def _target_size(self, current: int) -> int | None:
        """The largest valid world size that fits the capacity (None: not even the minimum)."""
        cap = self._last_capacity = self.capacity(current)
        fits = [n for n in self.valid_sizes if n <= cap]
        return fits[-1] if fits else None

    def _decide(self, failures: list[Failure]) -> RunState:
        decision = self.policy.decide(failures, self.restarts)
        self._note(f"{decision.action.value}: {decision.reason}")
        if decision.action is Action.RESTART:
            self.status.timeline = {"failure_seen": time.time()}
            return self._go(Recovering(started=self.clock(), redo_from=self.status.step))
        error = RunFailedError(decision, failures, self.restarts)
        self.status.error = str(error)
        if self.group is not None:
            self.group.shutdown()
        return self._go(Errored(error))

    # ---- one iteration -------------------------------------------------------------------------

    def step(self) -> RunState:
        at = self.at
        if isinstance(at, Initializing):
            return self._go(Scheduling())
        if isinstance(at, Scheduling):
            return self._schedule(at)
        if isinstance(at, Running):
            return self._running(at)
        if isinstance(at, Resizing):
            return self._resizing(at)
        if isinstance(at, Recovering):
            return self._recover(at)
        if isinstance(at, Waiting):
            return self._wait(at)
        return self.state  # finished or errored: nothing more to do

    def _schedule(self, at: Scheduling) -> RunState:
        # Kept workers hold their bundles: they count as capacity the new group has.
        size = self._target_size(at.survivors.size if at.survivors is not None else 0)
        if at.want is not None and (size or 0) < at.want and self.clock() < at.settle_until:
            return self.state  # the old group's slots are still being released
        if size is None and at.survivors is not None:
            at.survivors.discard()  # waiting: give their slots back
            at = replace(at, survivors=None)
        if size is None:
            # The capacity the decision was taken on (probing again could give another count).
            self._note(
                f"wait: capacity for {self._last_capacity} workers; the run trains at "
                f"{self.valid_sizes} workers (the sizes that keep its global batch)"
            )
            return self._go(Waiting(since=self.clock(), then=replace(at, want=None)))
        resume = at.resume if at.resume is not None else self.latest_checkpoint()
        self.status.timeline["slots_free"] = time.time()
        self.group = self.make_group(size)
        try:
            self.group.start(resume, self.restarts + self.resizes, reuse=at.survivors)
        except GroupStartError as e:
            return self._decide(e.failures)
        self.status.world_size = self.group.size
        self.status.timeline["group_started"] = time.time()
        where = "in-memory state" if isinstance(resume, list) else resume
        if resume:
            self._note(f"started {self.group.size} workers from {where}")
        else:
            self._note(f"started {self.group.size} workers")
        if at.resize_started is not None:
            self.resize_seconds += self.clock() - at.resize_started
        return self._go(Running(redo_from=at.redo_from))

    def _running(self, at: Running) -> RunState:
        assert self.group is not None
        polled = self.group.poll()
        self._absorb(polled.reports)
        if polled.failures:
            return self._decide(polled.failures)
        if polled.outcome is not None:
            if polled.outcome.paused:  # paused on its own: treat as a handover
                stopped = sorted(r for r, o in polled.outcomes.items() if o.preempted)
                if stopped:
                    self._note(
                        f"preempted: rank(s) {stopped} got SIGTERM; the group paused after "
                        f"step {polled.outcome.steps} and starts again from its state in "
                        "memory (no step lost)"
                    )
                return self._take_handover(polled, want=None)
            self.group.shutdown()
            return self._go(Finished(polled.outcome))
        if self.elastic and self.clock() - self._last_scale_check >= self.scale_interval_s:
            self._last_scale_check = self.clock()
            target = self._target_size(self.group.size)
            if target is not None and target > self.group.size:
                self._note(
                    f"grow: capacity for {target} workers ({self.group.size} now); "
                    "pausing at the next logged step to reshard in memory"
                )
                self.status.timeline = {"pause_asked": time.time()}
                self.group.request_pause()
                return self._go(Resizing(want=target, started=self.clock()))
        return self.state

    def _resizing(self, at: Resizing) -> RunState:
        assert self.group is not None
        polled = self.group.poll()
        self._absorb(polled.reports)
        if polled.failures:
            return self._decide(polled.failures)
        if polled.outcome is None:
            return self.state
        if not polled.outcome.paused:  # finished before it could pause: nothing to resize
            self.group.shutdown()
            return self._go(Finished(polled.outcome))
        return self._take_handover(polled, want=at.want, started=at.started)

    def _take_handover(
        self, polled: GroupPoll, want: int | None, started: float | None = None
    ) -> RunState:
        assert self.group is not None
        resume = [polled.outcomes[r].handover for r in sorted(polled.outcomes)]
        self.status.timeline["handed_over"] = time.time()
        self.group.shutdown()
        self.status.timeline["torn_down"] = time.time()
        self.group = None
        self.resizes += 1
        self.status.resizes = self.resizes
        self.status.phase = WorkerPhase.STARTING
        self.status.worker_pids, self.status.worker_nodes = [], []
        return self._go(
            Scheduling(
                resume=resume,
                want=want,
                settle_until=self.clock() + 10.0,
                resize_started=started,
            )
        )

    def _recover(self, at: Recovering) -> RunState:
        assert self.group is not None
        old = self.group.size
        snaps = self.group.snapshots()
        for rank, copies in self.held().items():
            snaps.setdefault(rank, []).extend(copies)
        found = consistent_snapshot(snaps, old)
        resume: Resume = None
        disk = self.latest_checkpoint()
        disk_step = _step_of_dir(disk)
        if found is not None and disk_step is not None and disk_step > found[0]:
            self._note(
                f"the last committed checkpoint (step {disk_step}) is newer than the newest "
                f"in-memory state every rank has (step {found[0]}): recover from disk"
            )
        elif found is not None:
            step, resume = found
            self._note(f"recover from in-memory snapshots of step {step} (no disk read)")
        elif snaps:
            held = {r: sorted(step for step, _ in v) for r, v in sorted(snaps.items())}
            self._note(
                f"no in-memory state of one step for all {old} ranks (held: {held}); "
                "falling back to the last committed checkpoint"
            )
        # The live, idle processes stay for the next group (group.Survivors).
        survivors = self.group.survivors(SURVIVOR_GRACE_S)
        self.status.timeline["torn_down"] = time.time()
        if survivors is not None:
            self._note(f"keep {len(survivors.actors)} of {old} worker processes for the new group")
        self.group = None
        self.restarts += 1
        # The step shown stays until the new group reports the step it resumed from (lower
        # only when state had to come from an older checkpoint: lost steps).
        self.status.restarts = self.restarts
        self.status.worker_pids, self.status.worker_nodes = [], []
        self.status.phase = WorkerPhase.STARTING
        return self._go(
            Scheduling(
                resume=resume,
                resize_started=at.started,
                redo_from=at.redo_from,
                survivors=survivors,
            )
        )

    def _wait(self, at: Waiting) -> RunState:
        if self._target_size(0) is not None:
            return self._go(at.then)
        if self.clock() - at.since > self.min_wait_s:
            failure = Failure(
                -1,
                FailureKind.TIMEOUT,
                f"fewer than {self.min_workers} workers possible "
                f"for {self.min_wait_s:.0f} s (zray.min_wait_s)",
                retryable=False,
            )
            return self._decide([failure])
        return self.state

    def _absorb(self, reports: list[Report]) -> None:
        if not reports:
            return
        if self.metrics is not None:
            for r in reports:
                # A restarted worker has nothing to say before its first step: keep showing
                # the rank's last values rather than making its series vanish and reappear.
                if r.metrics:
                    self.metrics.update_rank(r.rank, r.node, r.stage, r.metrics)
            self.metrics.keep_ranks(set(range(self.status.world_size)))
        ordered = sorted(reports, key=lambda r: r.rank)
        if len(ordered) == self.status.world_size:
            for name in ordered[0].milestones:
                if all(name in r.milestones for r in ordered):
                    self.status.timeline[name] = max(r.milestones[name] for r in ordered)
        self.status.worker_pids = [r.pid for r in ordered]
        self.status.worker_nodes = [r.node for r in ordered]
        lead = ordered[0]
        if lead.phase != WorkerPhase.STARTING or lead.step:  # a starting worker knows no step yet
            self.status.step = lead.step
        self.status.loss = lead.loss
        self.status.tokens_per_s = lead.tokens_per_s
        self.status.mfu = lead.mfu
        self.status.copy_interval = lead.copy_interval
        copied = [r.copy_step for r in ordered]
        if len(copied) == self.status.world_size:
            known = [c for c in copied if c is not None]
            self.status.copy_step = min(known) if len(known) == len(copied) else None
        self.status.checkpoint_step = lead.checkpoint_step
        self.status.phase = lead.phase
        at = self.at
        redo = isinstance(at, Running) and at.redo_from is not None
        if redo and lead.phase == WorkerPhase.TRAINING:
            # The new group reports the step it resumed from: the difference is redone work.
            self.lost_steps += max(0, at.redo_from - lead.step)
            self.status.lost_steps = self.lost_steps
            self.at = Running()
        self._publish()

    def run(self, poll_interval_s: float) -> RunOutcome:
        while not self.state.terminal:
            before = self.state
            self.step()
            if self.state is before and self.state in (
                RunState.RUNNING,
                RunState.RESIZING,
                RunState.WAITING,
            ):
                time.sleep(poll_interval_s)
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


def _step_of_dir(path: str | None) -> int | None:
    """The step of a checkpoint directory named step_NNNNNNNN (None: none, or another name)."""
    if not path:
        return None
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def consistent_snapshot(
    snaps: dict[int, list[tuple[int, PackedShard]]], world: int
) -> tuple[int, list[PackedShard]] | None:
    """The newest step whose copy every one of `world` ranks has, with the copies by rank."""
    by_step: dict[int, dict[int, PackedShard]] = {}
    for rank, held in snaps.items():
        for step, packed in held:
            if packed.shard.world_size == world:
                by_step.setdefault(step, {})[rank] = packed
    for step in sorted(by_step, reverse=True):
        if len(by_step[step]) == world:
            return step, [by_step[step][r] for r in range(world)]
    return None

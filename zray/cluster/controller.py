"""The controller: a state machine that starts the worker group, watches it, and recovers.

`Controller.step()` runs one iteration (one state's work) and returns the new state, so tests
drive it one step at a time with a fake WorkerGroup. `ControllerActor` runs the loop in Ray.

[Note: recovery] Any worker failure (its process or node gone, an exception, a collective
timeout surfacing as an exception) ends the whole group: survivors are blocked in collectives
with a dead peer and cannot continue. The failure policy decides restart or give up; a restart
tears the group down, starts a new one on the resources there are, and every rank resumes from
the last committed checkpoint. With the same world size, replayed steps are bit-identical.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zray.cluster.group import GroupStartError, WorkerGroup
from zray.cluster.policy import Action, Decision, Failure, FailurePolicy
from zray.cluster.state import RunState, check_transition
from zray.cluster.train_loop import Report, RunOutcome
from zray.errors import ZrayError

if TYPE_CHECKING:
    from zray.metrics.exporter import RunMetrics

log = logging.getLogger("zray.controller")


class RunFailedError(ZrayError):
    """The run gave up: one report merging what every failed rank said."""

    def __init__(self, decision: Decision, failures: list[Failure]) -> None:
        self.decision, self.failures = decision, failures
        ranks = sorted({f.rank for f in failures})
        lines = [f"training failed ({decision.reason}); failed ranks: {ranks}"]
        for f in failures:
            lines.append(f"--- rank {f.rank} ({f.kind}) ---\n{f.message.rstrip()}")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[type, tuple[Decision, list[Failure]]]:
        # Crosses from the controller actor to the driver: rebuild from the parts.
        return (RunFailedError, (self.decision, self.failures))


@dataclass
class RunStatus:
    state: RunState
    step: int = 0
    loss: float | None = None
    tokens_per_s: float = 0.0
    world_size: int = 0
    restarts: int = 0
    checkpoint_step: int | None = None
    worker_pids: list[int] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)
    phase: str = "starting"  # rank 0's: starting | training | checkpointing | done
    decisions: list[str] = field(default_factory=list)  # every decision, with its reason
    error: str | None = None
    metrics_url: str | None = None  # where the run's metrics are served, if they are


class Controller:
    def __init__(
        self,
        make_group: Callable[[int], WorkerGroup],
        num_workers: int,
        policy: FailurePolicy,
        latest_checkpoint: Callable[[], str | None],
        metrics: RunMetrics | None = None,
    ) -> None:
        self.make_group, self.num_workers, self.policy = make_group, num_workers, policy
        self.latest_checkpoint = latest_checkpoint
        self.state = RunState.INITIALIZING
        self.group: WorkerGroup | None = None
        self.restarts = 0
        self.status = RunStatus(RunState.INITIALIZING)
        self.outcome: RunOutcome | None = None
        self.error: RunFailedError | None = None
        self._failures: list[Failure] = []
        self.metrics = metrics
        self.lost_steps = 0
        self._step_at_failure: int | None = None  # set on failure, settled by the next group

    def _go(self, new: RunState) -> RunState:
        check_transition(self.state, new)
        self.state = self.status.state = new
        self._publish()
        return new

    def _publish(self) -> None:
        if self.metrics is None:
            return
        self.metrics.update_controller(
            {
                "zray_world_size": float(self.status.world_size if self.group else 0),
                "zray_restarts_total": float(self.restarts),
                "zray_resizes_total": 0.0,  # fixed-size runs; elastic runs resize
                "zray_lost_steps_total": float(self.lost_steps),
                "zray_controller_state": {s.value: float(s is self.state) for s in RunState},
            }
        )

    def _decide(self, failures: list[Failure]) -> RunState:
        self._step_at_failure = self.status.step
        decision = self.policy.decide(failures, self.restarts)
        line = f"{decision.action.value}: {decision.reason}"
        log.warning("controller decision: %s", line)
        self.status.decisions.append(line)
        self._failures = failures
        if decision.action is Action.RESTART:
            return self._go(RunState.RECOVERING)
        self.error = RunFailedError(decision, failures)
        self.status.error = str(self.error)
        if self.group is not None:
            self.group.shutdown()
        return self._go(RunState.ERRORED)

    def step(self) -> RunState:
        if self.state is RunState.INITIALIZING:
            return self._go(RunState.SCHEDULING)
        if self.state is RunState.SCHEDULING:
            resume = self.latest_checkpoint()
            self.group = self.make_group(self.num_workers)
            try:
                self.group.start(resume, attempt=self.restarts)
            except GroupStartError as e:
                return self._decide(e.failures)
            self.status.world_size = self.group.size
            if resume:
                self.status.decisions.append(f"started {self.group.size} workers from {resume}")
            return self._go(RunState.RUNNING)
        if self.state is RunState.RUNNING:
            assert self.group is not None
            polled = self.group.poll()
            self._absorb(polled.reports)
            if polled.failures:
                return self._decide(polled.failures)
            if polled.outcome is not None:
                self.outcome = polled.outcome
                self.group.shutdown()
                return self._go(RunState.FINISHED)
            return self.state
        if self.state is RunState.RECOVERING:
            assert self.group is not None
            self.group.shutdown()
            self.group = None
            self.restarts += 1
            # Progress restarts from the checkpoint the new group will load.
            self.status.restarts = self.restarts
            self.status.step, self.status.loss = 0, None
            self.status.worker_pids, self.status.worker_nodes = [], []
            self.status.phase = "starting"
            return self._go(RunState.SCHEDULING)
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
        self.status.worker_pids = [r.pid for r in ordered]
        self.status.worker_nodes = [r.node for r in ordered]
        lead = min(reports, key=lambda r: r.rank)
        self.status.step = lead.step
        self.status.loss = lead.loss
        self.status.tokens_per_s = lead.tokens_per_s
        self.status.checkpoint_step = lead.checkpoint_step
        self.status.phase = lead.phase
        if self._step_at_failure is not None and lead.phase == "training":
            # The new group reports the step it resumed from: the difference is redone work.
            self.lost_steps += max(0, self._step_at_failure - lead.step)
            self._step_at_failure = None
        self._publish()

    def run(self, poll_interval_s: float) -> RunOutcome:
        while not self.state.terminal:
            before = self.state
            self.step()
            if self.state is before is RunState.RUNNING:
                time.sleep(poll_interval_s)
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome

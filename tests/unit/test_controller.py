"""The controller's state machine, driven one step at a time with fake worker groups."""

from __future__ import annotations

import pytest

from zray.cluster.controller import Controller, RunFailedError
from zray.cluster.group import GroupPoll, GroupStartError
from zray.cluster.policy import Action, Failure, FailurePolicy
from zray.cluster.state import TRANSITIONS, RunState, check_transition
from zray.cluster.train_loop import Report, RunOutcome


class FakeGroup:
    """Scripted: each poll() returns the next GroupPoll of `script` (the last one repeats)."""

    def __init__(self, size: int, script: list[GroupPoll], start_error: bool = False) -> None:
        self.size, self.script, self.start_error = size, list(script), start_error
        self.started_from: str | None = "never"
        self.shut = False

    def start(self, resume: str | None, attempt: int) -> None:
        if self.start_error:
            raise GroupStartError([Failure(-1, "timeout", "bundles not placed")])
        self.started_from = resume

    def poll(self) -> GroupPoll:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def shutdown(self) -> None:
        self.shut = True


def outcome(steps: int = 10) -> RunOutcome:
    return RunOutcome(
        steps=steps, losses=[(steps, 1.0)], tokens_per_s=1.0, checkpoint=None, world_size=2
    )


def running(step: int) -> GroupPoll:
    return GroupPoll(
        reports=[Report(rank=r, pid=100 + r, node="n", step=step, loss=2.0) for r in range(2)]
    )


def make(groups: list[FakeGroup], max_failures: int = 2, ckpt: str | None = None) -> Controller:
    made = iter(groups)
    return Controller(lambda n: next(made), 2, FailurePolicy(max_failures), lambda: ckpt)


def test_happy_path_states() -> None:
    g = FakeGroup(2, [running(1), running(2), GroupPoll(outcome=outcome())])
    c = make([g])
    seen = [c.state]
    while not c.state.terminal:
        seen.append(c.step())
    assert seen == [
        RunState.INITIALIZING,
        RunState.SCHEDULING,
        RunState.RUNNING,
        RunState.RUNNING,
        RunState.RUNNING,
        RunState.FINISHED,
    ]
    assert c.outcome == outcome() and g.shut and c.status.worker_pids == [100, 101]
    assert c.status.step == 2


def test_failure_restarts_from_latest_checkpoint_then_finishes() -> None:
    died = GroupPoll(failures=[Failure(1, "died", "actor died")])
    g1, g2 = FakeGroup(2, [running(3), died]), FakeGroup(2, [GroupPoll(outcome=outcome())])
    c = make([g1, g2], ckpt="/ckpt/step_00000002")
    states = [c.step() for _ in range(7)]
    assert states == [
        RunState.SCHEDULING,
        RunState.RUNNING,
        RunState.RUNNING,
        RunState.RECOVERING,
        RunState.SCHEDULING,
        RunState.RUNNING,
        RunState.FINISHED,
    ]
    assert g1.shut and g2.started_from == "/ckpt/step_00000002"
    assert c.restarts == 1 and c.status.restarts == 1
    assert c.status.decisions[1].startswith("restart: rank 1 died")
    assert c.status.decisions[2] == "started 2 workers from /ckpt/step_00000002"


def test_gives_up_after_max_failures_with_one_merged_report() -> None:
    fail = GroupPoll(
        failures=[
            Failure(0, "error", "Traceback...\nValueError: bad batch"),
            Failure(1, "died", "node lost"),
        ]
    )
    groups = [FakeGroup(2, [fail]) for _ in range(3)]
    c = make(groups, max_failures=2)
    with pytest.raises(RunFailedError) as e:
        c.run(poll_interval_s=0)
    msg = str(e.value)
    assert "failed ranks: [0, 1]" in msg and "ValueError: bad batch" in msg and "node lost" in msg
    assert "max_failures = 2" in msg
    assert c.state is RunState.ERRORED and c.restarts == 2
    assert [d.split(":")[0] for d in c.status.decisions] == ["restart", "restart", "give_up"]


def test_start_failure_goes_through_the_policy() -> None:
    c = make([FakeGroup(2, [], start_error=True), FakeGroup(2, [GroupPoll(outcome=outcome())])])
    assert [c.step() for _ in range(5)] == [
        RunState.SCHEDULING,
        RunState.RECOVERING,
        RunState.SCHEDULING,
        RunState.RUNNING,
        RunState.FINISHED,
    ]


def test_non_retryable_error_gives_up_at_once() -> None:
    bad = GroupPoll(failures=[Failure(0, "error", "ConfigError: zray.model", retryable=False)])
    c = make([FakeGroup(2, [bad])], max_failures=5)
    with pytest.raises(RunFailedError, match="not retryable"):
        c.run(poll_interval_s=0)
    assert c.restarts == 0


def test_policy_and_transitions_table() -> None:
    p = FailurePolicy(max_failures=1)
    assert p.decide([Failure(0, "died", "x")], 0).action is Action.RESTART
    assert p.decide([Failure(0, "died", "x")], 1).action is Action.GIVE_UP
    assert all(not TRANSITIONS[s] for s in RunState if s.terminal)
    with pytest.raises(AssertionError, match="finished -> running"):
        check_transition(RunState.FINISHED, RunState.RUNNING)

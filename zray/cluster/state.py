"""The controller's states and the transitions allowed between them, in one place."""

from __future__ import annotations

import enum


class RunState(enum.Enum):
    INITIALIZING = "initializing"  # nothing started yet
    SCHEDULING = "scheduling"  # reserving resources, starting workers, forming the group
    RUNNING = "running"  # workers train; the controller polls them
    RECOVERING = "recovering"  # a failure: tear the group down before scheduling again
    RESIZING = "resizing"  # a planned resize: workers pause at an agreed step and hand over
    WAITING = "waiting"  # fewer workers possible than the minimum: wait for capacity
    FINISHED = "finished"  # every worker completed max_steps
    ERRORED = "errored"  # the failure policy gave up

    @property
    def terminal(self) -> bool:
        return self in (RunState.FINISHED, RunState.ERRORED)


TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.INITIALIZING: frozenset({RunState.SCHEDULING, RunState.ERRORED}),
    RunState.SCHEDULING: frozenset(
        {RunState.RUNNING, RunState.RECOVERING, RunState.WAITING, RunState.ERRORED}
    ),
    RunState.RUNNING: frozenset(
        {RunState.FINISHED, RunState.RECOVERING, RunState.RESIZING, RunState.ERRORED}
    ),
    RunState.RESIZING: frozenset({RunState.SCHEDULING, RunState.RECOVERING, RunState.ERRORED}),
    RunState.RECOVERING: frozenset({RunState.SCHEDULING, RunState.ERRORED}),
    RunState.WAITING: frozenset({RunState.SCHEDULING, RunState.ERRORED}),
    RunState.FINISHED: frozenset(),
    RunState.ERRORED: frozenset(),
}


def check_transition(old: RunState, new: RunState) -> None:
    if new not in TRANSITIONS[old]:
        raise AssertionError(f"controller: illegal transition {old.value} -> {new.value}")

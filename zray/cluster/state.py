"""The controller's states and the transitions allowed between them, in one place."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from zray.checkpoint.manager import Resume
from zray.run_records import RunOutcome

if TYPE_CHECKING:
    from zray.cluster.group import Survivors


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
    # SCHEDULING: the group paused on its own (a rank got SIGTERM) and hands its state over.
    RunState.RUNNING: frozenset(
        {
            RunState.SCHEDULING,
            RunState.FINISHED,
            RunState.RECOVERING,
            RunState.RESIZING,
            RunState.ERRORED,
        }
    ),
    # FINISHED: the last step came before the step the ranks agreed to pause at.
    RunState.RESIZING: frozenset(
        {RunState.SCHEDULING, RunState.RECOVERING, RunState.FINISHED, RunState.ERRORED}
    ),
    RunState.RECOVERING: frozenset({RunState.SCHEDULING, RunState.ERRORED}),
    RunState.WAITING: frozenset({RunState.SCHEDULING, RunState.ERRORED}),
    RunState.FINISHED: frozenset(),
    RunState.ERRORED: frozenset(),
}


def check_transition(old: RunState, new: RunState) -> None:
    if new not in TRANSITIONS[old]:
        raise AssertionError(f"controller: illegal transition {old.value} -> {new.value}")


# ---- what each state carries ---------------------------------------------------------------
# The controller holds exactly one of these; the data a state needs lives in it, not in
# optional fields of the controller that only some states set.


@dataclass(frozen=True)
class Initializing:
    kind: ClassVar[RunState] = RunState.INITIALIZING


@dataclass(frozen=True)
class Scheduling:
    kind: ClassVar[RunState] = RunState.SCHEDULING
    resume: Resume = None  # in-memory state for the new group (None: the newest checkpoint)
    # After a grow's handover: the size wanted, and until when (clock time) to wait for the
    # old group's slots to come back before settling for less.
    want: int | None = None
    settle_until: float = 0.0
    resize_started: float | None = None  # when the resize or recovery began (it is timed)
    redo_from: int | None = None  # after a failure: the step reached; lost steps are counted
    # After a failure: the failed group's placement and live processes, for the new group.
    survivors: Survivors | None = None


@dataclass(frozen=True)
class Running:
    kind: ClassVar[RunState] = RunState.RUNNING
    # After a failure, until the new group reports the step it resumed from.
    redo_from: int | None = None


@dataclass(frozen=True)
class Resizing:
    kind: ClassVar[RunState] = RunState.RESIZING
    want: int  # the size asked for
    started: float


@dataclass(frozen=True)
class Recovering:
    kind: ClassVar[RunState] = RunState.RECOVERING
    started: float
    redo_from: int  # the step reached when the failure was seen


@dataclass(frozen=True)
class Waiting:
    kind: ClassVar[RunState] = RunState.WAITING
    since: float
    then: Scheduling  # what scheduling had when capacity ran short, taken up again after


@dataclass(frozen=True)
class Finished:
    kind: ClassVar[RunState] = RunState.FINISHED
    outcome: RunOutcome


@dataclass(frozen=True)
class Errored:
    kind: ClassVar[RunState] = RunState.ERRORED
    error: Exception  # the RunFailedError raised to the caller


ControllerState = (
    Initializing | Scheduling | Running | Resizing | Recovering | Waiting | Finished | Errored
)

"""Failure policy: given what failed and how often, restart or give up — with a reason."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Action(enum.Enum):
    RESTART = "restart"
    GIVE_UP = "give_up"


class FailureKind(enum.StrEnum):
    DIED = "died"  # the process or its node is gone
    ERROR = "error"  # the rank's code raised
    TIMEOUT = "timeout"  # the group did not start in time, or a collective timed out


@dataclass(frozen=True)
class Failure:
    """One worker's failure as the controller saw it."""

    rank: int
    kind: FailureKind
    message: str
    # False for errors a restart cannot cure (a bad config, a model that does not build).
    retryable: bool = True
    # Whether the rank completed a step in this group before it failed (False: its code raised
    # on its way to the first step, and would again after a restart).
    progressed: bool = True


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


@dataclass(frozen=True)
class FailurePolicy:
    """Restart after a failure while fewer than `max_failures` restarts have happened."""

    max_failures: int

    def decide(self, failures: list[Failure], restarts_so_far: int) -> Decision:
        """Code that raised before its rank completed a step (a model bug, a loss that does not
        reduce to a scalar) would raise again after a restart: that is given up at once, as are
        errors marked not retryable; lost processes, nodes and timeouts restart."""
        what = "; ".join(
            f"rank {f.rank} {f.kind}: {f.message.splitlines()[-1][:200]}" for f in failures
        )
        if not all(f.retryable for f in failures):
            return Decision(Action.GIVE_UP, f"{what} — not retryable: a restart would fail again")
        first_step = all(
            f.kind == FailureKind.ERROR and not f.progressed and not _looks_transient(f.message)
            for f in failures
        )
        if first_step:
            return Decision(
                Action.GIVE_UP,
                f"{what} — raised before the group completed a step: a restart would raise again",
            )
        if restarts_so_far >= self.max_failures:
            return Decision(
                Action.GIVE_UP,
                f"{what} — already restarted {restarts_so_far} time(s) "
                f"(max_failures = {self.max_failures})",
            )
        return Decision(
            Action.RESTART, f"{what} — restart {restarts_so_far + 1} of at most {self.max_failures}"
        )


# A rendezvous port taken by another process between picking it and binding it
# (EADDRINUSE, torch's DistNetworkError) is as transient as a lost peer.
_TRANSIENT = re.compile(
    r"\b(timed out|timeout|connection|peer|broken pipe|nccl|gloo|address already in use"
    r"|eaddrinuse|distnetworkerror)\b",
    re.I,
)


def _looks_transient(message: str) -> bool:
    """Errors that name a lost peer or a timeout: a restart can cure those."""
    return _TRANSIENT.search(message) is not None

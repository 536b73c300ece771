"""Failure policy: given what failed and how often, restart or give up — with a reason."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    RESTART = "restart"
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class Failure:
    """One worker's failure as the controller saw it."""

    rank: int
    kind: str  # "died" (process or node gone), "error" (raised), "timeout" (start or collective)
    message: str
    # False for errors a restart cannot cure (a bad config, a model that does not build).
    retryable: bool = True


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


@dataclass(frozen=True)
class FailurePolicy:
    """Restart after a failure while fewer than `max_failures` restarts have happened."""

    max_failures: int

    def decide(self, failures: list[Failure], restarts_so_far: int) -> Decision:
        what = "; ".join(
            f"rank {f.rank} {f.kind}: {f.message.splitlines()[-1][:200]}" for f in failures
        )
        if not all(f.retryable for f in failures):
            return Decision(Action.GIVE_UP, f"{what} — not retryable: a restart would fail again")
        if restarts_so_far >= self.max_failures:
            return Decision(
                Action.GIVE_UP,
                f"{what} — already restarted {restarts_so_far} time(s) "
                f"(max_failures = {self.max_failures})",
            )
        return Decision(
            Action.RESTART,
            f"{what} — restart {restarts_so_far + 1} of at most {self.max_failures}, "
            "from the last committed checkpoint",
        )

"""A run's progress as the training thread sees it: the loss history and the recent rate.

`LossLog` is appended to as each step's values are read back (one step late: see
zray.parallel.step_signals); the state-copy thread waits on it for the history a copy carries.
`RateWindow` gives tokens/s over the last RATE_WINDOW_S seconds for the live line (the average
since the start hides a slowdown and lingers on the warm-up).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

# The live rate is taken over this many seconds of recent steps (and at least two steps).
RATE_WINDOW_S = 20.0


def history_state(losses: list[tuple[int, float]]) -> dict[str, Any]:
    """The client state a checkpoint or state copy carries: the loss history behind it."""
    return {"losses": [[s, v] for s, v in losses]}


class LossLog:
    """The run's loss history: (step, global mean loss) of the steps it keeps (every
    `log_interval`-th and the last), in step order, appended by the training thread as the
    values are read. The copy thread waits here until the history a copy carries is known."""

    def __init__(self) -> None:
        self._items: list[tuple[int, float]] = []
        self._through = -1  # the newest step whose loss has been read
        self._newest: float | None = None
        self._cond = threading.Condition()
        self._closed = False

    def record(self, step: int, loss: float, keep: bool = True) -> None:
        with self._cond:
            if keep:
                self._items.append((step, loss))
            self._through, self._newest = step, loss
            self._cond.notify_all()

    def items(self) -> list[tuple[int, float]]:
        with self._cond:
            return list(self._items)

    def newest(self) -> float | None:
        with self._cond:
            return self._newest

    def client_state(self) -> dict[str, Any]:
        return history_state(self.items())

    def client_state_through(self, step: int) -> dict[str, Any] | None:
        """The client state of `step` once its loss is read; None if the log closes first."""
        with self._cond:
            while not self._closed and self._through < step:
                self._cond.wait(timeout=1.0)
            if self._through < step:
                return None
            return history_state([(s, v) for s, v in self._items if s <= step])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class RateWindow:
    """Tokens/s over the last RATE_WINDOW_S seconds of steps (all data-parallel ranks)."""

    def __init__(self, dp_size: int) -> None:
        self.dp_size = dp_size
        self._points: deque[tuple[float, int]] = deque()

    def add(self, t: float, tokens: int) -> None:
        self._points.append((t, tokens))
        while len(self._points) > 2 and t - self._points[1][0] >= RATE_WINDOW_S:
            self._points.popleft()

    def tokens_per_s(self) -> float:
        if len(self._points) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._points[0], self._points[-1]
        return (n1 - n0) * self.dp_size / (t1 - t0) if t1 > t0 else 0.0

    def seconds_per_step(self) -> float:
        if len(self._points) < 2:
            return 0.0
        return (self._points[-1][0] - self._points[0][0]) / (len(self._points) - 1)

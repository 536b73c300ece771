"""Wall-clock breakdown of a training step into named phases (data, forward, backward, ...).

    timer = StepTimer(device)
    with timer.phase(Phase.FORWARD):
        loss = engine(batch)
    ...
    seconds = timer.summary()   # {"forward": 0.12, "backward": 0.25, ...}; syncs once on CUDA
    timer.reset()

[Note: nested phases] Phases may nest; each phase is charged its *self* time (its span minus
the spans of the phases opened inside it), so the values always sum to the time covered by
the outermost phases, never more. `phase("communication")` inside `phase("backward")`
therefore moves the collective's time out of backward instead of counting it twice.

[Note: CUDA timing] On CUDA the default clock is a pair of torch.cuda.Events per phase,
recorded on the current stream: no host sync in the hot path. They are read back lazily:
finished spans are resolved when `Event.query()` (non-blocking) says so, the rest at
`summary()`, which waits for the last event (the one host sync). They measure the stream's
timeline: a phase whose host work overlaps earlier queued GPU work (data loading while the
GPU finishes the previous step) is charged only what the stream spent waiting, and work on
other streams (async collectives) shows up only where the current stream waits for it.
`synchronize=True` instead syncs the device at every phase boundary and reads the host clock:
exact host wall time, at the price of a sync per boundary (debugging only).
"""

from __future__ import annotations

import enum
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch


class Phase(str, enum.Enum):
    """The standard phases of a step; any other string names a phase too."""

    DATA = "data"
    FORWARD = "forward"
    BACKWARD = "backward"
    COMMUNICATION = "communication"
    OPTIMIZER = "optimizer"

    def __str__(self) -> str:
        return self.value


# Disabled timers hand out this one reusable no-op context manager: no allocation, no clock.
_DISABLED: AbstractContextManager[None] = nullcontext()


class _HostClock:
    """perf_counter marks; with `sync_device`, a torch.cuda.synchronize before each mark."""

    def __init__(self, sync_device: torch.device | None) -> None:
        self.sync_device = sync_device

    def mark(self) -> float:
        if self.sync_device is not None:
            torch.cuda.synchronize(self.sync_device)  # host sync (synchronize=True only)
        return time.perf_counter()

    def ready(self, mark: Any) -> bool:
        return True

    def wait(self, mark: Any) -> None:
        pass

    def seconds(self, start: Any, end: Any) -> float:
        return float(end - start)


class _EventClock:
    """CUDA events on the current stream; read only once they have completed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def ready(self, mark: Any) -> bool:
        return bool(mark.query())  # non-blocking

    def wait(self, mark: Any) -> None:
        mark.synchronize()  # host sync: summary() only

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3  # ms -> s


@dataclass
class _Span:
    name: str
    start: Any
    end: Any = None
    parent: int | None = None  # index of the enclosing span in the same tree


class _OpenPhase:
    """The context manager of one enabled phase (a class, not a generator: cheaper)."""

    __slots__ = ("name", "timer")

    def __init__(self, timer: StepTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer._begin(self.name)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.timer._end(self.name)


class StepTimer:
    """Seconds per named phase, accumulated until `reset()`.

    device: where the step computes; CUDA devices get event timing (see the module note).
    enabled: False makes `phase()` a shared no-op context manager and `summary()` empty.
    synchronize: on CUDA, sync at every boundary and use the host clock instead of events.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        enabled: bool = True,
        synchronize: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self._clock: _HostClock | _EventClock
        if self.device.type == "cuda" and not synchronize:
            self._clock = _EventClock(self.device)
        else:
            self._clock = _HostClock(self.device if self.device.type == "cuda" else None)
        self._totals: dict[str, float] = {}
        self._tree: list[_Span] = []  # spans of the outermost phase now open
        self._open: list[int] = []  # indices into _tree, innermost last
        self._pending: list[list[_Span]] = []  # closed trees whose events may still be running

    def phase(self, name: str) -> AbstractContextManager[None]:
        """`with timer.phase("forward"): ...` charges the block's time to "forward"."""
        if not self.enabled:
            return _DISABLED
        return _OpenPhase(self, str(name))

    def _begin(self, name: str) -> None:
        parent = self._open[-1] if self._open else None
        self._tree.append(_Span(name, self._clock.mark(), parent=parent))
        self._open.append(len(self._tree) - 1)

    def _end(self, name: str) -> None:
        span = self._tree[self._open.pop()]
        assert span.name == name, f"phase {name!r} closed while {span.name!r} was innermost"
        span.end = self._clock.mark()
        if not self._open:
            self._pending.append(self._tree)
            self._tree = []
            self._resolve(wait=False)

    def _resolve(self, *, wait: bool) -> None:
        """Add the self time of every closed tree whose last event has completed (all of them,
        waiting, when `wait`). A tree's root closes last, so its end completing means all did."""
        clock = self._clock
        while self._pending:
            tree = self._pending[0]
            if wait:
                clock.wait(tree[0].end)
            elif not clock.ready(tree[0].end):
                return
            self._pending.pop(0)
            spans = [clock.seconds(s.start, s.end) for s in tree]
            own = list(spans)
            for i, s in enumerate(tree):
                if s.parent is not None:
                    own[s.parent] -= spans[i]
            for s, seconds in zip(tree, own, strict=True):
                self._totals[s.name] = self._totals.get(s.name, 0.0) + seconds

    @property
    def open_phases(self) -> list[str]:
        """Names of the phases now open, outermost first."""
        return [self._tree[i].name for i in self._open]

    def summary(self) -> dict[str, float]:
        """Seconds per phase since the last reset, in first-seen order (CUDA: one host sync).
        Phases still open are not included until they close."""
        if not self.enabled:
            return {}
        self._resolve(wait=True)
        return dict(self._totals)

    def reset(self) -> None:
        """Forget all phases. Refused inside an open phase, whose end would be lost."""
        if self._open:
            raise RuntimeError(
                f"StepTimer.reset() called inside open phase(s) {self.open_phases}; "
                "reset between steps, outside every phase"
            )
        self._totals.clear()
        self._pending.clear()

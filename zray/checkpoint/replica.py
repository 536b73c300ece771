"""Copies of this rank's training state in host memory, taken off the step's path.

[Note: state copies] Every `replica_interval` steps, when every rank's last copy is done, each
rank copies its training state (the fp32 master shard and the optimizer's state: 12 bytes per
parameter of its shard with Adam) into a host buffer and sends it to a holder: its ring peer,
or the controller when the run has one worker. A lost rank is rebuilt from its holder's copy and
the survivors from their own, without reading disk (`controller.consistent_snapshot` picks the
newest step every rank has).

What the step pays:
- Device state: the copies run on a side stream into page-locked buffers while the next step's
  forward and backward compute; only the next optimizer update, which overwrites the state,
  waits for them, on the device (the host is never blocked). That wait is timed with CUDA
  events. Where the copy takes longer than forward + backward (a large shard over PCIe), the
  interval stretches so that the waits average at most `STALL_BUDGET` of the step time.
- Host state (CPU runs, an offloaded optimizer): a memcpy on the main thread, timed the same way.
- Sending (serialisation into Ray's object store, the holder's own copy) runs on a background
  thread at the lowest CPU priority, so that on a CPU run it takes cores only where training
  leaves them idle. A copy counts once its holder has acknowledged it (the holder has copied it
  into its own memory); a half-sent copy is never used.
  Until then no new copy starts: when sending is slower than the interval, the interval
  stretches (`ReplicaStats.interval` is the one achieved).

Agreement: all ranks must copy at the same steps, or no step would be complete everywhere. Each
rank votes every step whether it can start a copy (`ready`); `StepSignals` sums the votes in the
step's small all-reduce, and a copy starts at step t only if every rank's vote read at t said
so. A vote is cast after the step's own copy started, so the fastest interval is 2 steps.

Host memory (S = this rank's state bytes, fixed): `generations` buffers of S, reused (2 with
peers, where the newest complete copy must survive while the next is taken; 1 for a single
worker, whose own copy would die with it anyway), plus the holder's copies of its peer (its
newest and the one before, 2 S). Copies are turned off, with a warning naming the bytes, when
that exceeds the host budget the caller gives.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from zray.checkpoint.engine_state import (
    HostState,
    StateLayout,
    host_state,
    shard_from,
    state_layout,
)
from zray.checkpoint.shard import PackedShard, RankShard

if TYPE_CHECKING:
    from zray.engine import Engine

log = logging.getLogger("zray.replica")

# The share of step time that waiting for copies may take, averaged over the interval.
STALL_BUDGET = 0.01
_ALIGN = 4096

# send(step, packed) starts the transfer to the holder and returns a function that blocks
# until the holder has the copy (raising if it could not take it).
Send = Callable[[int, PackedShard], Callable[[], None]]
# client_state(step): the client state of that step (the loss history through it), blocking
# until it is known; None when the run is ending and it never will be.
ClientState = Callable[[int], dict[str, Any] | None]


class CopyPhase(enum.Enum):
    WAITING = "waiting"  # buffers not ready yet (being allocated and page-locked)
    IDLE = "idle"  # no copy in flight
    COPYING = "copying"  # device -> host copies queued, or the history not yet known
    SENDING = "sending"  # complete here, on its way to the holder
    OFF = "off"  # copies turned off (see ReplicaStats.off_reason)


@dataclass
class ReplicaStats:
    copies: int = 0  # copies the holder acknowledged
    newest_step: int | None = None  # the step of the newest acknowledged copy
    interval: float = 0.0  # steps between the last two acknowledged copies
    stall_seconds: float = 0.0  # total time steps waited for copies (device or host)
    copy_seconds: float = 0.0  # the last copy's device -> host time
    send_seconds: float = 0.0  # the last copy's time from complete here to acknowledged
    nbytes: int = 0  # bytes of one copy
    off_reason: str | None = None
    started: list[int] = field(default_factory=list)  # steps copies started at (the last 1000)
    last_stall_seconds: float = 0.0  # the newest measured wait for one copy

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "started": list(self.started)}


@dataclass
class _Buffer:
    """One generation's host copy of the layout's sources."""

    flats: list[torch.Tensor]  # per source: a host tensor of its dtype and numel
    raw: torch.Tensor  # the uint8 allocation they are views of
    pinned: list[int]  # page-locked chunk addresses (to unregister)
    step: int | None = None  # the step it holds, once complete here
    meta: RankShard | None = None  # that step's shard without its ranges


@dataclass
class _Job:
    step: int
    buffer: _Buffer
    host: HostState
    sampler: dict[str, Any] | None
    begin: torch.cuda.Event | None  # the device -> host copies' start and end on the side
    done: torch.cuda.Event | None  # stream (None: host state, copied synchronously)


class StateReplicator:
    def __init__(
        self,
        engine: Engine,
        interval: int,
        send: Send | None,
        client_state: ClientState,
        generations: int = 2,
        budget_bytes: int | None = None,
    ) -> None:
        assert interval >= 1 and generations in (1, 2)
        self.engine, self.interval, self.send = engine, interval, send
        self.client_state, self.generations, self.budget = client_state, generations, budget_bytes
        self.stats = ReplicaStats()
        self.phase = CopyPhase.WAITING
        if send is None:
            self._disable("no holder for the copies")
        self._lock = threading.Lock()  # guards the buffers' step / meta (snapshots())
        self._layout: StateLayout | None = None
        self._buffers: list[_Buffer] = []
        self._last_capture: int | None = None  # the step of the last copy started
        self._last_stall = 0.0  # seconds the step waited for the last measured copy
        self._fences: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._side: torch.cuda.Stream | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the training thread ------------------------------------------------------------------

    def ready(self, at: int, step_seconds: float) -> bool:
        """This rank's vote: could a copy start at step `at`? (No host sync.) The first call
        after the optimizer has its state plans the copies and starts allocating buffers."""
        self._account_fences()
        if self.phase is CopyPhase.WAITING and self._thread is None:
            self._start()
        if self.phase is not CopyPhase.IDLE:
            return False
        if self._last_capture is None:
            return True
        return at - self._last_capture >= max(self.interval, self.min_gap(step_seconds))

    def min_gap(self, step_seconds: float) -> int:
        """Steps between copies that keep the last copy's stall under STALL_BUDGET."""
        if step_seconds <= 0 or self._last_stall <= 0:
            return 1
        return max(1, math.ceil(self._last_stall / (STALL_BUDGET * step_seconds)))

    def capture(self, step: int, sampler: dict[str, Any] | None) -> None:
        """Start a copy of the state of `step` (every rank agreed to). Device state: copies
        queued on a side stream, and the next optimizer update fenced behind them."""
        assert self.phase is CopyPhase.IDLE and self._layout is not None
        layout = state_layout(self.engine)  # the tensors as they are now
        if layout.signature() != self._layout.signature():
            self._disable("the optimizer's state changed shape during training")
            return
        self._layout = layout
        buf = self._free_buffer()
        with self._lock:
            buf.step, buf.meta = None, None
        host = host_state(self.engine)
        t0 = time.perf_counter()
        on_device = []
        for src, dst in zip(self._layout.sources, buf.flats, strict=True):
            if src.is_cuda:
                on_device.append((src, dst))
            else:
                dst.copy_(src)  # host state: a memcpy on the step's path
        stall = time.perf_counter() - t0
        begin = done = None
        if on_device:
            device = on_device[0][0].device
            stream = torch.cuda.current_stream(device)
            if self._side is None:
                self._side = torch.cuda.Stream(device)
            # The step's last kernels (optimizer update, publish) are queued on `stream`:
            # the copies start after them, while the next step's forward runs.
            state_ready = torch.cuda.Event()
            state_ready.record(stream)
            begin = torch.cuda.Event(enable_timing=True)
            done = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._side):
                self._side.wait_event(state_ready)
                begin.record(self._side)
                for src, dst in on_device:
                    dst.copy_(src, non_blocking=True)
                done.record(self._side)
            self.engine.fence_state(lambda: self._fence(stream, done))
        else:
            self._last_stall = self.stats.last_stall_seconds = stall
        self.stats.stall_seconds += stall
        self.stats.started = [*self.stats.started[-999:], step]
        self._last_capture = step
        self.phase = CopyPhase.COPYING
        self._jobs.put(_Job(step, buf, host, sampler, begin, done))

    def _fence(self, stream: torch.cuda.Stream, done: torch.cuda.Event) -> None:
        """Right before the optimizer update: the device waits for the copies, timed."""
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(done)
        after.record(stream)
        self._fences.append((before, after))

    def _account_fences(self) -> None:
        """Fold finished fence waits into the stall total (their events are done: no sync)."""
        while self._fences and self._fences[0][1].query():
            before, after = self._fences.pop(0)
            self._last_stall = before.elapsed_time(after) / 1e3
            self.stats.stall_seconds += self._last_stall
            self.stats.last_stall_seconds = self._last_stall

    def snapshots(self) -> list[tuple[int, PackedShard]]:
        """This rank's complete copies, oldest first (any thread)."""
        with self._lock:
            done = [b for b in self._buffers if b.step is not None and b.meta is not None]
            done.sort(key=lambda b: b.step or 0)
            assert self._layout is not None or not done
            return [(b.step, _pack(b, self._layout)) for b in done]  # type: ignore[misc, arg-type]

    def close(self) -> None:
        """Stop the background thread; release the page locks when no copy is in flight (after
        a failure one may be, into them: they stay locked until the process ends). The copies
        themselves stay readable (`snapshots`) for the controller's recovery."""
        self._closing.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._side is None or self._side.query():
            with self._lock:
                for b in self._buffers:
                    _unpin(b)

    # ---- helpers ------------------------------------------------------------------------------

    def _disable(self, reason: str) -> None:
        self.phase = CopyPhase.OFF
        self.stats.off_reason = reason
        if self.send is not None:
            log.warning("in-memory state copies off: %s", reason)

    def _free_buffer(self) -> _Buffer:
        """The buffer to fill: with two, not the one holding the newest complete copy."""
        with self._lock:
            if len(self._buffers) == 1:
                return self._buffers[0]
            a, b = self._buffers
            if a.step is None or b.step is None:
                return a if a.step is None else b
            return a if a.step < b.step else b

    def _start(self) -> None:
        """Plan the copies; allocate their buffers on the background thread."""
        if not self.engine.zero.optimizer.state:
            return  # torch's Adam creates its state at the first step: plan after it
        layout = state_layout(self.engine)
        nbytes = layout.nbytes
        self.stats.nbytes = nbytes
        need = nbytes * (self.generations + 2)
        if self.budget is not None and need > self.budget:
            gb = 1e9
            self._disable(
                f"zray.replica_interval: the copies need {need / gb:.2f} GB of host memory for "
                f"this rank ({self.generations} own + 2 held for a peer, {nbytes / gb:.2f} GB "
                f"each), more than its budget of {self.budget / gb:.2f} GB (half the memory "
                "available on its host when the run started, shared by the host's ranks); set "
                "zray.replica_interval to 0 to silence this"
            )
            return
        self._layout = layout
        pin = any(s.is_cuda for s in layout.sources)
        self._thread = threading.Thread(
            target=self._background, args=(layout, pin), name="zray-replica", daemon=True
        )
        self._thread.start()

    # ---- the background thread ----------------------------------------------------------------

    def _background(self, layout: StateLayout, pin: bool) -> None:
        if pin:
            torch.cuda.set_device(self.engine.ctx.device)  # this thread's CUDA calls
        _lowest_priority()
        try:
            buffers = [_allocate(layout, pin) for _ in range(self.generations)]
        except Exception as e:  # out of memory, page-locking refused
            self._disable(f"the host buffers could not be allocated: {e}")
            return
        with self._lock:
            self._buffers = buffers
        self.phase = CopyPhase.IDLE
        while True:
            job = self._jobs.get()
            if job is None or self._closing.is_set():
                return
            try:
                self._complete(job)
            except Exception as e:  # the holder is gone: the group is failing
                log.warning("the copy of step %d did not reach its holder: %s", job.step, e)
                if self.phase is not CopyPhase.OFF:
                    self.phase = CopyPhase.IDLE

    def _complete(self, job: _Job) -> None:
        if job.done is not None:
            job.done.synchronize()  # blocks this thread only
            assert job.begin is not None
            self.stats.copy_seconds = job.begin.elapsed_time(job.done) / 1e3
        client = self.client_state(job.step)  # the loss history through job.step
        if client is None:
            return  # the run is ending: the copy will never be complete
        assert self._layout is not None and self.send is not None
        flats = job.buffer.flats
        meta = shard_from(self.engine, self._layout, flats, job.sampler, client, job.host)
        meta.ranges = []
        with self._lock:
            job.buffer.step, job.buffer.meta = job.step, meta
            packed = _pack(job.buffer, self._layout)
        self.phase = CopyPhase.SENDING
        t0 = time.perf_counter()
        self.send(job.step, packed)()
        s = self.stats
        s.send_seconds = time.perf_counter() - t0
        if s.newest_step is not None:
            s.interval = float(job.step - s.newest_step)
        s.newest_step = job.step
        s.copies += 1
        self.phase = CopyPhase.IDLE


def _lowest_priority() -> None:
    """Let this thread (and the threads it starts: Ray's copy threads) run only where training
    leaves a core idle. On a CPU run the copies compete with the training for the same cores;
    on a GPU host there are cores to spare and this changes nothing. Linux sets nice values per
    thread; elsewhere this is skipped."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _allocate(layout: StateLayout, pin: bool) -> _Buffer:
    """Host tensors shaped like the sources, carved from one allocation (page-locked when the
    sources are on a GPU, so the copies are asynchronous DMA). Registering plain memory keeps
    the size exact; torch's pinned allocator would round each block up to a power of two."""
    offsets, total = [], 0
    for s in layout.sources:
        offsets.append(total)
        total += -(-(s.numel() * s.element_size()) // 64) * 64
    raw = torch.empty(total + _ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % _ALIGN
    region = raw[skip : skip + total]
    pinned: list[int] = []
    if pin and total:
        # One registration for the whole region: a copy whose host range spans two separate
        # registrations fails with "invalid argument".
        rc = int(torch.cuda.cudart().cudaHostRegister(region.data_ptr(), total, 0))
        if rc != 0:
            raise RuntimeError(f"cudaHostRegister of {total} bytes failed (cudaError {rc})")
        pinned.append(region.data_ptr())
    flats = [
        region[o : o + s.numel() * s.element_size()].view(s.dtype)
        for o, s in zip(offsets, layout.sources, strict=True)
    ]
    return _Buffer(flats, raw, pinned)


def _unpin(buf: _Buffer) -> None:
    if buf.pinned:
        cudart = torch.cuda.cudart()
        for p in buf.pinned:
            cudart.cudaHostUnregister(p)
        buf.pinned = []


def _pack(buf: _Buffer, layout: StateLayout) -> PackedShard:
    """The buffer's complete copy as a PackedShard of byte views of it (nothing copied)."""
    assert buf.meta is not None
    ranges = [(r.name, r.shape, r.lo, r.hi, r.tp, dict(r.parts)) for r in layout.ranges]
    arrays = [f.view(torch.uint8).numpy() for f in buf.flats]
    return PackedShard(buf.meta, arrays, [f.dtype for f in buf.flats], ranges)


class ReplicaStore:
    """Copies of other ranks' state held for them: the newest two per rank (the newest may be
    one that not every rank has completed yet; see zray.checkpoint.replica)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, deque[tuple[int, PackedShard]]] = {}

    def keep(self, rank: int, step: int, packed: PackedShard) -> None:
        # Into this process's own memory: the arrays arrived as views of Ray's object store.
        own = packed.copy()
        with self._lock:
            self._held.setdefault(rank, deque(maxlen=2)).append((step, own))

    def held(self) -> dict[int, list[tuple[int, PackedShard]]]:
        with self._lock:
            return {r: list(d) for r, d in self._held.items()}

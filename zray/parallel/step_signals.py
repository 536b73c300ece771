"""What every rank must agree on after each step, read one step late so the host never waits.

After step t each rank pushes one small vector: its loss, the gradient norm, whether it was
asked to pause, whether it could start a state copy. The vector is summed over all ranks (one
all-reduce of a few floats, queued behind the step on the device) and copied to page-locked
host memory without blocking. The host reads it back after step t + `lag`: by then the device
has long finished step t, so reading does not stall the device's queue (the host runs at most
`lag` steps ahead, which keeps a full step of work queued).

Every rank reads the values of step t at the end of the same step t + lag, and they are the same
sums on every rank, so decisions taken on them (stop for a resize, start a state copy) happen at
the same step everywhere without a second round of communication. Nothing else on the step's
path reads device values on the host.

On CUDA the copy to the host runs on a stream of its own: a device-to-host copy queues on the
GPU's copy engine behind whatever else is copying in that direction (a state copy of several GB,
zray.checkpoint.replica), and on the compute stream it would hold up every kernel after it. The
host buffers are a ring reused only after their value was read: no allocation per step.

On gloo (CPU) the all-reduce runs on gloo's thread and is waited for `lag` steps later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zray.parallel.context import ParallelContext

# Vector layout: [loss, grad norm, pause votes, copy votes | this rank's loss, grad norm]; the
# first four are summed over ranks, the last two stay this rank's own (to name a bad rank).
_LOSS, _NORM, _PAUSE, _READY, _MY_LOSS, _MY_NORM = range(6)
_SUMMED = 4


@dataclass(frozen=True)
class StepValues:
    step: int
    loss: float  # the mean over all ranks of each rank's mean micro-batch loss
    grad_norm: float | None  # the global norm before clipping (None: no step taken yet)
    pause: bool  # some rank was asked to pause
    copy_ready: bool  # every rank could start a state copy
    my_loss: float = 0.0  # this rank's own mean micro-batch loss
    my_grad_norm: float | None = None  # the norm as this rank computed it


@dataclass
class _Pending:
    step: int
    vec: torch.Tensor  # on the device (CUDA) or the host (gloo), summed in place
    host: torch.Tensor  # page-locked host copy (CUDA), else `vec` itself
    work: dist.Work | None  # the all-reduce (gloo: wait before reading)
    event: torch.cuda.Event | None  # recorded after the copy to `host` (CUDA)
    has_norm: bool


class StepSignals:
    def __init__(self, ctx: ParallelContext, lag: int = 1) -> None:
        assert lag >= 1
        self.ctx, self.lag = ctx, lag
        world = dist.get_world_size() if dist.is_initialized() else 1
        # The whole mesh (data x tensor): every rank must take the same decisions.
        self.group = dist.group.WORLD if world > 1 else None
        self.world = world
        self._pending: deque[_Pending] = deque()
        self._done: list[StepValues] = []  # read early to free a ring slot; returned next
        self._stream: torch.cuda.Stream | None = None
        self._ring: list[torch.Tensor] = []
        if ctx.device.type == "cuda":
            self._stream = torch.cuda.Stream(ctx.device)
            self._ring = [
                torch.empty(6, dtype=torch.float32, pin_memory=True) for _ in range(lag + 2)
            ]

    def push(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor | None,
        pause: bool,
        ready: bool,
    ) -> None:
        """Queue step `step`'s values (no host sync)."""
        dev = self.ctx.device
        vec = torch.zeros(6, dtype=torch.float32, device=dev)
        vec[_LOSS] = loss.detach().reshape(()).float()
        if grad_norm is not None:
            vec[_NORM] = grad_norm.detach().reshape(()).float()
        vec[_MY_LOSS:].copy_(vec[_LOSS : _NORM + 1])  # kept out of the sum below
        # fill_ with a Python number: a kernel argument, not a host-to-device copy.
        vec[_PAUSE].fill_(float(pause))
        vec[_READY].fill_(float(not ready))
        work = None
        if self.group is not None:
            self.ctx.comm_stats.launched("all_reduce", vec[:_SUMMED])
            work = dist.all_reduce(vec[:_SUMMED], group=self.group, async_op=True)
        event = None
        host = vec
        if self._stream is not None:
            if work is not None:
                work.wait()  # NCCL: orders the current stream after it; the host goes on
                work = None
            while len(self._pending) >= len(self._ring):  # its slot is still unread
                self._done.append(self._read(self._pending.popleft()))
            host = self._ring[step % len(self._ring)]
            summed = torch.cuda.Event()
            summed.record()
            self._stream.wait_event(summed)
            with torch.cuda.stream(self._stream):
                host.copy_(vec, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        self._pending.append(_Pending(step, vec, host, work, event, grad_norm is not None))

    def take(self, through: int) -> list[StepValues]:
        """The values of every pushed step <= `through`, oldest first; waits for any not yet
        complete (with `through` = the current step - lag they almost never are)."""
        out, self._done = self._done, []
        while self._pending and self._pending[0].step <= through:
            out.append(self._read(self._pending.popleft()))
        return out

    def drain(self) -> list[StepValues]:
        """Every pushed value (at the end, a pause or a checkpoint): a host sync."""
        return self.take(through=1 << 62)

    def _read(self, p: _Pending) -> StepValues:
        if p.work is not None:
            p.work.wait()
        if p.event is not None:
            p.event.synchronize()
        v = p.host.tolist()
        n = self.world
        return StepValues(
            step=p.step,
            loss=v[_LOSS] / n,
            grad_norm=v[_NORM] / n if p.has_norm else None,
            pause=v[_PAUSE] > 0,
            copy_ready=v[_READY] == 0,
            my_loss=v[_MY_LOSS],
            my_grad_norm=v[_MY_NORM] if p.has_norm else None,
        )

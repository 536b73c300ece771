"""Autograd and module hooks: gradients leave during backward (stages 2-3), and stage-3
parameters are gathered just before a module runs and released just after.

[Note: stage-3 order of events for one block]
forward:  pre-hook gathers the block (waiting on a prefetch if one is in flight) and starts the
          all-gather of the next block(s) in the recorded forward order; post-hook releases the
          block and threads its outputs through `_PreBackward`.
backward: `_PreBackward.backward` runs before any of the block's own backward: it gathers the
          block again and prefetches the block that comes next in backward (the previous one in
          forward). When the last of the block's gradients is accumulated, its bucket is
          reduce-scattered and the block released.
The first forward records the order; later steps prefetch along it. Units left gathered by an
order that changed are released when backward ends, so a dynamic model costs time, not memory.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zray.zero import comm
from zray.zero.unit import FlatUnit, ShardState, UnitKind


class Phase(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


class GradHooks:
    """Stages 2-3: per-parameter post-accumulate hooks feeding unit buckets.

    At most `max_inflight` buckets are in flight: launching one more first drains the oldest
    (waits for it and adds it into the fp32 accumulator), which bounds bucket memory.
    """

    def __init__(self, units: list[FlatUnit], max_inflight: int = 2) -> None:
        self.units = units
        self.max_inflight = max_inflight
        self._inflight: deque[FlatUnit] = deque()
        # callbacks(unit): after a unit's reduce launches / after its result is accumulated
        self.on_unit_done: list[Callable[[FlatUnit], None]] = []
        self.on_drained: list[Callable[[FlatUnit], None]] = []
        self._handles = []
        for unit in units:
            for i, (slot, p) in enumerate(zip(unit.layout.slots, unit.params, strict=True)):
                if slot.group >= 0:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(unit, i)))

    def _hook(self, unit: FlatUnit, index: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if unit.on_grad_ready(index, p):
                self._launched(unit)

        return hook

    def _launched(self, unit: FlatUnit) -> None:
        self._inflight.append(unit)
        while len(self._inflight) > self.max_inflight:
            self._drain(self._inflight.popleft())
        for cb in self.on_unit_done:
            cb(unit)

    def _drain(self, unit: FlatUnit) -> None:
        unit.drain_reduce()
        for cb in self.on_drained:
            cb(unit)

    def finish_backward(self) -> None:
        """Reduce what backward left partially filled (unused parameters), then drain all.

        Units are visited in their fixed order so every rank launches the same collectives in
        the same order.
        """
        for unit in self.units:
            if unit.has_partial_bucket():
                unit.launch_reduce()
                self._inflight.append(unit)
        while self._inflight:
            self._drain(self._inflight.popleft())
        for unit in self.units:
            unit._ready = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class BoundaryReduceHooks:
    """Stages 0-1: start each bucket's reduction while the rest of backward runs.

    Gradients accumulate in place into each unit's flat `grads` buffer on every micro-step. On
    the last micro-step of an accumulation cycle (`arm`), a per-parameter post-accumulate hook
    counts the unit's gradients; when the last one lands, the unit's all-reduce (stage 0) or
    reduce-scatter (stage 1) is launched at once, as DDP's buckets do, instead of after
    backward. Other micro-steps pay only the disarmed check: no communication.
    """

    def __init__(self, units: list[FlatUnit]) -> None:
        self.units = units
        self._armed = False
        self._ready: dict[FlatUnit, int] = {}
        self._launched: dict[FlatUnit, tuple[comm.Pending, torch.Tensor]] = {}
        self._handles = []
        for unit in units:
            for slot, p in zip(unit.layout.slots, unit.params, strict=True):
                if slot.group >= 0:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(unit)))

    def _hook(self, unit: FlatUnit) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if not self._armed or unit in self._launched:
                return
            ready = self._ready.get(unit, 0) + 1
            self._ready[unit] = ready
            if ready == unit.trainable:
                self._launched[unit] = unit.reduce_full_grads()

        return hook

    def arm(self) -> None:
        self._armed = True
        self._ready.clear()
        self._launched.clear()

    def take(self) -> list[tuple[FlatUnit, comm.Pending, torch.Tensor]]:
        """Every unit's reduction, launching (in the fixed unit order, the same on every rank)
        those whose gradients did not all arrive, e.g. parameters unused this step."""
        out = []
        for unit in self.units:
            launched = self._launched.get(unit)
            if launched is None:
                launched = unit.reduce_full_grads()
            out.append((unit, *launched))
        self._armed = False
        self._ready.clear()
        self._launched.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _PreBackward(torch.autograd.Function):
    """Identity in forward; its backward gathers the unit before the unit's own backward."""

    @staticmethod
    def forward(ctx: Any, hooks: Stage3Hooks, unit: FlatUnit, *tensors: torch.Tensor) -> Any:
        ctx.hooks, ctx.unit = hooks, unit
        return tensors

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.hooks.pre_backward(ctx.unit)
        return (None, None, *grads)


class Stage3Hooks:
    def __init__(self, units: list[FlatUnit], prefetch_numel: int, max_live_numel: int) -> None:
        self.units = [u for u in units if u.kind is UnitKind.ON_DEMAND]
        self.prefetch_numel = prefetch_numel
        # DeepSpeed's stage3_max_live_parameters: a prefetch that would bring the parameters
        # gathered past this count is not started. The unit about to run is always gathered.
        self.max_live_numel = max_live_numel
        self.phase = Phase.IDLE
        self.order: list[FlatUnit] = []  # forward order: pre-forward hooks, first step
        # Units in the order their forward finished; backward reaches them in reverse (the
        # outermost unit, the root, finishes last and its backward starts first).
        self.finished: list[FlatUnit] = []
        self._recording = True
        self._handles = []
        for unit in self.units:
            self._handles.append(unit.module.register_forward_pre_hook(self._pre_hook(unit)))
            self._handles.append(unit.module.register_forward_hook(self._post_hook(unit)))

    # -- forward ------------------------------------------------------------------------------

    def _pre_hook(self, unit: FlatUnit) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            unit.wait_gathered()
            if self.phase is Phase.BACKWARD:  # a recompute under activation checkpointing
                return
            if self._recording:
                if unit not in self.order:
                    self.order.append(unit)
            else:
                self._prefetch(unit, step=+1)

        return hook

    def _post_hook(self, unit: FlatUnit) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.phase is Phase.BACKWARD:
                return output
            if self._recording and unit not in self.finished:
                self.finished.append(unit)
            # The unit whose backward comes first stays gathered: releasing it here would only
            # gather it again, exposed, at the start of backward (FSDP2 keeps its root alike).
            keep = (
                not self._recording
                and torch.is_grad_enabled()
                and bool(self.finished)  # empty if the recorded forward raised early
                and unit is self.finished[-1]
            )
            if not keep:
                unit.release()
            if not torch.is_grad_enabled():
                return output
            return _thread_outputs(output, self, unit)

        return hook

    def _prefetch(self, unit: FlatUnit, step: int) -> None:
        """Start gathers of the units after `unit`: in forward order (`step` +1), or in backward
        order (`step` -1: the reverse of the order in which forward finished them)."""
        order = self.order if step > 0 else self.finished
        if unit not in order:
            return
        i = order.index(unit) + step
        budget = self.prefetch_numel
        live = self.live_numel()
        while 0 <= i < len(order) and budget > 0:
            nxt = order[i]
            if nxt.state is ShardState.SHARDED:
                size = nxt.layout.padded_numel
                if live + size > self.max_live_numel:
                    return
                nxt.gather()
                live += size
            budget -= nxt.layout.padded_numel
            i += step

    def live_numel(self) -> int:
        """Parameters gathered or being gathered now (ON_DEMAND units)."""
        return sum(u.layout.padded_numel for u in self.units if u.state is not ShardState.SHARDED)

    # -- backward -----------------------------------------------------------------------------

    def pre_backward(self, unit: FlatUnit) -> None:
        unit.wait_gathered()
        self._prefetch(unit, step=-1)

    def on_grads_reduced(self, unit: FlatUnit) -> None:
        if unit.kind is UnitKind.ON_DEMAND:
            unit.release()

    # -- phases -------------------------------------------------------------------------------

    def begin_forward(self) -> None:
        self.phase = Phase.FORWARD

    def end_forward(self) -> None:
        self.phase = Phase.IDLE
        if self.order:
            self._recording = False

    def begin_backward(self) -> None:
        self.phase = Phase.BACKWARD

    def end_backward(self) -> None:
        self.phase = Phase.IDLE
        for unit in self.units:
            unit.release()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _thread_outputs(output: Any, hooks: Stage3Hooks, unit: FlatUnit) -> Any:
    """Route every floating tensor of `output` (nested tuples/lists/dicts) through _PreBackward.

    The walkers are module-level functions, not closures: a nested function that calls itself
    forms a reference cycle (function -> cell -> function) that would keep the rebuilt outputs,
    and through their grad_fn the block's whole autograd graph, alive until Python's cyclic GC
    happened to run (measured: +0.6 GB at the peak, 18 GB with the GC off).
    """
    flat: list[torch.Tensor] = []
    _collect(output, flat)
    if not flat:
        return output
    new = dict(zip(map(id, flat), _PreBackward.apply(hooks, unit, *flat), strict=True))
    return _rebuild(output, new)


def _collect(x: Any, flat: list[torch.Tensor]) -> None:
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            flat.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _collect(y, flat)
    elif isinstance(x, dict):
        for y in x.values():
            _collect(y, flat)


def _rebuild(x: Any, new: dict[int, torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        return new.get(id(x), x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_rebuild(y, new) for y in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_rebuild(y, new) for y in x)
    if isinstance(x, dict):
        out = type(x)() if type(x) is not dict else {}
        for k, v in x.items():
            out[k] = _rebuild(v, new)
        return out
    return x

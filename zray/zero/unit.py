"""A flat unit: one set of parameters, its flat buffers and its shard state.

[Note: buffers of a unit] (P = padded numel, S = shard numel = P / world, or P at stage 0)
- `full`    [P] compute dtype. Parameters are views into it. Kept for units that are not
            gathered on demand; at stage 3 its storage is resized to 0 when released and back
            to P bytes when gathered, so the parameter views stay valid without re-pointing
            (saved-for-backward views included).
- `shard`   [S] stage 3 only, and only where the gather cannot read `master` on the device (fp32
            compute, where it *is* the master; offload_param, where it lives in host memory;
            offload_optimizer, where the master does): this rank's part of the parameters while
            released. With 16-bit compute and the master on the device there is no 16-bit copy
            at all: each gather casts the master into its own slice of `full` and gathers in
            place, so stage 3 holds 12 bytes per parameter / N instead of 14.
- `master`  [S] fp32 master weights of this rank's range; aliases `full`/`shard` when the compute
            dtype is already fp32, so fp32 training holds no second copy.
- `grads`   [P] compute dtype, stages 0-1: parameters' .grad are views into it, autograd
            accumulates micro-steps into it in place, and it is reduced once at the boundary.
- `grad_acc`[S] accumulation dtype (the reduce dtype unless data_types.grad_accum_dtype says
            otherwise), stages 2-3: the reduced local gradient shard, summed over micro-steps.
            Exists only from the first reduction of an accumulation cycle to the step: the
            first reduced bucket becomes it, and zero_grads drops it, so forward (where
            activations peak) runs without it.
- `bucket`  [P] reduce dtype, stages 2-3, transient: filled by per-parameter hooks during backward,
            reduce-scattered as soon as the last gradient of the unit arrives, then dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

from zray.parallel.context import ParallelContext
from zray.zero import comm
from zray.zero.partition import ParamSlot, UnitLayout
from zray.zero.peer_gather import EventPending, PeerGather


class UnitKind(enum.Enum):
    REPLICATED = "replicated"  # stage 0: every rank holds and updates everything
    KEEP_FULL = "keep_full"  # stages 1-2, and small persistent parameters at stage 3
    ON_DEMAND = "on_demand"  # stage 3: gathered before use, released after


class ShardState(enum.Enum):
    SHARDED = "sharded"  # only `shard` is held (ON_DEMAND units)
    GATHERING = "gathering"  # an all-gather into `full` is in flight
    GATHERED = "gathered"  # `full` holds every parameter


@dataclass(frozen=True)
class UnitSettings:
    """How every unit of an engine holds its buffers (decided once, from the config)."""

    compute_dtype: torch.dtype
    reduce_dtype: torch.dtype
    accum_dtype: torch.dtype
    grads_in_backward: bool  # stages 2-3: hooks feed buckets during backward
    offload_optimizer: bool = False  # master weights (and the optimizer) in CPU memory
    offload_params: bool = False  # stage 3: the parameter shard in CPU memory
    pin_memory: bool = False  # host buffers page-locked, so copies to/from the GPU are async
    # Gradients are multiplied by this before the sum over data-parallel ranks (DeepSpeed's
    # prescale_gradients: 1 / world; gradient_predivide_factor f: 1 / f); the optimizer's
    # unscale divides it out again after the sum. 1.0: the raw gradients are summed.
    pre_reduce_scale: float = 1.0
    # DeepSpeed's zero_optimization.reduce_scatter: False sums each whole bucket with an
    # all-reduce and keeps this rank's slice (twice the traffic, the same sums).
    reduce_scatter: bool = True


class FlatUnit:
    def __init__(
        self,
        name: str,
        module: nn.Module,
        layout: UnitLayout,
        params: list[nn.Parameter],
        kind: UnitKind,
        ctx: ParallelContext,
        settings: UnitSettings,
    ) -> None:
        assert len(params) == len(layout.slots)
        self.name, self.module, self.layout, self.params = name, module, layout, params
        self.kind, self.ctx, self.settings = kind, ctx, settings
        compute_dtype = settings.compute_dtype
        self.compute_dtype, self.reduce_dtype = compute_dtype, settings.reduce_dtype
        self.grads_in_backward = settings.grads_in_backward
        self.device = ctx.device
        self.trainable = sum(1 for s in layout.slots if s.group >= 0)
        lo, hi = layout.shard_range(ctx.dp_rank)
        self.shard_lo, self.shard_hi = lo, hi
        pin = settings.pin_memory and torch.cuda.is_available()

        def host(t: torch.Tensor) -> torch.Tensor:
            """A CPU copy of t, page-locked when asked (pinning needs CUDA)."""
            out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            return out.copy_(t)

        # Build the fp32 flat buffer from the parameters as the user made them, so the master
        # weights keep full precision even when the compute copy is bf16/fp16.
        flat32 = torch.zeros(layout.padded_numel, dtype=torch.float32, device=self.device)
        for slot, p in zip(layout.slots, params, strict=True):
            flat32[slot.offset : slot.end].copy_(p.detach().reshape(-1))
        # fp32 without offload: the master weights are the parameters themselves.
        alias = compute_dtype == torch.float32 and not settings.offload_optimizer
        self.full = flat32 if compute_dtype == torch.float32 else flat32.to(compute_dtype)
        self.shard: torch.Tensor | None = None
        if kind is UnitKind.ON_DEMAND:
            if alias:
                self.shard = self.full[lo:hi].clone()
                self.master = self.shard
            else:
                self.master = flat32[lo:hi].clone()
                if settings.offload_params:
                    self.shard = host(self.full[lo:hi])
                elif settings.offload_optimizer:
                    self.shard = self.full[lo:hi].clone()
        else:
            self.master = self.full[lo:hi] if alias else flat32[lo:hi].clone()
        # Offload: fp32 master in host memory; the gradient shard and, for 16-bit compute, the
        # updated parameters cross PCIe in the compute dtype (half the bytes of fp32).
        self.grad_host: torch.Tensor | None = None
        self.lowp_host: torch.Tensor | None = None
        if settings.offload_optimizer:
            self.master = host(self.master)
            self.grad_host = torch.zeros(hi - lo, dtype=settings.reduce_dtype, pin_memory=pin)
            if compute_dtype != torch.float32:
                # Starts as the current values: frozen parameters and padding, which the step
                # never writes, go back to the device unchanged.
                self.lowp_host = host(self.full[lo:hi])
        del flat32
        for slot, p in zip(layout.slots, params, strict=True):
            p.data = self.full[slot.offset : slot.end].view(slot.shape)
            p._zray_unit = self  # lets GatheredParameters find the unit of a parameter

        self.grads: torch.Tensor | None = None
        self.grad_acc: torch.Tensor | None = None
        self.accum_dtype = settings.accum_dtype
        if not settings.grads_in_backward:
            self.grads = torch.zeros(layout.padded_numel, dtype=compute_dtype, device=self.device)
            self.install_grad_views()
        self._bucket: torch.Tensor | None = None
        self._ready = 0  # trainable gradients received this micro-step (stages 2-3)
        self._reduce: tuple[comm.Pending, torch.Tensor] | None = None
        self._gather: comm.Pending | EventPending | None = None
        # The parameter all-gather after a step, when the engine defers it (KEEP_FULL units).
        self.publishing: comm.Pending | None = None
        # Stage 3 on one host may gather by peer copies instead of NCCL (set by ZeroOptimizer).
        self.peer_gather: PeerGather | None = None
        self.state = ShardState.GATHERED
        if kind is UnitKind.ON_DEMAND:
            self.release()

    # ---- parameters -------------------------------------------------------------------------

    def gather(self) -> None:
        """Start the all-gather of the parameters (ON_DEMAND units; no-op otherwise)."""
        if self.state is not ShardState.SHARDED:
            return
        nbytes = self.layout.padded_numel * self.full.element_size()
        self.full.untyped_storage().resize_(nbytes)
        # Writing into the buffer bumps the version counter that the parameter views share,
        # which would fail autograd's saved-tensor check in backward; the values are the same
        # parameters as in forward, so the bump is suppressed.
        with torch.autograd._unsafe_preserve_version_counter(self.full):
            if self.peer_gather is not None:
                # Peer copies over NVLink; a cast happens on the way (see peer_gather.py).
                src = self.master if self.shard is None else self.shard
                self._gather = self.peer_gather.all_gather(self.full, src)
                self.state = ShardState.GATHERING
                return
            if self.shard is None:
                # Cast the fp32 master into this rank's slice and gather in place.
                src = self.full[self.shard_lo : self.shard_hi]
                src.copy_(self.master)
            elif self.shard.device != self.full.device:
                # offload_param: the shard comes up from host memory.
                src = self.shard.to(self.full.device, non_blocking=True)
            else:
                src = self.shard
            self._gather = comm.all_gather_flat(
                self.full, src, self.ctx.dp_group, self.ctx.comm_stats
            )
        self.state = ShardState.GATHERING

    def shard_on_device(self) -> bool:
        """Whether a gather reads this rank's part from device memory (not offload_param)."""
        return self.shard is None or self.shard.device == self.full.device

    def wait_gathered(self) -> None:
        if self.state is ShardState.SHARDED:
            self.gather()
        if self.state is ShardState.GATHERING:
            assert self._gather is not None
            self._gather.wait()
            self._gather = None
            self.state = ShardState.GATHERED

    def release(self) -> None:
        """Free the full parameters of an ON_DEMAND unit (the shard stays)."""
        if self.kind is not UnitKind.ON_DEMAND or self.state is ShardState.SHARDED:
            return
        self.wait_gathered()
        self.full.untyped_storage().resize_(0)
        self.state = ShardState.SHARDED

    def publish(self, cast: bool = True) -> comm.Pending | None:
        """After the optimizer step: make the compute parameters equal the new master weights.

        With offload the updated values come up from host memory: the 16-bit copy the fused
        CPU step wrote (or the fp32 master when computing in fp32), copied asynchronously.
        `cast=False`: the optimizer step already wrote this rank's slice (zero/shard_adam.py);
        only the all-gather is left.
        """
        src = self.lowp_host if self.lowp_host is not None else self.master
        if self.kind is UnitKind.ON_DEMAND:
            # No shard: the next gather reads the master itself.
            if self.shard is not None and src.data_ptr() != self.shard.data_ptr():
                self.shard.copy_(src, non_blocking=True)
            return None
        local = self.full[self.shard_lo : self.shard_hi]
        if cast and src.data_ptr() != local.data_ptr():
            local.copy_(src, non_blocking=True)
        if self.kind is UnitKind.REPLICATED:
            return None
        return comm.all_gather_flat(self.full, local, self.ctx.dp_group, self.ctx.comm_stats)

    def wait_published(self) -> None:
        if self.publishing is not None:
            self.publishing.wait()
            self.publishing = None

    # ---- gradients, stages 0-1 --------------------------------------------------------------

    def install_grad_views(self) -> None:
        """Point every .grad at its slice of `grads`, re-zeroing any slice the user detached.

        A user's `model.zero_grad()` sets .grad to None; autograd would then allocate a fresh
        tensor that the reduction never sees. Checking identity each micro-step is O(#params).
        """
        assert self.grads is not None
        for slot, p in zip(self.layout.slots, self.params, strict=True):
            if slot.group < 0:
                continue
            view = self.grads[slot.offset : slot.end].view(slot.shape)
            g = p.grad
            if g is None or g.data_ptr() != view.data_ptr() or g.shape != view.shape:
                view.zero_()
                p.grad = view

    def reduce_full_grads(self) -> tuple[comm.Pending, torch.Tensor]:
        """Boundary reduction for stages 0-1: all-reduce (stage 0) or reduce-scatter (stage 1).

        Returns the pending collective and the [S] tensor that will hold the summed local range.
        """
        assert self.grads is not None
        src = (
            self.grads
            if self.grads.dtype == self.reduce_dtype
            else self.grads.to(self.reduce_dtype)
        )
        self._prescale(src)
        if self.kind is UnitKind.REPLICATED:
            return comm.all_reduce_sum(src, self.ctx.dp_group, self.ctx.comm_stats), src
        return self._sum_to_shard(src)

    # ---- gradients, stages 2-3 --------------------------------------------------------------

    def on_grad_ready(self, index: int, p: nn.Parameter) -> bool:
        """Per-parameter hook: move .grad into the bucket; reduce the bucket once complete.

        Returns True when this gradient completed the bucket and its reduce was launched.
        """
        slot: ParamSlot = self.layout.slots[index]
        if self._bucket is None:
            self._bucket = torch.zeros(
                self.layout.padded_numel, dtype=self.reduce_dtype, device=self.device
            )
        assert p.grad is not None
        self._bucket[slot.offset : slot.end].copy_(p.grad.reshape(-1))
        p.grad = None
        self._ready += 1
        if self._ready < self.trainable:
            return False
        self.launch_reduce()
        return True

    def launch_reduce(self) -> None:
        if self._bucket is None or self._reduce is not None:
            return
        self._prescale(self._bucket)
        self._reduce = self._sum_to_shard(self._bucket)
        self._bucket = None  # the Pending handle keeps it alive until the collective ends

    def _sum_to_shard(self, src: torch.Tensor) -> tuple[comm.Pending, torch.Tensor]:
        """Start the sum over ranks of `src` [padded numel]; returns the pending collective and
        the tensor that will hold this rank's summed slice [shard numel] once it completes."""
        group, stats = self.ctx.dp_group, self.ctx.comm_stats
        if not self.settings.reduce_scatter:  # all of it summed; this rank's slice kept
            return comm.all_reduce_sum(src, group, stats), src[self.shard_lo : self.shard_hi]
        out = torch.empty(
            self.shard_hi - self.shard_lo, dtype=self.reduce_dtype, device=self.device
        )
        return comm.reduce_scatter_sum(out, src, group, stats), out

    def _prescale(self, grads: torch.Tensor) -> None:
        """Scale what this rank contributes to the sum (UnitSettings.pre_reduce_scale); the
        gradients are summed in the reduce dtype, so a smaller scale keeps an fp16 sum in range."""
        if self.settings.pre_reduce_scale != 1.0:
            grads.mul_(self.settings.pre_reduce_scale)

    def drain_reduce(self) -> None:
        """Wait for the bucket's sum over ranks and add this rank's slice into the accumulator."""
        if self._reduce is None:
            return
        pending, out = self._reduce
        pending.wait()
        if self.grad_acc is None:  # the cycle's first reduction becomes the accumulator
            # A copy where `out` is a slice of the whole summed bucket, so the bucket is freed.
            copy = not self.settings.reduce_scatter
            self.grad_acc = out.to(self.accum_dtype, copy=copy)
        else:
            self.grad_acc.add_(out)
        self._reduce = None
        self._ready = 0

    def has_partial_bucket(self) -> bool:
        return self._bucket is not None

    def zero_grads(self) -> None:
        if self.grads is not None:
            self.grads.zero_()
        self.grad_acc = None  # freed until the next cycle's first reduction
        self._bucket, self._reduce, self._ready = None, None, 0

    # ---- introspection ----------------------------------------------------------------------

    def slot_of(self, p: nn.Parameter) -> int:
        for i, q in enumerate(self.params):
            if q is p:
                return i
        raise KeyError(f"parameter is not in unit {self.name!r}")

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now, by what they are for (see zray.zero.memory)."""

        def nb(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.untyped_storage().nbytes()

        params = nb(self.full) + nb(self.shard)
        aliased = self.master.untyped_storage().data_ptr() in (
            self.full.untyped_storage().data_ptr(),
            None if self.shard is None else self.shard.untyped_storage().data_ptr(),
        )
        return {
            "params": params,
            "grads": nb(self.grads) + nb(self.grad_acc),
            "master": 0 if aliased else nb(self.master),
        }

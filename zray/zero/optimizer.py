"""The ZeRO optimizer: flat units, their hooks, and the torch optimizer over master shards.

It owns the mechanisms the engine's step calls, one per phase of the step:
`reduce_gradients` -> `grad_sumsq` -> `scale_grads` -> `optimizer.step()` -> `publish_params`
-> `zero_grad`. The engine decides the order and the numbers (loss scale, clipping); this class
moves the bytes. Stage differences are read off `StagePlan` and `UnitKind`, not spread as
`if stage ==` tests.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from zray import ops
from zray.errors import ConfigError
from zray.optim import ParamGroups, build_cpu_optimizer, build_optimizer, group_overrides
from zray.parallel.context import ParallelContext
from zray.zero import comm
from zray.zero.grouping import UnitSpec, bucket_units, module_units
from zray.zero.hooks import BoundaryReduceHooks, GradHooks, Stage3Hooks
from zray.zero.partition import Segment, StagePlan, build_layout
from zray.zero.peer_gather import PeerGather, PeerGatherUnavailable
from zray.zero.shard_adam import ShardAdam
from zray.zero.unit import FlatUnit, UnitKind, UnitSettings

log = logging.getLogger("zray")


class ZeroOptimizer:
    def __init__(
        self,
        model: nn.Module,
        groups: ParamGroups,
        plan: StagePlan,
        ctx: ParallelContext,
        settings: UnitSettings,
        zero_cfg: Any,
        optimizer_spec: Any,
        client_optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None,
    ) -> None:
        self.plan, self.ctx, self.settings = plan, ctx, settings
        self.offload = settings.offload_optimizer
        group_of: dict[int, int] = {}
        for gi, g in enumerate(groups):
            for p in g["params"]:
                if id(p) in group_of:
                    raise ValueError(
                        f"parameter appears in param groups {group_of[id(p)]} and {gi}"
                    )
                group_of[id(p)] = gi
        unused = [
            n for n, p in model.named_parameters() if p.requires_grad and id(p) not in group_of
        ]
        if unused:
            warnings.warn(
                f"{len(unused)} trainable parameters are not in model_parameters and will not be "
                f"updated (first: {unused[0]})",
                stacklevel=3,
            )

        if plan.partition_params:
            specs = module_units(model, int(zero_cfg.stage3_param_persistence_threshold))
        else:
            specs = bucket_units(model, int(zero_cfg.reduce_bucket_size))
        self.units = [self._make_unit(s, group_of) for s in specs]

        self.grad_hooks: GradHooks | None = None
        self.boundary_hooks: BoundaryReduceHooks | None = None
        self.stage3: Stage3Hooks | None = None
        self.peer_gather: PeerGather | None = None
        # overlap_param_gather: deferred parameter all-gathers, waited per unit before use.
        self._publish_hooks: list[Any] = []
        self.overlap_param_gather = bool(zero_cfg.overlap_param_gather)
        if self.overlap_param_gather and plan.partition_optimizer:
            self._install_publish_waits(model)
        if plan.reduce_in_backward:
            self.grad_hooks = GradHooks(self.units)
        elif ctx.is_distributed:
            self.boundary_hooks = BoundaryReduceHooks(self.units)
        if plan.partition_params:
            self.stage3 = Stage3Hooks(
                self.units,
                int(zero_cfg.stage3_prefetch_bucket_size),
                int(zero_cfg.stage3_max_live_parameters),
            )
            assert self.grad_hooks is not None
            self.grad_hooks.on_unit_done.append(self.stage3.on_grads_reduced)
            if zero_cfg.stage3_gather != "nccl":
                self._attach_peer_gather(zero_cfg.stage3_gather)
        # Offload at stages 2-3: on the last micro-step of a cycle each unit's gradient shard
        # starts for host memory as soon as its bucket is reduced, on a side stream, while the
        # rest of backward runs; `_gradients_to_host` only waits for what is still in flight.
        self._boundary = False
        self._sent: set[FlatUnit] = set()
        self._d2h = torch.cuda.Stream(ctx.device) if ctx.is_cuda and self.offload else None
        if self.offload and self.grad_hooks is not None:
            self.grad_hooks.on_drained.append(self._send_to_host)

        # One optimizer tensor per (unit, group) segment of this rank's master shard.
        self._segments: list[tuple[FlatUnit, int, int, torch.Tensor]] = []
        # (unit index, group) -> (the segment, its optimizer tensor): checkpoints slice states.
        self.segment_tensors: dict[tuple[int, int], tuple[Segment, torch.Tensor]] = {}
        seg_groups: ParamGroups = [{"params": [], **group_overrides(g)} for g in groups]
        for ui, unit in enumerate(self.units):
            for seg in unit.layout.segments(ctx.dp_rank):
                t = unit.master[seg.shard_lo : seg.shard_hi]
                self._segments.append((unit, seg.shard_lo, seg.shard_hi, t))
                self.segment_tensors[(ui, seg.group)] = (seg, t)
                seg_groups[seg.group]["params"].append(t)
        if self.offload:
            self.optimizer = build_cpu_optimizer(optimizer_spec, seg_groups, client_optimizer)
        else:
            self.optimizer = build_optimizer(optimizer_spec, seg_groups, client_optimizer)
        # zray's one-pass Adam kernel where it applies (zero/shard_adam.py); None: torch steps.
        self.shard_adam: ShardAdam | None = None
        if not self.offload:
            torch_adam = optimizer_spec is not None and optimizer_spec.torch_adam
            self.shard_adam = ShardAdam.maybe(self.optimizer, prefer_torch=torch_adam)
        self._master_grads: dict[FlatUnit, torch.Tensor] = {}
        # Units whose compute copy the last update already wrote (publish skips their cast).
        self._lowp_written: set[FlatUnit] = set()

    def _attach_peer_gather(self, mode: str) -> None:
        """Stage 3 on one host: gather parameters by peer copies (zero/peer_gather.py).

        "auto" keeps NCCL where that is not possible; "peer_copy" makes it an error.
        """
        units = [u for u in self.units if u.kind is UnitKind.ON_DEMAND and u.shard_on_device()]
        if not units or not self.ctx.is_distributed:
            return
        assert self.ctx.dp_group is not None
        largest = max(u.shard_hi - u.shard_lo for u in units)
        try:
            gather = PeerGather.create(
                self.ctx.dp_group,
                self.ctx.device,
                self.settings.compute_dtype,
                largest,
                self.ctx.comm_stats,
            )
        except PeerGatherUnavailable as e:
            if mode == "peer_copy":
                raise ConfigError(
                    "zero_optimization.stage3_gather", mode, "nccl or auto on this machine", str(e)
                ) from e
            log.info("zray: stage 3 gathers with NCCL (peer copies unavailable: %s)", e)
            return
        self.peer_gather = gather
        for u in units:
            u.peer_gather = gather

    def _make_unit(self, spec: UnitSpec, group_of: dict[int, int]) -> FlatUnit:
        named = [(n, p.shape, group_of.get(id(p), -1)) for n, p in spec.params]
        sharded = self.plan.partition_optimizer
        layout = build_layout(named, self.ctx.dp_size, sharded)
        by_name = dict(spec.params)
        params = [by_name[s.name] for s in layout.slots]
        if not sharded:
            kind = UnitKind.REPLICATED
        else:
            kind = UnitKind.ON_DEMAND if spec.on_demand else UnitKind.KEEP_FULL
        return FlatUnit(
            spec.name,
            spec.module,
            layout,
            params,
            kind,
            self.ctx,
            self.settings,
        )

    # ---- micro-step hooks the engine calls ----------------------------------------------------

    def before_forward(self) -> None:
        if self.stage3 is not None:
            self.stage3.begin_forward()

    def after_forward(self) -> None:
        if self.stage3 is not None:
            self.stage3.end_forward()

    def before_backward(self, boundary: bool = False) -> None:
        self._boundary = boundary
        if self.grad_hooks is None:
            for unit in self.units:
                unit.install_grad_views()
            if boundary and self.boundary_hooks is not None:
                self.boundary_hooks.arm()
        if self.stage3 is not None:
            self.stage3.begin_backward()

    def after_backward(self) -> None:
        if self.grad_hooks is not None:
            self.grad_hooks.finish_backward()
        if self.stage3 is not None:
            self.stage3.end_backward()

    # ---- the boundary step --------------------------------------------------------------------

    def reduce_gradients(self) -> None:
        """Sum gradients over data-parallel ranks into master gradients (not yet averaged):
        fp32 for torch's optimizers, left in the reduce dtype for zray's kernel.

        Stages 0-1 communicate here, once per accumulation cycle; stages 2-3 already did during
        backward and only point the optimizer at their accumulators.
        """
        if self.grad_hooks is not None:
            self._master_grads = {}
            for unit in self.units:
                acc = unit.grad_acc
                if acc is None:  # no gradient reached this unit in the whole cycle
                    acc = torch.zeros(
                        unit.shard_hi - unit.shard_lo, dtype=torch.float32, device=unit.device
                    )
                self._master_grads[unit] = self._as_master_grad(acc)
        else:
            if self.boundary_hooks is not None:
                launched = self.boundary_hooks.take()  # most already launched during backward
            else:
                launched = [(u, *u.reduce_full_grads()) for u in self.units]
            self._master_grads = {}
            for unit, pending, out in launched:
                pending.wait()
                self._master_grads[unit] = self._as_master_grad(out)
        if self.offload:
            self._gradients_to_host()
            return
        if self.shard_adam is not None:
            return  # the kernel reads the gradient as reduced; no fp32 copy, no .grad
        for unit, lo, hi, t in self._segments:
            t.grad = self._master_grads[unit][lo:hi]

    def _as_master_grad(self, g: torch.Tensor) -> torch.Tensor:
        """fp32 for torch's optimizers; as reduced for zray's kernel, which widens as it reads."""
        if self.shard_adam is not None or self.offload or g.dtype == torch.float32:
            return g
        return g.float()

    def _send_to_host(self, unit: FlatUnit) -> None:
        """Start one unit's gradient shard for host memory (boundary micro-step only)."""
        if not self._boundary or unit.grad_acc is None:
            return
        assert unit.grad_host is not None
        if self._d2h is None:
            unit.grad_host.copy_(unit.grad_acc)
        else:
            # The copy must see the accumulation the default stream just queued.
            self._d2h.wait_stream(torch.cuda.current_stream(self.ctx.device))
            with torch.cuda.stream(self._d2h):
                unit.grad_host.copy_(unit.grad_acc, non_blocking=True)
        self._sent.add(unit)

    def _gradients_to_host(self) -> None:
        """Offload: each unit's reduced gradient shard into its host buffer, in the reduce dtype
        (bf16 crosses PCIe at half fp32's bytes; the fused CPU step widens it as it reads)."""
        for unit in self.units:
            assert unit.grad_host is not None
            if unit not in self._sent:
                src = unit.grad_acc if unit.grad_acc is not None else self._master_grads[unit]
                unit.grad_host.copy_(src, non_blocking=True)
            self._master_grads[unit] = unit.grad_host
        self._sent.clear()
        if self._d2h is not None:
            self._d2h.synchronize()
        if self.ctx.is_cuda:
            torch.cuda.current_stream().synchronize()  # host sync: the CPU step reads them next

    @property
    def master_grads(self) -> dict[FlatUnit, torch.Tensor]:
        """Each unit's reduced gradient shard (fp32, or as reduced when zray's kernel steps, or
        offloaded), between reduce and zero_grad."""
        return self._master_grads

    def grad_sumsq(self) -> torch.Tensor:
        """Sum of squares of the summed gradients over all ranks, as a 1-element fp32 tensor.

        Non-finite values propagate (inf/nan in, inf/nan out), so the same number answers the
        fp16 overflow question. Stage 0 gradients are whole on every rank: no communication.
        """
        grads = list(self._master_grads.values())
        if grads and grads[0].device.type == "cpu":
            # One pass per buffer in the compiled kernel (fp64 accumulation).
            total = sum(ops.sumsq_nonfinite(g)[0] for g in grads)
            out = torch.tensor([total], dtype=torch.float32)
        elif grads:
            # fp32 results for 16-bit gradients too (zray's Adam leaves them as reduced).
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            out = torch.stack(norms).pow(2).sum().reshape(1)
        else:
            out = torch.zeros(1, dtype=torch.float32, device=self.ctx.device)
        if self.plan.partition_optimizer:
            comm.all_reduce_sum(out, self.ctx.dp_group, self.ctx.comm_stats).wait()
        return out

    def scale_grads(self, factor: torch.Tensor) -> None:
        """master_grad *= factor (a device scalar: unscale, average and clip in one pass)."""
        grads = list(self._master_grads.values())
        if grads:
            torch._foreach_mul_(grads, factor.reshape(()).to(grads[0].device))

    def update(self, factor: torch.Tensor) -> None:
        """Scale the gradients by `factor` and step the optimizer on this rank's shard.

        Offload: one fused pass per segment on the CPU reads the 16-bit gradient, applies the
        factor, updates fp32 master and Adam states, and writes the 16-bit parameter copy that
        `publish_params` sends back to the device.
        """
        if self.shard_adam is not None:
            self._shard_adam_step(factor)
            return
        if not self.offload:
            if any(g.get("fused") for g in self.optimizer.param_groups):
                # torch's fused Adam divides each gradient by `grad_scale` as it reads it (the
                # protocol torch.amp.GradScaler uses), which saves a separate pass over the
                # fp32 gradients; the value stays on the device, so there is no host sync.
                self.optimizer.grad_scale = factor.reshape(()).reciprocal()
                try:
                    self.optimizer.step()
                finally:
                    del self.optimizer.grad_scale
                return
            self.scale_grads(factor)
            self.optimizer.step()
            return
        scale = float(factor.reshape(()).item())  # host sync (the grads are on the host anyway)
        where = {id(t): (unit, lo, hi) for unit, lo, hi, t in self._segments}
        grads, outs = [], []
        for group in self.optimizer.param_groups:
            for t in group["params"]:
                unit, lo, hi = where[id(t)]
                grads.append(self._master_grads[unit][lo:hi])
                outs.append(None if unit.lowp_host is None else unit.lowp_host[lo:hi])
        lowp = None if any(o is None for o in outs) else outs
        self.optimizer.step_fused(grads, grad_scale=scale, out_lowp=lowp)

    def _shard_adam_step(self, factor: torch.Tensor) -> None:
        """zray's kernel: also writes each segment's new 16-bit weights into the unit's slice of
        the compute parameters where the unit keeps one (stages 0-2; stage 3 gathers cast the
        master themselves), so `publish_params` has no cast left to do for that unit."""
        assert self.shard_adam is not None
        work = []
        for unit, lo, hi, t in self._segments:
            grad = self._master_grads[unit]  # every unit has one after reduce_gradients
            lowp = None
            if unit.kind is not UnitKind.ON_DEMAND and unit.compute_dtype != torch.float32:
                lowp = unit.full[unit.shard_lo + lo : unit.shard_lo + hi]
                self._lowp_written.add(unit)
            work.append((t, grad[lo:hi], lowp))
        self.shard_adam.step(work, factor)

    def publish_params(self, defer: bool = False) -> None:
        """Copy updated master weights into the compute parameters and all-gather them.

        `defer` (zero_optimization.overlap_param_gather): return with the all-gathers in flight;
        each module's forward pre-hook waits for the units of its own parameters, so the next
        forward's first blocks run while later buckets still arrive. Launched in reverse unit
        order, which for buckets (built from the last parameter back) is registration order,
        the order forward usually meets them; NCCL runs them one after another in that order.
        """
        self.wait_published()
        written, self._lowp_written = self._lowp_written, set()
        for u in reversed(self.units):
            u.publishing = u.publish(cast=u not in written)
        if not defer:
            self.wait_published()

    def wait_published(self, units: Iterable[FlatUnit] | None = None) -> None:
        """Order the current stream after the deferred all-gathers of `units` (default: all)."""
        for u in self.units if units is None else units:
            u.wait_published()

    def _install_publish_waits(self, model: nn.Module) -> None:
        """overlap_param_gather: a forward pre-hook per module with parameters of its own."""
        for module in model.modules():
            units = {
                u
                for p in module.parameters(recurse=False)
                if (u := getattr(p, "_zray_unit", None)) is not None
                and u.kind is UnitKind.KEEP_FULL
            }
            if units:
                frozen = tuple(units)
                self._publish_hooks.append(
                    module.register_forward_pre_hook(lambda *_, us=frozen: self.wait_published(us))
                )

    def zero_grad(self) -> None:
        for unit in self.units:
            unit.zero_grads()
        for _, _, _, t in self._segments:
            t.grad = None
        self._master_grads = {}

    # ---- torch.optim-like surface for scripts written against DeepSpeed -------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def step(self, closure: Any = None) -> None:
        """A no-op: `engine.step()` performs the step (reduction, clipping, update).

        Exists for wrappers (such as Accelerate's) that call optimizer.step() after engine.step().
        """
        _warn_once("ZeroOptimizer.step() does nothing; call engine.step() to update parameters")

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    # ---- introspection ------------------------------------------------------------------------

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer states right now, and
        ("comm") the peer-copy gather's staging slots, which live outside torch's caching
        allocator (torch.cuda.memory_allocated does not count them)."""
        total = {"params": 0, "grads": 0, "optimizer": 0, "comm": 0}
        if self.peer_gather is not None:
            total["comm"] = self.peer_gather.buf.untyped_storage().nbytes()
        for unit in self.units:
            b = unit.held_bytes()
            total["params"] += b["params"]
            total["grads"] += b["grads"]
            total["optimizer"] += b["master"]
        for state in self.optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    total["optimizer"] += v.untyped_storage().nbytes()
        return total

    def unit_of(self, p: nn.Parameter) -> FlatUnit | None:
        return getattr(p, "_zray_unit", None)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)

"""The training engine: forward, backward and step, the way DeepSpeed users call them.

[Note: one optimizer step, top to bottom] (`Engine._boundary_step`)
1. reduce:   gradients summed over data-parallel ranks (stages 0-1 here, 2-3 during backward)
2. measure:  sum of squares of the local gradient shard, summed over ranks (one 4-byte
             all-reduce); it is also the overflow test, since inf/nan propagate through it.
             On a data x tensor mesh the sliced part is also summed over the tensor group and
             the replicated part counted once (`zray.zero.mesh_norm`)
3. skip?:    fp16 only: a non-finite sum skips the step on every rank (the one host sync)
4. scale:    one multiply per shard = 1 / (loss scale x dp world) x clip coefficient, on device
5. update:   the torch optimizer steps this rank's fp32 master shard, then the LR schedule
             (offload: the gradient shard goes to host memory in step 1, and steps 4-5 are one
             fused pass of zray's CPU Adam that also writes the 16-bit parameter copy)
6. publish:  new master weights cast into the compute parameters and all-gathered (stages 1-2)
7. zero:     gradient buffers cleared for the next accumulation cycle
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zray.activation_checkpointing import apply_activation_checkpointing
from zray.config import BatchSizes, Config
from zray.errors import ConfigError
from zray.metrics.profiler import ProfileReport, profile_step
from zray.metrics.timer import Phase, StepTimer
from zray.optim import ParamGroups, normalize_param_groups
from zray.parallel.context import ParallelContext
from zray.parallel.tensor import apply_tensor_parallel, gather_tp_tensor, tp_slices
from zray.precision import LossScaler
from zray.schedulers import build_scheduler
from zray.zero import comm
from zray.zero.mesh_norm import MeshGradNorm
from zray.zero.optimizer import ZeroOptimizer
from zray.zero.partition import StagePlan
from zray.zero.unit import UnitSettings

log = logging.getLogger("zray")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Engine(nn.Module):
    """Wraps a model; `engine(batch)`, `engine.backward(loss)`, `engine.step()` train it."""

    def __init__(
        self,
        model: nn.Module,
        config: Config,
        ctx: ParallelContext,
        model_parameters: Iterable[Any] | None = None,
        optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        super().__init__()
        # The data x tensor mesh (collective the first time): ZeRO and the batch see dp only.
        ctx = ctx.with_tensor_parallel(config.tensor_parallel.tp_size)
        self.config, self.ctx = config, ctx
        self.batch: BatchSizes = config.resolve_batch(ctx.dp_size)
        self.gas = self.batch.gradient_accumulation_steps
        self.compute_dtype: torch.dtype = config.compute_dtype
        self.plan = StagePlan(config.zero_optimization.stage)

        model.to(ctx.device)
        if isinstance(optimizer, torch.optim.Optimizer):
            groups = [dict(g) for g in optimizer.param_groups]
        else:
            groups = normalize_param_groups(model, model_parameters)
        if ctx.tp_size > 1:
            groups = _slice_model(model, ctx, groups)
        # After slicing: checkpointing wraps forwards in place, slicing replaces modules.
        apply_activation_checkpointing(model, _as_policy(config.activation_checkpointing.modules))
        _broadcast_module(model, ctx)
        comm_dtype = config.communication_data_type
        reduce_dtype = _DTYPES[comm_dtype] if comm_dtype else self.compute_dtype
        accum = config.data_types.grad_accum_dtype
        accum_dtype = _DTYPES[accum] if accum else reduce_dtype
        if not self.plan.reduce_in_backward and accum_dtype != self.compute_dtype:
            # Stages 0-1 let autograd accumulate into .grad, which is in the compute dtype.
            raise ConfigError(
                "data_types.grad_accum_dtype",
                accum,
                f"at ZeRO stages 0-1, the compute dtype ({self.compute_dtype}); other dtypes "
                "need stage 2 or 3",
            )
        zcfg = config.zero_optimization
        settings = UnitSettings(
            compute_dtype=self.compute_dtype,
            reduce_dtype=reduce_dtype,
            accum_dtype=accum_dtype,
            grads_in_backward=self.plan.reduce_in_backward,
            offload_optimizer=zcfg.offload_optimizer.enabled,
            offload_params=zcfg.offload_param.enabled,
            pin_memory=zcfg.offload_optimizer.pin_memory or zcfg.offload_param.pin_memory,
            pre_reduce_scale=_pre_reduce_scale(config, ctx.dp_size),
            reduce_scatter=zcfg.reduce_scatter,
        )
        self.zero = ZeroOptimizer(
            model,
            groups,
            self.plan,
            ctx,
            settings,
            zero_cfg=zcfg,
            optimizer_spec=config.optimizer,
            client_optimizer=optimizer,
        )
        self._mesh_norm: MeshGradNorm | None = None
        if ctx.tp_size > 1:
            self._mesh_norm = MeshGradNorm(self.zero.units, ctx, self.plan.partition_optimizer)
        # Buffers follow the compute dtype, as DeepSpeed casts the whole module.
        for buf_name, buf in list(model.named_buffers()):
            if buf.is_floating_point() and buf.dtype != self.compute_dtype:
                _set_buffer(model, buf_name, buf.to(self.compute_dtype))
        self.module = model
        self._auto_cast = config.fp16.enabled and config.fp16.auto_cast

        self.lr_scheduler: Any = None
        if lr_scheduler is not None:
            self.lr_scheduler = lr_scheduler(self.zero.optimizer)
        elif config.scheduler is not None:
            self.lr_scheduler = build_scheduler(
                self.zero.optimizer, config.scheduler.type, config.scheduler.resolved_params()
            )
        self.scaler = (
            LossScaler.from_fp16_config(config.fp16)
            if config.fp16.enabled
            else LossScaler.disabled()
        )
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0
        # Skip updates with non-finite gradients (bf16.check_grad_overflow, DeepSpeed's key, or
        # zray.skip_nonfinite_steps for any precision); fp16's dynamic scaling always does.
        self.skip_nonfinite = (
            config.bf16.enabled and config.bf16.check_grad_overflow
        ) or config.zray.skip_nonfinite_steps
        self.last_grad_norm: torch.Tensor | None = None
        # wall_clock_breakdown: per-phase seconds (CUDA events; one sync when read).
        self.timer = StepTimer(ctx.device, enabled=config.wall_clock_breakdown)
        self.last_breakdown: dict[str, float] = {}
        self.last_profile: ProfileReport | None = None
        # Waits to run before the next write of the master weights and optimizer state (a
        # copy of them may still be reading: zray.checkpoint.replica).
        self._state_fences: list[Callable[[], None]] = []

    # ---- the DeepSpeed-shaped API -------------------------------------------------------------

    @property
    def optimizer(self) -> ZeroOptimizer:
        return self.zero

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._auto_cast:  # DeepSpeed's fp16.auto_cast: floating inputs to fp16, nested
            args, kwargs = _to_half(args), _to_half(kwargs)
        self.zero.before_forward()
        try:
            with self.timer.phase(Phase.FORWARD):
                return self.module(*args, **kwargs)
        finally:
            self.zero.after_forward()

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next `step()` call will update parameters (DeepSpeed's meaning)."""
        return (self.micro_steps + 1) % self.gas == 0

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """Backward of `loss / gradient_accumulation_steps`, scaled for fp16."""
        scaled = loss.float() / self.gas if self.gas > 1 else loss.float()
        if self.scaler.scale != 1.0:
            scaled = scaled * self.scaler.scale
        with self.timer.phase(Phase.BACKWARD):
            self.zero.before_backward(boundary=self.is_gradient_accumulation_boundary())
            scaled.backward(retain_graph=retain_graph)
            self.zero.after_backward()
        return loss

    def step(self) -> None:
        """Count a micro-step; at the accumulation boundary, update the parameters."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if boundary:
            self._boundary_step()

    def zero_grad(self) -> None:
        self.zero.zero_grad()

    def wait_for_params(self) -> None:
        """With overlap_param_gather, make the parameters whole before reading them directly
        between `step()` and the next forward (the forward and the engine's methods wait)."""
        self.zero.wait_published()

    def fence_state(self, wait: Callable[[], None]) -> None:
        """Call `wait` once, right before the master weights and optimizer state are next
        written (the optimizer update, a checkpoint load): a reader of them, such as an
        asynchronous copy, is still in flight. On CUDA `wait` orders streams; it need not block
        the host."""
        self._state_fences.append(wait)

    def settle_state(self) -> None:
        """Run the pending state fences (see `fence_state`)."""
        fences, self._state_fences = self._state_fences, []
        for wait in fences:
            wait()

    def train_batch(
        self,
        data_iter: Iterator[Any],
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run one full step (gradient_accumulation_steps micro-batches from `data_iter`).

        A dict batch is passed as keyword arguments, anything else positionally. The loss is
        `loss_fn(outputs, batch)` when given, else the model's own (see `extract_loss`).
        Returns this rank's mean loss over the micro-batches, as a detached device tensor
        (reading it is a host sync; do that only when logging).
        """
        total = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        profile = self.config.flops_profiler
        for micro in range(self.gas):
            with self.timer.phase(Phase.DATA):
                batch = _to_device(next(data_iter), self.ctx.device)

            def micro_step(batch: Any = batch) -> torch.Tensor:
                out = self(**batch) if isinstance(batch, dict) else self(*_as_tuple(batch))
                loss = loss_fn(out, batch) if loss_fn is not None else extract_loss(out)
                self.backward(loss)
                return loss

            if profile.enabled and micro == 0 and self.global_steps + 1 == profile.profile_step:
                loss = self._profiled(micro_step)
            else:
                loss = micro_step()
            self.step()
            total += loss.detach().float()
        return total / self.gas

    # DeepSpeed engine attributes that training scripts commonly read.
    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def local_rank(self) -> int:
        return self.ctx.device.index or 0 if self.ctx.is_cuda else self.ctx.dp_rank

    @property
    def global_rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    def fp16_enabled(self) -> bool:
        return self.compute_dtype == torch.float16

    def bfloat16_enabled(self) -> bool:
        return self.compute_dtype == torch.bfloat16

    def zero_optimization_stage(self) -> int:
        return self.plan.stage

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.zero.param_groups]

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.batch.micro_batch_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self.gas

    def train_batch_size(self) -> int:
        return self.batch.train_batch_size

    # ---- the step -----------------------------------------------------------------------------

    def _profiled(self, micro_step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One micro-step under the FLOPs profiler; rank 0 prints or writes the table."""
        box: list[torch.Tensor] = []
        report = profile_step(self.module, lambda: box.append(micro_step()))
        self.last_profile = report
        if self.ctx.rank == 0:
            cfg = self.config.flops_profiler
            text = report.table(depth=cfg.module_depth if cfg.module_depth >= 0 else 1_000)
            if cfg.output_file:
                Path(cfg.output_file).write_text(text + "\n")
            else:
                print(text, flush=True)
        return box[0]

    def _boundary_step(self) -> None:
        zero = self.zero
        zero.wait_published()  # overlap_param_gather: gathers of parameters forward never used
        with self.timer.phase(Phase.COMMUNICATION):
            zero.reduce_gradients()  # 1
        if self._mesh_norm is None:  # 2
            sumsq = zero.grad_sumsq()
        else:
            sumsq = self._mesh_norm.grad_sumsq(zero.master_grads)
        self.global_steps += 1
        if self.scaler.dynamic:  # 3
            overflow = not bool(torch.isfinite(sumsq).item())  # host sync (fp16 only)
            self.scaler.update(overflow)
            if overflow:
                self.skipped_steps += 1
                log.info(
                    "fp16 overflow: step %d skipped, loss scale now %g",
                    self.global_steps,
                    self.scaler.scale,
                )
                zero.zero_grad()
                return
        else:
            self.scaler.update(False)
        # The sum over ranks was of gradients times pre_reduce_scale: divide it out with the
        # loss scale and the rank count, in one factor.
        pre = self.zero.settings.pre_reduce_scale
        unscale = 1.0 / (self.scaler.scale * self.ctx.dp_size * pre)
        norm = sumsq.sqrt() * unscale  # norm of the averaged, unscaled gradient
        self.last_grad_norm = norm
        # A host sync, only with the switch on (fp16's dynamic scaling checked above).
        skip = self.skip_nonfinite and not self.scaler.dynamic
        if skip and not bool(torch.isfinite(sumsq).item()):
            self.skipped_steps += 1
            log.warning("step %d: non-finite gradients, update skipped", self.global_steps)
            zero.zero_grad()
            return
        factor = torch.full_like(norm, unscale)
        clip = self.config.gradient_clipping
        if clip > 0:
            factor = factor * (clip / (norm + 1e-6)).clamp(max=1.0)
        self.settle_state()  # a copy of the state may still be reading it
        with self.timer.phase(Phase.OPTIMIZER):
            zero.update(factor)  # 4 + 5
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        with self.timer.phase(Phase.COMMUNICATION):
            zero.publish_params(defer=zero.overlap_param_gather)  # 6
        zero.zero_grad()  # 7
        if self.global_steps % self.config.steps_per_print == 0:
            if self.timer.enabled:
                self.last_breakdown = self.timer.summary()  # syncs the device once
                self.timer.reset()
            if self.ctx.rank == 0:
                log.info(
                    "step %d lr %s loss_scale %g%s",
                    self.global_steps,
                    self.get_lr(),
                    self.scaler.scale,
                    _breakdown_text(self.last_breakdown),
                )

    # ---- whole-model views --------------------------------------------------------------------

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 master weights (and buffers) keyed like `module.state_dict()`.

        Collective: every rank must call it; every rank gets the whole dict (on CPU). With
        tensor slicing the sliced entries are gathered to their full shapes, so the dict loads
        into the unsliced model.
        """
        self.zero.wait_published()
        full_of: dict[int, torch.Tensor] = {}
        for unit in self.zero.units:
            whole = unit.master
            if unit.layout.sharded:
                whole = torch.empty(
                    unit.layout.padded_numel, dtype=torch.float32, device=unit.master.device
                )
                comm.all_gather_flat(whole, unit.master, self.ctx.dp_group).wait()
            for slot, p in zip(unit.layout.slots, unit.params, strict=True):
                full_of[id(p)] = whole[slot.offset : slot.end].view(slot.shape).cpu().clone()
        out: dict[str, torch.Tensor] = {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            if id(t) in full_of:
                out[name] = full_of[id(t)]
            else:
                t = t.detach().cpu()
                out[name] = t.float() if t.is_floating_point() else t.clone()
        if self.ctx.tp_size > 1:
            for name, spec in tp_slices(self.module).items():
                if name in out:
                    out[name] = gather_tp_tensor(out[name], spec, self.ctx.tp_group)
        return out

    def save_16bit_model(
        self,
        save_dir: str,
        save_filename: str = "pytorch_model.bin",
        exclude_frozen_parameters: bool = False,
    ) -> bool:
        """DeepSpeed's: rank 0 writes the whole weights in the compute dtype (torch.save); at
        stage 3 only with zero_optimization.stage3_gather_16bit_weights_on_model_save, else it
        warns and returns False. Collective. See zray.checkpoint.model_save."""
        from zray.checkpoint.model_save import save_16bit_model

        return save_16bit_model(self, save_dir, save_filename, exclude_frozen_parameters)

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer states (incl. master)."""
        return self.zero.held_bytes()

    # ---- checkpoints --------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """The engine's own training state besides tensors: step counters, loss scaler and
        learning-rate schedule (a checkpoint's "engine" entry)."""
        return {
            "global_steps": self.global_steps,
            "micro_steps": self.micro_steps,
            "skipped_steps": self.skipped_steps,
            "scaler": self.scaler.state_dict(),
            "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
        }

    def load_counters(self, counters: dict[str, Any]) -> None:
        """Restore what `counters` handed out."""
        self.global_steps = counters["global_steps"]
        self.micro_steps = counters["micro_steps"]
        self.skipped_steps = counters["skipped_steps"]
        self.scaler.load_state_dict(counters["scaler"])
        if self.lr_scheduler is not None and counters.get("scheduler") is not None:
            self.lr_scheduler.load_state_dict(counters["scheduler"])

    def save_checkpoint(
        self,
        save_dir: str,
        tag: str | int | None = None,
        client_state: dict[str, Any] | None = None,
        keep_last: int | None = None,
    ) -> str:
        """Write this rank's shard of a checkpoint of step `tag` (default: global_steps).

        Every rank calls it; rank 0 returns once the checkpoint is committed (all shards in,
        checksums verified). The format loads at any world size and ZeRO stage.
        """
        from zray.checkpoint.engine_state import capture
        from zray.checkpoint.writer import save_shard

        step = self.global_steps if tag is None else _step_of(tag)
        shard = capture(self, client_state=client_state)
        return str(save_shard(save_dir, step, shard, keep_last=keep_last))

    def load_checkpoint(
        self, load_dir: str, tag: str | int | None = None
    ) -> tuple[str | None, dict[str, Any]]:
        """Load the newest valid checkpoint under `load_dir` (or step `tag`), resharding it onto
        this engine's world size and stage. Returns (path, this rank's client_state), or
        (None, {}) when there is none, as DeepSpeed does."""
        from zray.checkpoint.engine_state import restore
        from zray.checkpoint.reader import CheckpointReader, latest_valid

        if tag is None:
            found = latest_valid(load_dir)
        else:
            found = Path(load_dir) / f"step_{_step_of(tag):08d}"
        if found is None:
            return None, {}
        reader = CheckpointReader(found)
        restore(self, reader)
        mine = reader.rank_state(self.ctx.rank) or {}  # saved by global rank (dp x tp mesh)
        return str(found), dict(mine.get("client_state") or {})


def _step_of(tag: str | int) -> int:
    """DeepSpeed tags such as "global_step100", or a plain step number."""
    text = str(tag).removeprefix("global_step").removeprefix("step_")
    if not text.isdigit():
        raise ValueError(f"checkpoint tag: got {tag!r}; allowed: a step number or 'global_stepN'")
    return int(text)


def _breakdown_text(seconds: dict[str, float]) -> str:
    if not seconds:
        return ""
    return " | " + " ".join(f"{k} {v * 1e3:.1f}ms" for k, v in seconds.items())


def _pre_reduce_scale(config: Config, dp_size: int) -> float:
    """What each rank's gradients are multiplied by before the sum over ranks, as DeepSpeed
    does: prescale_gradients divides by the rank count before the sum, otherwise
    gradient_predivide_factor f divides by f before it (and the rest, dp_size / f, after)."""
    if dp_size == 1:
        return 1.0
    if config.prescale_gradients:
        return 1.0 / dp_size
    return 1.0 / config.gradient_predivide_factor


def extract_loss(out: Any) -> torch.Tensor:
    """The loss from a model's output: a tensor, a dict / ModelOutput with 'loss', or .loss."""
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise ValueError(
                f"model output: a tensor of shape {list(out.shape)}, not a scalar loss (logits? a "
                "causal LM returns its loss when given labels: a 'labels' column, or 'input_ids' "
                "alone for a model zray knows as a causal LM); allowed: a scalar loss tensor, a "
                "dict or object with a 'loss' entry, or a tuple whose first item is the loss"
            )
        return out
    if isinstance(out, dict) and "loss" in out:
        return out["loss"]
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        f"model output: got {type(out).__name__}; allowed: a loss tensor, a dict or object with "
        "a 'loss' entry, or a tuple whose first item is the loss"
    )


def _as_policy(modules: Any) -> str | list[str] | None:
    return list(modules) if isinstance(modules, tuple) else modules


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _to_half(x: Any) -> Any:
    """Floating-point tensors in `x` (and in its tuples, lists and dicts) cast to fp16."""
    if isinstance(x, torch.Tensor):
        return x.half() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_half(v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*(_to_half(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_to_half(v) for v in x)
    return x


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _slice_model(model: nn.Module, ctx: ParallelContext, groups: ParamGroups) -> ParamGroups:
    """Slice `model` in place for this rank of the tensor group; return `groups` pointing at
    the sliced model's parameters (they named the whole model's, which slicing replaces).

    The whole model must be the same on every rank of the tensor group before it is cut (each
    rank keeps a different part of it): tp rank 0's is broadcast over the group first. Costs
    one broadcast of the whole model; `_broadcast_module` then aligns the dp group.
    """
    name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for gi, g in enumerate(groups):
        for p in g["params"]:
            if id(p) not in name_of:
                raise ValueError(
                    f"param group {gi}: a parameter of shape {tuple(p.shape)} is not in the model;"
                    " with tensor_parallel every optimized parameter must belong to the model"
                )
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            comm.broadcast(t.data, 0, ctx.tp_group)
    apply_tensor_parallel(model, ctx.tp_group, ctx.tp_rank, ctx.tp_size)
    new = dict(model.named_parameters(remove_duplicate=False))
    out: ParamGroups = []
    for g in groups:
        # A tied parameter named twice in the whole model is one (sliced) parameter here too.
        params = list({id(q): q for q in (new[name_of[id(p)]] for p in g["params"])}.values())
        out.append({**g, "params": params})
    return out


def _broadcast_module(model: nn.Module, ctx: ParallelContext) -> None:
    """Start every rank from rank 0's weights, as DeepSpeed does (a no-op for one process)."""
    if not ctx.is_distributed:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            comm.broadcast(t.data, 0, ctx.dp_group)


def _set_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._buffers[leaf] = value

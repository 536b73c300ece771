"""The sections of zray's config tree, one frozen dataclass per DeepSpeed JSON section.

Field names and defaults are DeepSpeed's; constraints sit beside each field in
`field(metadata=meta(...))`, and rules across fields in each section's `_check`.
`zray.config.Config` is the root that holds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from zray.config.fields import (
    AUTO,
    Section,
    build,
    check_choice,
    check_keys,
    coerce,
    meta,
    plain,
    warn_once,
)
from zray.config.schedulers import SCHEDULER_TYPES
from zray.errors import NOT_GIVEN, ConfigError

_ADAM_PARAMS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "adam_w_mode",
    "bias_correction",
    "torch_adam",
)
# Which "optimizer.params" keys each optimizer type reads; anything else is an error.
OPTIMIZER_PARAMS: dict[str, tuple[str, ...]] = {
    "Adam": _ADAM_PARAMS,
    "AdamW": _ADAM_PARAMS,
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
}


@dataclass(frozen=True)
class OptimizerConfig(Section):
    """DeepSpeed's "optimizer" section; the JSON "params" are flattened into fields here.

    DeepSpeed's "Adam" applies decoupled (AdamW-style) weight decay unless
    `adam_w_mode` is false; "AdamW" is always decoupled. Read `decoupled_weight_decay`.
    """

    _path: ClassVar[str] = "optimizer.params"

    type: str = field(
        metadata=meta(choices=tuple(OPTIMIZER_PARAMS), ignore_case=True, key="optimizer.type")
    )
    lr: float = field(default=1e-3, metadata=meta(ge=0))
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = field(default=1e-8, metadata=meta(ge=0))
    weight_decay: float = field(default=0.0, metadata=meta(ge=0))
    adam_w_mode: bool = True
    bias_correction: bool = True
    # As in DeepSpeed: true steps with torch's own (fused) Adam; false, on GPU shards, with
    # zray's one-pass kernel where it applies (zero/shard_adam.py), else torch's.
    torch_adam: bool = False
    momentum: float = field(default=0.0, metadata=meta(ge=0))
    dampening: float = field(default=0.0, metadata=meta(ge=0))
    nesterov: bool = False

    @property
    def decoupled_weight_decay(self) -> bool:
        return self.type == "AdamW" or (self.type == "Adam" and self.adam_w_mode)

    @classmethod
    def _prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        top = check_keys(raw, "optimizer", ("type", "params"))
        if "type" not in top:
            raise ConfigError(
                "optimizer.type", NOT_GIVEN, cls._allowed("type"), "required key is missing"
            )
        # Resolve the type first: it decides which params are allowed. It has no default, so
        # "auto" is refused here like any other unknown name.
        type_ = check_choice(top["type"], tuple(OPTIMIZER_PARAMS), "optimizer.type", True)
        params = coerce(top.get("params") or {}, dict, "optimizer.params")
        allowed = OPTIMIZER_PARAMS[type_]
        return {"type": type_, **check_keys(params, "optimizer.params", allowed)}

    def _check(self) -> None:
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"optimizer.params.betas[{i}]", beta, "a number >= 0 and < 1")
        if self.type == "AdamW" and not self.adam_w_mode:
            raise ConfigError(
                "optimizer.params.adam_w_mode",
                False,
                "true (or leave it out)",
                "AdamW always decouples weight decay; use type Adam for L2-style decay",
            )
        if not self.bias_correction:
            raise ConfigError(
                "optimizer.params.bias_correction",
                False,
                "true (or leave it out)",
                "zray steps with torch's Adam/AdamW, which always corrects the bias",
            )
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError(
                "optimizer.params.nesterov",
                True,
                "true only with momentum > 0 and dampening == 0",
                f"momentum is {self.momentum}, dampening is {self.dampening}",
            )

    def to_dict(self) -> dict[str, Any]:
        params = {k: plain(getattr(self, k)) for k in OPTIMIZER_PARAMS[self.type]}
        return {"type": self.type, "params": params}


@dataclass(frozen=True)
class SchedulerConfig(Section):
    """DeepSpeed's "scheduler" section. `params` holds every parameter of the type, defaults
    filled in (see `zray.config.schedulers` for the names and defaults per type)."""

    _path: ClassVar[str] = "scheduler"

    type: str = field(metadata=meta(choices=tuple(SCHEDULER_TYPES), ignore_case=True))
    params: dict[str, Any] = field(default_factory=dict)

    def _check(self) -> None:
        params = build(SCHEDULER_TYPES[self.type], self.params).as_dict()
        object.__setattr__(self, "params", params)

    def resolved_params(self) -> dict[str, Any]:
        """`params` ready to build the schedule; raises if total_num_steps is still unresolved.

        total_num_steps "auto" stays None until the root Config sees zray.max_steps; a schedule
        built before that would have no end. warmup_max_lr None is left as is: it means "the
        optimizer's lr" to the schedule.
        """
        if "total_num_steps" in self.params and self.params["total_num_steps"] is None:
            raise ConfigError(
                "scheduler.params.total_num_steps",
                AUTO,
                "an integer > 0, or 'auto' with zray.max_steps set",
                f"{self.type} needs the total step count and zray.max_steps is not set",
            )
        return dict(self.params)


@dataclass(frozen=True)
class FP16Config(Section):
    """fp16 mixed precision with loss scaling; `loss_scale` 0 means dynamic scaling."""

    _path: ClassVar[str] = "fp16"

    enabled: bool = False
    loss_scale: float = field(default=0.0, metadata=meta(ge=0))
    initial_scale_power: int = field(default=16, metadata=meta(ge=0))
    loss_scale_window: int = field(default=1000, metadata=meta(gt=0))
    hysteresis: int = field(default=2, metadata=meta(ge=1))
    consecutive_hysteresis: bool = False
    min_loss_scale: float = field(default=1.0, metadata=meta(ge=0))
    auto_cast: bool = False


@dataclass(frozen=True)
class BF16Config(Section):
    _path: ClassVar[str] = "bf16"

    enabled: bool = False
    # As in DeepSpeed: true skips an update whose gradients hold inf or NaN (as fp16's loss
    # scaling does) instead of applying it. Costs a host sync per step. zray.fit stops a run on
    # a non-finite loss or gradient norm unless this (or zray.skip_nonfinite_steps) is set.
    check_grad_overflow: bool = False


@dataclass(frozen=True)
class FlopsProfilerConfig(Section):
    """DeepSpeed's `flops_profiler`: a per-module table of one training step."""

    _path: ClassVar[str] = "flops_profiler"

    enabled: bool = False
    profile_step: int = field(default=1, metadata=meta(ge=1))  # the global step to profile
    module_depth: int = field(default=-1, metadata=meta(ge=-1))  # -1: every depth
    top_modules: int = field(default=1, metadata=meta(ge=1))  # accepted; the table shows all
    detailed: bool = True
    output_file: str | None = None  # None: print on rank 0


@dataclass(frozen=True)
class DataTypesConfig(Section):
    """DeepSpeed's `data_types`: the dtype gradients are accumulated in across micro-steps."""

    _path: ClassVar[str] = "data_types"

    # None: the communication dtype (itself the compute dtype unless communication_data_type
    # says otherwise), as DeepSpeed does. "fp32" keeps bf16/fp16 accumulation exact-ish at the
    # cost of 2 more bytes per parameter (per rank and partitioned at stages 2-3).
    grad_accum_dtype: str | None = field(
        default=None, metadata=meta(choices=("fp32", "fp16", "bf16"), ignore_case=True)
    )


@dataclass(frozen=True)
class OffloadConfig(Section):
    """Where a ZeRO state lives between steps. zray offloads to "cpu"; "nvme" is refused.
    `nvme_path` and `buffer_count` are read for DeepSpeed compatibility and unused."""

    _path: ClassVar[str] = "zero_optimization.offload"

    device: str = field(
        default="none", metadata=meta(choices=("none", "cpu", "nvme"), ignore_case=True)
    )
    pin_memory: bool = False
    nvme_path: str | None = None
    buffer_count: int = field(default=4, metadata=meta(ge=0))

    @property
    def enabled(self) -> bool:
        return self.device != "none"

    def _check(self) -> None:
        if self.device == "nvme":
            key = f"{self._path}.device"
            reason = "NVMe offload is not supported by zray"
            raise ConfigError(key, "nvme", "one of none, cpu", reason)


@dataclass(frozen=True)
class OffloadParamConfig(OffloadConfig):
    """zero_optimization.offload_param: parameters on the CPU between uses (stage 3 only)."""

    _path: ClassVar[str] = "zero_optimization.offload_param"

    buffer_count: int = field(default=5, metadata=meta(ge=0))
    buffer_size: int = field(default=100_000_000, metadata=meta(ge=0))
    max_in_cpu: int = field(default=1_000_000_000, metadata=meta(ge=0))


@dataclass(frozen=True)
class OffloadOptimizerConfig(OffloadConfig):
    """zero_optimization.offload_optimizer: optimizer state and step on the CPU.

    `ratio` is the fraction of the optimizer state offloaded (stage 3 only, as in DeepSpeed)."""

    _path: ClassVar[str] = "zero_optimization.offload_optimizer"

    ratio: float = field(default=1.0, metadata=meta(ge=0, le=1))
    pipeline_read: bool = False
    pipeline_write: bool = False
    fast_init: bool = False


# Deprecated DeepSpeed booleans inside zero_optimization -> the offload section each turns on
# (None: cpu_offload_use_pin_memory sets pin_memory in whichever sections are on).
_LEGACY_OFFLOAD: dict[str, str | None] = {
    "cpu_offload": "offload_optimizer",
    "cpu_offload_param": "offload_param",
    "cpu_offload_use_pin_memory": None,
}


@dataclass(frozen=True)
class ZeroConfig(Section):
    """DeepSpeed's "zero_optimization" section. Sizes count elements, not bytes.

    `overlap_comm` left unset follows DeepSpeed: on at stage 3, off otherwise."""

    _path: ClassVar[str] = "zero_optimization"

    stage: int = field(default=0, metadata=meta(choices=(0, 1, 2, 3)))
    overlap_comm: bool | None = None
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: int = field(default=500_000_000, metadata=meta(gt=0))
    allgather_partitions: bool = True
    allgather_bucket_size: int = field(default=500_000_000, metadata=meta(gt=0))
    round_robin_gradients: bool = False
    sub_group_size: int = field(default=1_000_000_000, metadata=meta(gt=0))
    offload_optimizer: OffloadOptimizerConfig = field(default_factory=OffloadOptimizerConfig)
    offload_param: OffloadParamConfig = field(default_factory=OffloadParamConfig)
    stage3_prefetch_bucket_size: int = field(default=50_000_000, metadata=meta(ge=0))
    stage3_param_persistence_threshold: int = field(default=100_000, metadata=meta(ge=0))
    # zray's own key: how stage 3 gathers parameters. "peer_copy" moves them with the copy
    # engines over NVLink (one host only), leaving the SMs to compute (zero/peer_gather.py);
    # "auto" (the default) uses it where the whole data-parallel group is on one host.
    # zray's own key, stages 1-3: return from the step with the parameter all-gather in flight;
    # each module waits for its own parameters in the next forward. Direct reads of parameters
    # between engine.step() and the next forward (an EMA of the weights, say) must call
    # engine.wait_for_params() first; the engine's own methods do.
    overlap_param_gather: bool = False
    stage3_gather: str = field(default="auto", metadata=meta(choices=("nccl", "peer_copy", "auto")))
    stage3_max_live_parameters: int = field(default=1_000_000_000, metadata=meta(ge=0))
    stage3_max_reuse_distance: int = field(default=1_000_000_000, metadata=meta(ge=0))
    stage3_gather_16bit_weights_on_model_save: bool = field(
        default=False, metadata=meta(aliases=("stage3_gather_fp16_weights_on_model_save",))
    )

    @classmethod
    def _prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        # DeepSpeed's pre-"offload_*" booleans; read them as the sections they became.
        pin = None
        for old, section in _LEGACY_OFFLOAD.items():
            if old not in raw:
                continue
            key = f"zero_optimization.{old}"
            value = coerce(raw.pop(old), bool, key)
            new = f"zero_optimization.{section}" if section else "offload_*.pin_memory"
            warn_once(key, f"deprecated DeepSpeed key; read as {new}")
            if section is None:
                pin = value
            elif value:
                if section in raw:
                    raise ConfigError(key, True, f"only one of {old} and {section}", "both given")
                raw[section] = {"device": "cpu"}
        if pin is not None:
            for section in ("offload_optimizer", "offload_param"):
                if isinstance(raw.get(section), dict):
                    raw[section] = {"pin_memory": pin, **raw[section]}
        return raw

    @classmethod
    def _deepspeed_default(cls, name: str, given: Mapping[str, Any]) -> Any:
        if name == "overlap_comm":  # on at stage 3, off otherwise
            return given.get("stage", 0) == 3
        return super()._deepspeed_default(name, given)

    def _check(self) -> None:
        if self.overlap_comm is None:
            object.__setattr__(self, "overlap_comm", self.stage == 3)
        if self.offload_param.enabled and self.stage != 3:
            raise ConfigError(
                "zero_optimization.offload_param.device",
                self.offload_param.device,
                "none unless zero_optimization.stage is 3",
                f"parameter offload needs ZeRO stage 3, but zero_optimization.stage is {self.stage}",
            )
        if self.offload_optimizer.enabled and self.stage == 0:
            raise ConfigError(
                "zero_optimization.offload_optimizer.device",
                self.offload_optimizer.device,
                "none unless zero_optimization.stage is 1, 2 or 3",
                "optimizer offload needs ZeRO, but zero_optimization.stage is 0",
            )
        if self.offload_optimizer.ratio != 1.0 and self.stage != 3:
            raise ConfigError(
                "zero_optimization.offload_optimizer.ratio",
                self.offload_optimizer.ratio,
                "1.0 unless zero_optimization.stage is 3",
                f"partial optimizer offload needs stage 3, but the stage is {self.stage}",
            )


@dataclass(frozen=True)
class ActivationCheckpointingConfig(Section):
    """Which modules recompute their activations in backward.

    `modules`: None (off), "blocks" (every child of every nn.ModuleList), or module class names.
    DeepSpeed's own keys in this section are accepted and ignored (see IGNORED_KEYS)."""

    _path: ClassVar[str] = "activation_checkpointing"

    modules: str | tuple[str, ...] | None = None

    def _check(self) -> None:
        key = "activation_checkpointing.modules"
        allowed = "null, 'blocks', or a non-empty list of module class names"
        if isinstance(self.modules, str) and self.modules != "blocks":
            raise ConfigError(key, self.modules, allowed, "a single string must be 'blocks'")
        if isinstance(self.modules, tuple) and (not self.modules or not all(self.modules)):
            raise ConfigError(key, list(self.modules), allowed)


@dataclass(frozen=True)
class TensorParallelConfig(Section):
    """Tensor slicing degree: the world is a (world / tp_size) x tp_size data x tensor mesh
    (`ParallelContext.with_tensor_parallel`, which also checks that tp_size divides the world)."""

    _path: ClassVar[str] = "tensor_parallel"

    tp_size: int = field(default=1, metadata=meta(gt=0))

    @classmethod
    def _prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        # DeepSpeed spells it autotp_size (0 = off) or tp: {tp_size: N}; zray keeps one tp_size.
        given: dict[str, Any] = {}
        if "autotp_size" in raw:
            value = coerce(raw.pop("autotp_size"), int, "tensor_parallel.autotp_size")
            if value < 0:
                # Checked here: past this point the error would name tp_size, not what was set.
                raise ConfigError("tensor_parallel.autotp_size", value, "an integer >= 0 (0: off)")
            given["tensor_parallel.autotp_size"] = 1 if value == 0 else value
        if "tp" in raw:
            tp = coerce(raw.pop("tp"), dict, "tensor_parallel.tp")
            tp = check_keys(tp, "tensor_parallel.tp", ("tp_size",))
            if "tp_size" in tp:
                given["tensor_parallel.tp.tp_size"] = tp["tp_size"]
        if "tp_size" in raw:
            given["tensor_parallel.tp_size"] = raw["tp_size"]
        if len({repr(v) for v in given.values()}) > 1:
            key = next(iter(given))
            raise ConfigError(key, given[key], "one tensor-parallel size", f"conflict: {given}")
        if given:
            raw["tp_size"] = next(iter(given.values()))
        return raw

"""The root of the config tree: `Config`, DeepSpeed's top-level keys and the sections under
them (see the package docstring)."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from zray.config.batch import BatchSizes, plan_sizes
from zray.config.fields import (
    IGNORED_KEYS,
    Section,
    build,
    coerce,
    held_warnings,
    meta,
    rereading,
    warn_once,
)
from zray.config.run import ElasticityConfig, RunConfig
from zray.config.sections import (
    ActivationCheckpointingConfig,
    BF16Config,
    DataTypesConfig,
    FlopsProfilerConfig,
    FP16Config,
    OptimizerConfig,
    SchedulerConfig,
    TensorParallelConfig,
    ZeroConfig,
)
from zray.errors import ConfigError

_TBS = "train_batch_size"
_MICRO = "train_micro_batch_size_per_gpu"
_GAS = "gradient_accumulation_steps"

# PyYAML follows YAML 1.1, whose float syntax needs a dot: it reads DeepSpeed's habitual 5e8 as
# the string "5e8". Such strings in a YAML file are read back as the numbers the user meant.
_YAML_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class Config(Section):
    """The whole config: DeepSpeed's top-level keys plus zray's own `zray` run section.

    Batch sizes left None (or "auto") are derived by `resolve_batch` once the data-parallel
    world size is known, by DeepSpeed's rule.
    """

    _path: ClassVar[str] = ""

    train_batch_size: int | None = field(default=None, metadata=meta(gt=0))
    train_micro_batch_size_per_gpu: int | None = field(default=None, metadata=meta(gt=0))
    gradient_accumulation_steps: int | None = field(default=None, metadata=meta(gt=0))
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    fp16: FP16Config = field(default_factory=FP16Config)
    bf16: BF16Config = field(default_factory=BF16Config, metadata=meta(aliases=("bfloat16",)))
    zero_optimization: ZeroConfig = field(default_factory=ZeroConfig)
    gradient_clipping: float = field(
        default=0.0, metadata=meta(ge=0)
    )  # max global grad norm; 0 = no clipping
    steps_per_print: int = field(default=10, metadata=meta(gt=0))
    wall_clock_breakdown: bool = False
    prescale_gradients: bool = False
    gradient_predivide_factor: float = field(default=1.0, metadata=meta(gt=0))
    # None: communicate gradients in the compute dtype (DeepSpeed's default).
    communication_data_type: str | None = field(
        default=None, metadata=meta(choices=("fp32", "fp16", "bf16"), ignore_case=True)
    )
    data_types: DataTypesConfig = field(default_factory=DataTypesConfig)
    flops_profiler: FlopsProfilerConfig = field(default_factory=FlopsProfilerConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig
    )
    tensor_parallel: TensorParallelConfig = field(default_factory=TensorParallelConfig)
    elasticity: ElasticityConfig = field(default_factory=ElasticityConfig)
    zray: RunConfig = field(default_factory=RunConfig)

    # ---- reading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """Read a DeepSpeed-style config dict (plus an optional "zray" section). Its warnings come
        only once the whole config is valid (`held_warnings`)."""
        with held_warnings():
            cfg = build(cls, d)
        # What it was read from, "auto" values and all: `load(cfg, zray=...)` rebuilds from it
        # so that values derived from an overridden key follow it.
        object.__setattr__(cfg, "_source", copy.deepcopy(dict(d)))
        return cfg

    @classmethod
    def reread(cls, d: Mapping[str, Any]) -> Config:
        """`from_dict` of a config already read and reported on elsewhere (the `to_dict()` the
        driver sends its controller and workers): the same checks, without repeating its
        warnings. `to_dict` writes every key, so a key zray decides itself would otherwise be
        warned about on every worker though the user never set it."""
        with rereading():
            return cls.from_dict(d)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Config:
        """Read a JSON file, or YAML when the suffix is .yaml / .yml."""
        return cls.from_dict(cls.read_file(path))

    @classmethod
    def read_file(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The dict a JSON or YAML config file holds, unvalidated."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise ConfigError(
                "config", str(p), "a readable JSON or YAML file", e.strerror or type(e).__name__
            ) from None
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml  # lazily: only YAML users need PyYAML

            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(str(p), text[:80], "a YAML mapping", f"invalid YAML: {e}") from e
            raw = _yaml_numbers(raw)
        else:
            try:
                raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as e:
                line = e.doc.splitlines()[e.lineno - 1].strip() if e.doc else ""
                where = f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
                raise ConfigError(str(p), line, "a JSON object", where) from e
        return {} if raw is None else raw

    @classmethod
    def load(
        cls,
        x: Config | Mapping[str, Any] | str | os.PathLike[str] | None,
        zray: Mapping[str, Any] | None = None,
    ) -> Config:
        """A Config from a Config, a dict, a file path, or None (defaults).

        `zray` overrides keys of the "zray" run section before anything derived from them is
        resolved: `max_steps` also moves a scheduler's total_num_steps written as "auto". A
        Config built in Python (not read from a dict or file) keeps what it derived already.
        """
        if isinstance(x, Config):
            source = getattr(x, "_source", None)
            if not zray:
                return x
            if source is None:
                return replace(x, zray=replace(x.zray, **zray))
            x = source
        if x is None:
            raw: dict[str, Any] = {}
        elif isinstance(x, Mapping):
            raw = dict(x)
        elif isinstance(x, str | os.PathLike):
            raw = cls.read_file(x)
        else:
            allowed = "a zray.Config, a dict, a path to a .json/.yaml file, or None"
            raise ConfigError("config", x, allowed)
        if zray:
            raw["zray"] = {**(raw.get("zray") or {}), **zray}
        return cls.from_dict(raw) if raw or x is not None else cls()

    @classmethod
    def _prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        fields = set(cls.json_keys()) | {"bfloat16"}
        for k, v in raw.items():
            # zray's run settings written at the top level: point at the "zray" section.
            if k not in fields and k not in IGNORED_KEYS and k in RunConfig.json_keys():
                reason = f"unknown top-level key (did you mean 'zray.{k}'?)"
                raise ConfigError(k, v, "DeepSpeed's top-level keys and 'zray'", reason)
        if isinstance(raw.get("zero_optimization"), bool):
            # DeepSpeed's oldest spelling: "zero_optimization": true meant stage 1.
            warn_once("zero_optimization", "boolean form is deprecated; write {stage: N}")
            raw["zero_optimization"] = {"stage": 1 if raw["zero_optimization"] else 0}
        if "autotp_size" in raw:
            # DeepSpeed also reads a top-level autotp_size; fold it into tensor_parallel.
            tp = dict(coerce(raw.get("tensor_parallel") or {}, dict, "tensor_parallel"))
            for k in ("autotp_size", "tp_size", "tp"):
                if k in tp:
                    allowed = f"one of autotp_size and tensor_parallel.{k}"
                    raise ConfigError(
                        "autotp_size", raw["autotp_size"], allowed, "size given twice"
                    )
            tp["autotp_size"] = raw.pop("autotp_size")
            raw["tensor_parallel"] = tp
        return raw

    # ---- rules across sections ---------------------------------------------------------------

    def _check(self) -> None:
        if self.fp16.enabled and self.bf16.enabled:
            reason = "fp16.enabled and bf16.enabled are both true"
            raise ConfigError("fp16.enabled", True, "at most one of fp16 and bf16 enabled", reason)
        _check_batch_keys(
            self.train_batch_size,
            self.train_micro_batch_size_per_gpu,
            self.gradient_accumulation_steps,
        )
        if self.elasticity.enabled:
            self._check_elastic_batch_keys()
        if self.scheduler is not None:
            params = dict(self.scheduler.params)
            # "auto" values the scheduler could not resolve alone (see config.schedulers).
            if params.get("total_num_steps", 0) is None and self.zray.max_steps is not None:
                params["total_num_steps"] = self.zray.max_steps
            if params.get("warmup_max_lr", 0) is None and self.optimizer is not None:
                params["warmup_max_lr"] = self.optimizer.lr
            if params != self.scheduler.params:
                object.__setattr__(self, "scheduler", replace(self.scheduler, params=params))

    def _check_elastic_batch_keys(self) -> None:
        """DeepSpeed's rule: an enabled elasticity block owns the batch sizes, so batch keys
        beside it are an error unless ignore_non_elastic_batch_info says to override them."""
        given = {
            k: v
            for k, v in (
                (_TBS, self.train_batch_size),
                (_MICRO, self.train_micro_batch_size_per_gpu),
                (_GAS, self.gradient_accumulation_steps),
            )
            if v is not None  # "auto" reads as None: Hugging Face's placeholder is no conflict
        }
        if not given:
            return
        if not self.elasticity.ignore_non_elastic_batch_info:
            key, value = next(iter(given.items()))
            reason = (
                f"elasticity.enabled chooses {_TBS}, {_MICRO} and {_GAS} for each world size, "
                f"so {', '.join(given)} would not be used; remove them, or set "
                "elasticity.ignore_non_elastic_batch_info: true to have them overridden"
            )
            allowed = "no batch sizes outside the elasticity block while it is enabled"
            raise ConfigError(key, value, allowed, reason)
        for k in given:
            warn_once(k, "overridden by the elasticity plan (elasticity.enabled is true)")

    # ---- derived values ----------------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype forward and backward run in: fp16, bf16, or fp32 when neither is on."""
        if self.fp16.enabled:
            return torch.float16
        if self.bf16.enabled:
            return torch.bfloat16
        return torch.float32

    def resolve_batch(self, dp_world_size: int) -> BatchSizes:
        """Fill in the batch triple for `dp_world_size` data-parallel ranks, by DeepSpeed's rule:
        train_batch_size = micro * gas * dp_world_size. Any two give the third; train_batch_size
        alone means gas 1; micro alone means gas 1; none means micro 1, gas 1.

        With `elasticity.enabled` the triple comes from DeepSpeed's elastic plan over
        zray.num_workers instead (as DeepSpeed's own runtime does); a world size the plan skips
        raises with the reason. An elastic zray.num_workers alone does not change this rule:
        the controller hands each group `zray.config.batch.config_for_world(cfg, plan)`,
        which pins the triple that keeps the global batch.
        """
        w = dp_world_size
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ConfigError("dp_world_size", w, "an integer >= 1")
        if self.elasticity.enabled:
            return self._resolve_elastic(w)
        tbs, micro, gas = (
            self.train_batch_size,
            self.train_micro_batch_size_per_gpu,
            self.gradient_accumulation_steps,
        )
        _check_batch_keys(tbs, micro, gas)
        world = f"data-parallel world size ({w})"
        if tbs is not None and micro is not None and gas is not None:
            if tbs != micro * gas * w:
                reason = (
                    f"{_TBS} ({tbs}) != {_MICRO} ({micro}) * {_GAS} ({gas}) * {world} "
                    f"= {micro * gas * w}"
                )
                raise ConfigError(
                    _TBS, tbs, f"{_MICRO} * {_GAS} * data-parallel world size", reason
                )
        elif tbs is not None and micro is not None:
            gas = _divide(tbs, micro * w, f"{_MICRO} ({micro}) * {world}")
        elif tbs is not None and gas is not None:
            micro = _divide(tbs, gas * w, f"{_GAS} ({gas}) * {world}")
        elif tbs is not None:
            gas, micro = 1, _divide(tbs, w, world)
        else:
            micro = 1 if micro is None else micro
            gas = 1 if gas is None else gas
            tbs = micro * gas * w
        return BatchSizes(tbs, micro, gas)

    def _resolve_elastic(self, w: int) -> BatchSizes:
        run = self.zray
        plans, skipped = plan_sizes(self, run.min_workers, run.max_workers)
        if w in plans:
            return plans[w].batch_sizes
        reason = skipped.get(w, f"outside zray.num_workers {run.min_workers}..{run.max_workers}")
        allowed = f"a world size the elasticity plan keeps: {sorted(plans) or 'none'}"
        raise ConfigError("dp_world_size", w, allowed, reason)


def _check_batch_keys(tbs: int | None, micro: int | None, gas: int | None) -> None:
    """Batch rules that hold at any world size (resolve_batch checks the rest)."""
    if gas is not None and tbs is None and micro is None:
        raise ConfigError(
            _GAS,
            gas,
            f"{_GAS} together with {_TBS} or {_MICRO}",
            f"{_GAS} alone cannot give the batch size; also set {_TBS} or {_MICRO}",
        )
    if tbs is not None and micro is not None and gas is not None and tbs % (micro * gas):
        reason = (
            f"{_TBS} ({tbs}) is not divisible by {_MICRO} ({micro}) * {_GAS} ({gas}) "
            f"= {micro * gas}, so no data-parallel world size fits"
        )
        raise ConfigError(_TBS, tbs, f"a multiple of {_MICRO} * {_GAS}", reason)


def _divide(tbs: int, divisor: int, what: str) -> int:
    """tbs // divisor, or a ConfigError naming the values when it does not divide evenly."""
    if tbs % divisor:
        reason = f"{_TBS} ({tbs}) is not divisible by {what} = {divisor}"
        raise ConfigError(_TBS, tbs, f"a multiple of {divisor}", reason)
    return tbs // divisor


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON allows repeated keys and keeps the last; a repeated key in a config is a mistake that
    # would otherwise silently drop a setting (DeepSpeed refuses them too).
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(k, v, "each key once per object", "duplicate key")
        out[k] = v
    return out


def _yaml_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _yaml_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_numbers(v) for v in value]
    if isinstance(value, str) and _YAML_EXP_FLOAT.match(value):
        return float(value)
    return value

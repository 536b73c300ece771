"""Parameter names and defaults of DeepSpeed's learning-rate schedules ("scheduler.params").

Names and defaults follow `deepspeed/runtime/lr_schedules.py` (LRRangeTest is left out: zray
does not implement it, so it is refused as an unknown type). The schedules are implemented in
`zray.schedulers`, whose constructors' keyword defaults are the one place the defaults are
written: this module reads them from there, and says which params each type takes, their types,
bounds and what "auto" means, so a typo such as "warmup_num_step" fails at load time instead of
being dropped.

Declared as a table, not as dataclass sections like the rest of the config: which fields exist
depends on the value of `scheduler.type`, read first.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from zray import schedulers as _schedules
from zray.config.fields import (
    AUTO,
    bounds_text,
    check_bounds,
    check_choice,
    check_keys,
    coerce,
)
from zray.errors import NOT_GIVEN, ConfigError

# Stands for "no default: the key must be written".
_REQUIRED: Any = NOT_GIVEN


@dataclass(frozen=True)
class _Param:
    """One scheduler parameter: its type hint, bounds, and what "auto" reads as; its default is
    the schedule constructor's (filled in below)."""

    tp: Any
    default: Any = _REQUIRED
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    # "auto" reads as the default unless stated; None here means "derive it later" (see below).
    auto: Any = _REQUIRED

    @property
    def bounds(self) -> dict[str, float | None]:
        return {"ge": self.ge, "gt": self.gt, "le": self.le}

    def on_auto(self) -> Any:
        return self.default if self.auto is _REQUIRED else self.auto


# Learning rates and momenta may be one number or one per param group, as in DeepSpeed.
_PER_GROUP = float | tuple[float, ...]
_LR = _Param(_PER_GROUP, ge=0)
_STEPS = _Param(int, gt=0)
_WARMUP_TYPE = _Param(str, choices=("log", "linear"))
# total_num_steps "auto" (or null) is left None here; Config fills it from zray.max_steps.
_TOTAL_STEPS = _Param(int | None, gt=0, auto=None)

# type -> param name -> spec. warmup_max_lr None means "the optimizer's lr": DeepSpeed's WarmupLR
# defaults to it, and it is what Hugging Face's "auto" fills in; Config resolves it when the
# config has an optimizer section.
_DECLARED: dict[str, dict[str, _Param]] = {
    "OneCycle": {
        "cycle_min_lr": _Param(_PER_GROUP, ge=0),
        "cycle_max_lr": _Param(_PER_GROUP, ge=0),
        "decay_lr_rate": _Param(float, ge=0),
        "cycle_first_step_size": _Param(int, gt=0),
        "cycle_second_step_size": _Param(int | None, gt=0),
        "cycle_first_stair_count": _Param(int, ge=0),
        "cycle_second_stair_count": _Param(int | None, ge=0),
        "decay_step_size": _Param(int, ge=0),
        "cycle_momentum": _Param(bool),
        "cycle_min_mom": _Param(_PER_GROUP, ge=0, le=1),
        "cycle_max_mom": _Param(_PER_GROUP, ge=0, le=1),
        "decay_mom_rate": _Param(float, ge=0),
    },
    "WarmupLR": {
        "warmup_min_lr": _LR,
        "warmup_max_lr": _Param(_PER_GROUP | None, ge=0),
        "warmup_num_steps": _STEPS,
        "warmup_type": _WARMUP_TYPE,
    },
    "WarmupDecayLR": {
        "total_num_steps": _TOTAL_STEPS,
        "warmup_min_lr": _LR,
        "warmup_max_lr": _Param(_PER_GROUP | None, ge=0, auto=None),
        "warmup_num_steps": _STEPS,
        "warmup_type": _WARMUP_TYPE,
    },
    "WarmupCosineLR": {
        "total_num_steps": _TOTAL_STEPS,
        "warmup_min_ratio": _Param(float, ge=0, le=1),
        "warmup_num_steps": _STEPS,
        "cos_min_ratio": _Param(float, ge=0, le=1),
        "warmup_type": _WARMUP_TYPE,
    },
}


def _with_defaults(type_: str, params: dict[str, _Param]) -> dict[str, _Param]:
    """`params` with each default taken from schedule `type_`'s constructor."""
    signature = inspect.signature(_schedules.SCHEDULERS[type_].__init__).parameters
    missing = set(params) - set(signature)
    assert not missing, f"{type_} takes no {sorted(missing)}"  # the table follows the code
    out = {}
    for name, p in params.items():
        default = signature[name].default
        out[name] = replace(p, default=_REQUIRED if default is inspect.Parameter.empty else default)
    return out


SCHEDULER_TYPES: dict[str, dict[str, _Param]] = {
    t: _with_defaults(t, params) for t, params in _DECLARED.items()
}


def check_scheduler_params(type_: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Every param of schedule `type_`, checked, with defaults filled in; raise on a bad one."""
    schema = SCHEDULER_TYPES[type_]
    given = check_keys(params, "scheduler.params", schema)
    out: dict[str, Any] = {}
    for name, p in schema.items():
        key = f"scheduler.params.{name}"
        value = given.get(name, p.default)
        if isinstance(value, str) and value == AUTO:
            value = p.on_auto()
        if value is _REQUIRED:
            shown = given.get(name, NOT_GIVEN)
            what = "has no default for 'auto'" if name in given else "is missing"
            raise ConfigError(key, shown, _describe(p), f"required by {type_} and {what}")
        try:
            value = coerce(value, p.tp, key)
        except ConfigError as e:
            raise ConfigError(key, e.value, _describe(p)) from None
        if p.choices is not None:
            value = check_choice(value, p.choices, key)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, v in items:
            where = key if i is None else f"{key}[{i}]"
            check_bounds(v, p.bounds, where, _describe(p, bounds=False))
        out[name] = value
    return out


def _describe(p: _Param, bounds: bool = True) -> str:
    if p.choices is not None:
        return "one of " + ", ".join(p.choices)
    base = p.tp if p.tp in (int, float, str, bool) else typing.get_args(p.tp)[0]
    what = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[base]
    if typing.get_args(p.tp)[1:2] == (tuple[float, ...],):
        what = "a number or a list of numbers (one per param group)"
    return what + bounds_text(p.bounds) if bounds else what

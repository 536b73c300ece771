"""DeepSpeed's learning-rate schedules' parameters ("scheduler.params"), one section per type.

Names and defaults follow `deepspeed/runtime/lr_schedules.py` (LRRangeTest is left out: zray
does not implement it, so it is refused as an unknown type). The schedules are implemented in
`zray.schedulers`, whose constructors' keyword defaults are the one place the defaults are
written: each field below takes its default from there (`_from`; importing this module fails
if a field names a parameter the constructor does not take). Each section says which params its
type takes, their types, bounds and what "auto" means, so a typo such as "warmup_num_step"
fails at load time instead of being dropped.

Which section applies depends on the value of `scheduler.type`, read first by
`zray.config.sections.SchedulerConfig`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from zray import schedulers as _schedules
from zray.config.fields import Section, meta
from zray.errors import ConfigError

# Learning rates and momenta may be one number or one per param group, as in DeepSpeed.
PerGroup = float | tuple[float, ...]


def _from(type_: str) -> Callable[..., Any]:
    """A field maker for schedule `type_`: `p(name, **constraints)` is a dataclass field whose
    default is the constructor's default for `name` (none where the constructor requires it)."""
    signature = inspect.signature(_schedules.SCHEDULERS[type_].__init__).parameters

    def p(name: str, **constraints: Any) -> Any:
        assert name in signature, f"{type_} takes no {name}"  # the sections follow the code
        default = signature[name].default
        if default is inspect.Parameter.empty:
            return field(metadata=meta(**constraints))
        return field(default=default, metadata=meta(**constraints))

    return p


@dataclass(frozen=True, kw_only=True)
class ScheduleParams(Section):
    """Base of the per-type sections; `as_dict` is what the schedule's constructor takes."""

    _path: ClassVar[str] = "scheduler.params"
    type_name: ClassVar[str] = ""

    @classmethod
    def _missing(cls, name: str) -> str:
        return f"required by {cls.type_name} and is missing"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_onecycle = _from("OneCycle")


@dataclass(frozen=True, kw_only=True)
class OneCycleParams(ScheduleParams):
    type_name: ClassVar[str] = "OneCycle"

    cycle_min_lr: PerGroup = _onecycle("cycle_min_lr", ge=0)
    cycle_max_lr: PerGroup = _onecycle("cycle_max_lr", ge=0)
    decay_lr_rate: float = _onecycle("decay_lr_rate", ge=0)
    cycle_first_step_size: int = _onecycle("cycle_first_step_size", gt=0)
    cycle_second_step_size: int | None = _onecycle("cycle_second_step_size", gt=0)
    cycle_first_stair_count: int = _onecycle("cycle_first_stair_count", ge=0)
    cycle_second_stair_count: int | None = _onecycle("cycle_second_stair_count", ge=0)
    decay_step_size: int = _onecycle("decay_step_size", ge=0)
    cycle_momentum: bool = _onecycle("cycle_momentum")
    cycle_min_mom: PerGroup = _onecycle("cycle_min_mom", ge=0, le=1)
    cycle_max_mom: PerGroup = _onecycle("cycle_max_mom", ge=0, le=1)
    decay_mom_rate: float = _onecycle("decay_mom_rate", ge=0)


# warmup_max_lr None means "the optimizer's lr": DeepSpeed's WarmupLR defaults to it, and it is
# what Hugging Face's "auto" fills in; Config resolves it when the config has an optimizer
# section. total_num_steps "auto" (or null) is left None here; Config fills it from
# zray.max_steps.
_warmuplr = _from("WarmupLR")


@dataclass(frozen=True, kw_only=True)
class WarmupLRParams(ScheduleParams):
    type_name: ClassVar[str] = "WarmupLR"

    warmup_min_lr: PerGroup = _warmuplr("warmup_min_lr", ge=0)
    warmup_max_lr: PerGroup | None = _warmuplr("warmup_max_lr", ge=0)
    warmup_num_steps: int = _warmuplr("warmup_num_steps", gt=0)
    warmup_type: str = _warmuplr("warmup_type", choices=("log", "linear"))


_warmupdecaylr = _from("WarmupDecayLR")


@dataclass(frozen=True, kw_only=True)
class WarmupDecayLRParams(ScheduleParams):
    type_name: ClassVar[str] = "WarmupDecayLR"

    total_num_steps: int | None = _warmupdecaylr("total_num_steps", gt=0, auto=None)
    warmup_min_lr: PerGroup = _warmupdecaylr("warmup_min_lr", ge=0)
    warmup_max_lr: PerGroup | None = _warmupdecaylr("warmup_max_lr", ge=0, auto=None)
    warmup_num_steps: int = _warmupdecaylr("warmup_num_steps", gt=0)
    warmup_type: str = _warmupdecaylr("warmup_type", choices=("log", "linear"))


_warmupcosinelr = _from("WarmupCosineLR")


@dataclass(frozen=True, kw_only=True)
class WarmupCosineLRParams(ScheduleParams):
    type_name: ClassVar[str] = "WarmupCosineLR"

    total_num_steps: int | None = _warmupcosinelr("total_num_steps", gt=0, auto=None)
    warmup_min_ratio: float = _warmupcosinelr("warmup_min_ratio", ge=0, le=1)
    warmup_num_steps: int = _warmupcosinelr("warmup_num_steps", gt=0)
    cos_min_ratio: float = _warmupcosinelr("cos_min_ratio", ge=0, le=1)
    warmup_type: str = _warmupcosinelr("warmup_type", choices=("log", "linear"))

    def _check(self) -> None:
        # The schedule refuses this when built (on every worker); say so at load instead.
        warmup = max(2, self.warmup_num_steps)  # DeepSpeed's minimum
        if self.total_num_steps is not None and self.total_num_steps <= warmup:
            raise ConfigError(
                "scheduler.params.total_num_steps",
                self.total_num_steps,
                f"an integer > warmup_num_steps ({warmup})",
                "WarmupCosineLR's warmup must end before the schedule does (with 'auto' the "
                "total is zray.max_steps)",
            )


SCHEDULER_TYPES: dict[str, type[ScheduleParams]] = {
    cls.type_name: cls
    for cls in (OneCycleParams, WarmupLRParams, WarmupDecayLRParams, WarmupCosineLRParams)
}

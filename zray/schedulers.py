"""DeepSpeed's learning-rate schedules as torch ``LRScheduler``s.

WarmupLR, WarmupDecayLR, WarmupCosineLR and OneCycle take DeepSpeed's parameter names and
defaults (the ``"scheduler": {"type": ..., "params": {...}}`` block of a DeepSpeed JSON goes to
``build_scheduler`` unchanged) and compute DeepSpeed's formulas, written here from
``deepspeed/runtime/lr_schedules.py`` and its documentation.

[Note: step convention]
A torch scheduler applies the value for step 0 when it is built and the value for step k after
its k-th ``step()``; ``last_epoch`` counts those steps. Here the value at ``last_epoch == k``
equals DeepSpeed's value at ``last_batch_iteration == k``, for every k >= 0. What differs is
the start: DeepSpeed's constructor leaves ``last_batch_iteration = -1`` and writes a special
"not started" value (warmup_min_lr; OneCycle's cycle_min_lr / cycle_min_mom; 0.0 for
WarmupCosineLR), so DeepSpeed's first optimizer step runs at that value and its k-th at
f(k - 2). Here the first optimizer step runs at f(0) and the k-th at f(k - 1), as torch users
expect. For the warmup schedules f(-1) == f(0) == warmup_min_lr, so the only difference is
that DeepSpeed spends one extra step at the minimum.

Deliberate deviations, each where DeepSpeed's behaviour is a silent surprise:
- An unknown ``warmup_type`` raises ValueError (DeepSpeed logs a warning and uses "log").
- WarmupCosineLR holds cos_min_ratio after ``total_num_steps`` (DeepSpeed's cosine keeps
  going and the rate climbs back up); it agrees with DeepSpeed for k <= total_num_steps - 1,
  where the schedule ends. It needs total_num_steps > warmup_num_steps (DeepSpeed divides by
  zero at equality).
- OneCycle's momentum keeps each group's own Adam beta2 (DeepSpeed overwrites it with 0.99)
  and also cycles SGD's ``momentum`` (DeepSpeed only handles ``betas``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

WARMUP_LOG_RATE = "log"
WARMUP_LINEAR_RATE = "linear"
_WARMUP_TYPES = (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE)

FloatOrList = float | Sequence[float]


def _per_group(value: FloatOrList, optimizer: torch.optim.Optimizer, name: str) -> list[float]:
    """One value per param group: a scalar is broadcast, a list must match the group count."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"{name}: expected one value per param group ({n}), got {len(value)}: {value!r}"
            )
        return [float(v) for v in value]
    return [float(value)] * n


def _check_warmup_type(warmup_type: str) -> str:
    if warmup_type not in _WARMUP_TYPES:
        raise ValueError(f"warmup_type must be one of {list(_WARMUP_TYPES)}, got {warmup_type!r}")
    return warmup_type


def _warmup_fraction(k: int, warmup_num_steps: int, warmup_type: str) -> float:
    """DeepSpeed's warmup curve at step k < warmup_num_steps, rising from 0 towards 1.

    log: ln(k + 1) / ln(W), reaching 1 at k = W - 1; linear: k / W, reaching (W-1)/W.
    """
    if warmup_type == WARMUP_LOG_RATE:
        return math.log(k + 1) / math.log(warmup_num_steps)
    return k / warmup_num_steps


class _ClosedFormScheduler(LRScheduler):
    """An LRScheduler whose rates are a pure function of the step count ``last_epoch``.

    Subclasses set their fields *before* calling ``super().__init__`` (which applies step 0)
    and implement ``_lrs_at``. Being a pure function of ``last_epoch`` is what makes
    ``state_dict`` / ``load_state_dict`` resume the exact sequence.
    """

    def _lrs_at(self, k: int) -> list[float]:
        raise NotImplementedError

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return self._lrs_at(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self._lrs_at(self.last_epoch)


class WarmupLR(_ClosedFormScheduler):
    """Warm up from warmup_min_lr to warmup_max_lr over warmup_num_steps, then hold.

    lr(k) = min + (max - min) * gamma(k), gamma = warmup fraction for k < W, else 1, with
    W = max(2, warmup_num_steps). warmup_max_lr defaults to the optimizer's lr (group 0), as in
    current DeepSpeed. ``last_batch_iteration`` is torch's ``last_epoch`` (-1: start fresh).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_min_lr: FloatOrList = 0.0,
        warmup_max_lr: FloatOrList | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = WARMUP_LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        if warmup_max_lr is None:
            warmup_max_lr = float(optimizer.param_groups[0]["lr"])
        self.min_lrs = _per_group(warmup_min_lr, optimizer, "warmup_min_lr")
        self.max_lrs = _per_group(warmup_max_lr, optimizer, "warmup_max_lr")
        # DeepSpeed clamps to 2 so that ln(W) > 0 in the log curve.
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.warmup_type = _check_warmup_type(warmup_type)
        super().__init__(optimizer, last_batch_iteration)

    def _gamma(self, k: int) -> float:
        if k < self.warmup_num_steps:
            return _warmup_fraction(k, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def _lrs_at(self, k: int) -> list[float]:
        gamma = self._gamma(k)
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs, strict=True)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay back to warmup_min_lr, reached at total_num_steps.

    After warmup gamma(k) = max(0, (T - k) / max(1, T - W)): 1 at k = W, 0 from k = T on.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_lr: FloatOrList = 0.0,
        warmup_max_lr: FloatOrList = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = WARMUP_LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        self.total_num_steps = int(total_num_steps)
        if self.total_num_steps < max(2, int(warmup_num_steps)):
            warnings.warn(
                f"WarmupDecayLR: total_num_steps {total_num_steps} is less than "
                f"warmup_num_steps {warmup_num_steps}",
                stacklevel=2,
            )
        super().__init__(
            optimizer,
            warmup_min_lr=warmup_min_lr,
            warmup_max_lr=warmup_max_lr,
            warmup_num_steps=warmup_num_steps,
            warmup_type=warmup_type,
            last_batch_iteration=last_batch_iteration,
        )

    def _gamma(self, k: int) -> float:
        if k < self.warmup_num_steps:
            return _warmup_fraction(k, self.warmup_num_steps, self.warmup_type)
        decay_span = max(1.0, float(self.total_num_steps - self.warmup_num_steps))
        return max(0.0, (self.total_num_steps - k) / decay_span)


class WarmupCosineLR(_ClosedFormScheduler):
    """Warm up a *ratio* of each group's own lr, then cosine-decay it to cos_min_ratio.

    ratio(k) = wmin + (1 - wmin) * warmup fraction for k < W; after that, with
    p = min(1, (k - W + 1) / (T - W)): ratio = max(0, cmin + (1 - cmin) * (1 + cos(pi p)) / 2).
    lr = ratio * the group's initial lr (torch's ``initial_lr``, DeepSpeed's ``org_lrs``).
    The cosine reaches cos_min_ratio at k = T - 1.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = WARMUP_LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.cos_min_ratio = float(cos_min_ratio)
        self.warmup_type = _check_warmup_type(warmup_type)
        if self.total_num_steps <= self.warmup_num_steps:
            raise ValueError(
                f"WarmupCosineLR: total_num_steps ({total_num_steps}) must exceed "
                f"warmup_num_steps ({self.warmup_num_steps}, after DeepSpeed's minimum of 2)"
            )
        super().__init__(optimizer, last_batch_iteration)

    def _ratio(self, k: int) -> float:
        if k < self.warmup_num_steps:
            frac = _warmup_fraction(k, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * frac
        progress = min(
            1.0, (k - self.warmup_num_steps + 1) / (self.total_num_steps - self.warmup_num_steps)
        )
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def _lrs_at(self, k: int) -> list[float]:
        ratio = self._ratio(k)
        return [float(base) * ratio for base in self.base_lrs]


class OneCycle(_ClosedFormScheduler):
    """1Cycle (Smith, arXiv:1803.09820): lr up then down between cycle_min_lr and cycle_max_lr,
    momentum the opposite way, then an optional decay phase.

    With S = first + second step size, r = first / S and x = (k + 1) / S (DeepSpeed evaluates
    the cycle one step ahead): for k < S, scale = x / r while x <= r, else (x - 1) / (r - 1);
    lr = min + (max - min) * scale and momentum = max_mom - (max_mom - min_mom) * scale.
    x wraps to 0 at k = S - 1, so the cycle ends at cycle_min_lr. For k >= S, with
    i = (k - S + 1) / decay_step_size: lr = cycle_min_lr / (1 + decay_lr_rate * i) and
    momentum = cycle_max_mom * (1 + decay_mom_rate * i); a zero decay_step_size or rate holds
    cycle_min_lr / cycle_max_mom. The stair counts are accepted for config compatibility and,
    as in DeepSpeed, have no effect.

    Momentum is Adam's betas[0] (beta2 kept) or SGD's ``momentum``; for an optimizer with
    neither, cycle_momentum is turned off with a warning (as DeepSpeed does).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cycle_min_lr: FloatOrList,
        cycle_max_lr: FloatOrList,
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: int = 2000,
        cycle_second_step_size: int | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: int = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: FloatOrList = 0.8,
        cycle_max_mom: FloatOrList = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
    ) -> None:
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        if first <= 0 or second <= 0:
            raise ValueError(
                f"OneCycle: cycle_first_step_size ({cycle_first_step_size}) and "
                f"cycle_second_step_size ({cycle_second_step_size}) must be positive"
            )
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = (
            cycle_first_stair_count
            if cycle_second_stair_count is None
            else cycle_second_stair_count
        )
        self.decay_step_size = decay_step_size
        self.min_lrs = _per_group(cycle_min_lr, optimizer, "cycle_min_lr")
        self.max_lrs = _per_group(cycle_max_lr, optimizer, "cycle_max_lr")
        self.decay_lr_rate = float(decay_lr_rate)
        self.min_moms = _per_group(cycle_min_mom, optimizer, "cycle_min_mom")
        self.max_moms = _per_group(cycle_max_mom, optimizer, "cycle_max_mom")
        self.decay_mom_rate = float(decay_mom_rate)
        no_decay = math.isclose(decay_step_size, 0)
        self.skip_lr_decay = no_decay or math.isclose(self.decay_lr_rate, 0)
        self.skip_mom_decay = no_decay or math.isclose(self.decay_mom_rate, 0)

        self.momentum_key: str | None = None
        if cycle_momentum:
            if "betas" in optimizer.defaults:
                self.momentum_key = "betas"
            elif "momentum" in optimizer.defaults:
                self.momentum_key = "momentum"
            else:
                warnings.warn(
                    f"OneCycle: cycle_momentum is disabled because {type(optimizer).__name__} "
                    "has neither 'betas' nor 'momentum' in its defaults",
                    stacklevel=2,
                )
        self.cycle_momentum = self.momentum_key is not None
        # Applies step 0's lr, and (through our step()) its momentum.
        super().__init__(optimizer, last_batch_iteration)

    def _scale(self, k: int) -> float:
        # Position within the current cycle, in [0, 1); written as DeepSpeed evaluates it
        # (1 + i/S - floor(1 + i/S)) so the floats agree to the last bit.
        x = 1.0 + (k + 1) / self.total_size - math.floor(1.0 + (k + 1) / self.total_size)
        if x <= self.step_ratio:
            return x / self.step_ratio
        return (x - 1.0) / (self.step_ratio - 1.0)

    def _decay_interval(self, k: int) -> float:
        return (k - self.total_size + 1) / self.decay_step_size

    def _lrs_at(self, k: int) -> list[float]:
        if k < self.total_size:
            scale = self._scale(k)
            return [
                lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs, strict=True)
            ]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        factor = 1.0 + self.decay_lr_rate * self._decay_interval(k)
        return [lo / factor for lo in self.min_lrs]

    def momentums_at(self, k: int) -> list[float]:
        """Momentum (beta1) per param group at step k."""
        if k < self.total_size:
            scale = self._scale(k)
            return [
                hi - (hi - lo) * scale for lo, hi in zip(self.min_moms, self.max_moms, strict=True)
            ]
        if self.skip_mom_decay:
            return list(self.max_moms)
        factor = 1.0 + self.decay_mom_rate * self._decay_interval(k)
        return [hi * factor for hi in self.max_moms]

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if not self.cycle_momentum:
            return
        moms = self.momentums_at(self.last_epoch)
        for group, mom in zip(self.optimizer.param_groups, moms, strict=True):
            if self.momentum_key == "betas":
                group["betas"] = (mom, *tuple(group["betas"])[1:])
            else:
                group["momentum"] = mom


SCHEDULERS: dict[str, type[LRScheduler]] = {
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
    "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle,
}


def build_scheduler(
    optimizer: torch.optim.Optimizer, type: str, params: dict[str, object]
) -> LRScheduler:
    """Build a schedule from a DeepSpeed ``scheduler`` config block: ``type`` and ``params``.

    Raises ValueError for an unknown type, an unknown parameter name, or a missing required one.
    """
    cls = SCHEDULERS.get(type)
    if cls is None:
        raise ValueError(f"scheduler.type: unknown scheduler {type!r}; allowed: {list(SCHEDULERS)}")
    sig = inspect.signature(cls.__init__)
    accepted = [name for name in sig.parameters if name not in ("self", "optimizer")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"scheduler.params: unknown parameter(s) {unknown} for {type}; allowed: {accepted}"
        )
    required = [
        name
        for name in accepted
        if sig.parameters[name].default is inspect.Parameter.empty and name not in params
    ]
    if required:
        raise ValueError(f"scheduler.params: {type} requires {required}, got {sorted(params)}")
    return cls(optimizer, **params)  # type: ignore[arg-type]

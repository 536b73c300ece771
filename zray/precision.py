"""Mixed precision: loss scaling for fp16, and the dtypes each buffer uses.

bf16 has fp32's exponent range and needs no loss scaling; fp16 does. The dynamic scaler follows
DeepSpeed's rule, so a DeepSpeed fp16 config behaves the same here:
- on overflow (a non-finite gradient anywhere, on any rank) the step is skipped; the scale is
  halved only once `hysteresis` overflows have been absorbed since the last reset, and never
  below `min_loss_scale`; at the minimum, a further overflow is an error (training diverged);
- once `loss_scale_window` steps have passed without overflow (counted as DeepSpeed counts its
  "stable interval", which excludes the first step after an overflow) the scale doubles and the
  hysteresis budget is restored (with `consecutive_hysteresis`, after every good step instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from zray.errors import ZrayError


class LossScaleError(ZrayError):
    """Overflow at the minimum loss scale: fp16 training cannot continue."""


@dataclass
class LossScaler:
    """Static scaler (dynamic=False) or DeepSpeed-style dynamic scaler with hysteresis."""

    scale: float = 1.0
    dynamic: bool = False
    window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_scale: float = 1.0
    factor: float = 2.0
    # state
    iteration: int = 0
    last_overflow_iter: int = -1
    hysteresis_left: int = 2

    @classmethod
    def disabled(cls) -> LossScaler:
        return cls(scale=1.0, dynamic=False)

    @classmethod
    def from_fp16_config(cls, fp16: object) -> LossScaler:
        """From `Config.fp16`: loss_scale 0 means dynamic starting at 2**initial_scale_power."""
        static = float(fp16.loss_scale)  # type: ignore[attr-defined]
        if static > 0:
            return cls(scale=static, dynamic=False)
        hyst = int(fp16.hysteresis)  # type: ignore[attr-defined]
        return cls(
            scale=2.0 ** int(fp16.initial_scale_power),  # type: ignore[attr-defined]
            dynamic=True,
            window=int(fp16.loss_scale_window),  # type: ignore[attr-defined]
            hysteresis=hyst,
            consecutive_hysteresis=bool(fp16.consecutive_hysteresis),  # type: ignore[attr-defined]
            min_scale=float(fp16.min_loss_scale),  # type: ignore[attr-defined]
            hysteresis_left=hyst,
        )

    def update(self, overflow: bool) -> None:
        """Advance one optimizer step, given whether any rank saw a non-finite gradient."""
        if not self.dynamic:
            self.iteration += 1
            return
        if overflow:
            if self.hysteresis == 1 or self.hysteresis_left == 1:
                if self.scale <= self.min_scale:
                    raise LossScaleError(
                        f"fp16 gradient overflow at the minimum loss scale "
                        f"(fp16.min_loss_scale = {self.min_scale}) on step {self.iteration}: "
                        "training has diverged; lower the learning rate or use bf16"
                    )
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow_iter = self.iteration
        else:
            if self.consecutive_hysteresis:
                self.hysteresis_left = self.hysteresis
            # Steps without overflow since the last one (DeepSpeed's "stable interval").
            stable = self.iteration - self.last_overflow_iter - 1
            if stable > 0 and stable % self.window == 0:
                if not self.consecutive_hysteresis:
                    self.hysteresis_left = self.hysteresis
                self.scale *= self.factor
        self.iteration += 1

    def state_dict(self) -> dict[str, float | int | bool]:
        return {
            "scale": self.scale,
            "iteration": self.iteration,
            "last_overflow_iter": self.last_overflow_iter,
            "hysteresis_left": self.hysteresis_left,
        }

    def load_state_dict(self, state: dict[str, float | int | bool]) -> None:
        self.scale = float(state["scale"])
        self.iteration = int(state["iteration"])
        self.last_overflow_iter = int(state["last_overflow_iter"])
        self.hysteresis_left = int(state["hysteresis_left"])

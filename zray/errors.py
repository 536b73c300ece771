"""zray's exception and warning types.

Every user-facing error zray raises on purpose derives from `ZrayError`, so callers can catch
zray's own failures apart from bugs. Configuration mistakes raise `ConfigError`, which is also a
`ValueError` (a bad config is a bad value) and carries the key, the value and what is allowed as
attributes, so a driver can merge the same error reported by many ranks into one line.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NOT_GIVEN", "ConfigError", "NonFiniteError", "ZrayConfigWarning", "ZrayError"]

# Longest value repr an error message shows; a whole mis-nested section would drown the message.
_MAX_VALUE_REPR = 160


class _NotGiven:
    """Marks a required key that is absent, so the message says so instead of 'got None'."""

    def __repr__(self) -> str:
        return "<not given>"

    def __reduce__(self) -> str:
        # Pickle as the module-level singleton: errors cross process boundaries (Ray, spawn).
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()


class ZrayError(Exception):
    """Base class of the errors zray raises for user-facing failures."""


class ZrayConfigWarning(UserWarning):
    """A config key zray reads but ignores, or a deprecated DeepSpeed spelling."""


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > _MAX_VALUE_REPR:
        text = text[: _MAX_VALUE_REPR - 3] + "..."
    return text


class ConfigError(ZrayError, ValueError):
    """A config value or key that zray cannot accept.

    Attributes:
        key: dotted path of the offending key, as written in the DeepSpeed JSON
            (e.g. ``zero_optimization.stage``).
        value: the value received (``NOT_GIVEN`` when a required key is missing).
        allowed: human-readable description of what would be accepted.
        reason: optional extra explanation (a typo suggestion, a conflicting key).

    The message reads ``<key>: [<reason>; ]got <value>; allowed: <allowed>``.
    """

    def __init__(self, key: str, value: object, allowed: str, reason: str = "") -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.reason = reason
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [f"{self.key}: "]
        if self.reason:
            parts.append(f"{self.reason}; ")
        if self.value is not NOT_GIVEN:
            parts.append(f"got {_show(self.value)}; ")
        parts.append(f"allowed: {self.allowed}")
        return "".join(parts)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, object, str, str]]:
        # Exception's default pickling replays args=(message,), which does not match __init__.
        return (type(self), (self.key, self.value, self.allowed, self.reason))


class NonFiniteError(ZrayError):
    """A step's loss or gradient norm was not finite (bf16 / fp32 training, nothing set to skip
    such steps).

    Attributes: the step, what was not finite ("loss" or "gradient norm"), the ranks whose own
    value was not finite, and the global value. Raised on every rank at the same step; the run
    stops rather than train on, and is not restarted (the same data would do it again).
    """

    def __init__(self, step: int, what: str, ranks: list[int], value: float) -> None:
        self.step, self.what, self.ranks, self.value = step, what, ranks, value
        where = f"rank(s) {ranks}" if ranks else "the sum over ranks"
        super().__init__(
            f"step {step}: the {what} is {value} on {where}; training stopped before taking "
            "another checkpoint (the last committed one is before this step). Causes: a learning "
            "rate too high, bad input rows, a model bug. fp16 skips such steps; bf16 and fp32 "
            "do with zray.skip_nonfinite_steps (or bf16.check_grad_overflow) set to true"
        )

    def __reduce__(self) -> tuple[type[NonFiniteError], tuple[int, str, list[int], float]]:
        return (type(self), (self.step, self.what, self.ranks, self.value))

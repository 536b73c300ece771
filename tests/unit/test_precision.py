"""Tests for zray.precision.LossScaler against DeepSpeed's DynamicLossScaler.update_scale.

Expected scale sequences are derived by hand from deepspeed/runtime/fp16/loss_scaler.py and
written out literally. The rule there, per step:
- overflow: if delayed_shift (hysteresis) == 1 or cur_hysteresis == 1, raise at min_scale, else
  cur_scale = max(cur_scale / 2, min_scale); otherwise cur_hysteresis -= 1. In both cases
  last_overflow_iter = cur_iter. cur_hysteresis is NOT restored by a scale cut.
- no overflow: with consecutive_hysteresis, cur_hysteresis = delayed_shift; then at the window
  boundary the scale doubles (and, without consecutive_hysteresis, hysteresis is restored).
- cur_iter += 1.

The window boundary moved upstream: DeepSpeed long used
`(cur_iter - last_overflow_iter) % scale_window == 0`; current DeepSpeed (deepspeedai/DeepSpeed
master) uses `stable_interval = cur_iter - last_overflow_iter - 1` and grows only when
`stable_interval > 0 and stable_interval % scale_window == 0`, i.e. on the first good step after
`scale_window` good steps. zray follows the current rule; the sequences below pin it.
"""

from __future__ import annotations

import itertools

import pytest

from zray import Config
from zray.errors import ZrayError
from zray.precision import LossScaleError, LossScaler


def _dynamic(
    scale: float = 256.0,
    hysteresis: int = 2,
    window: int = 1000,
    consecutive: bool = False,
    min_scale: float = 1.0,
) -> LossScaler:
    return LossScaler(
        scale=scale,
        dynamic=True,
        window=window,
        hysteresis=hysteresis,
        consecutive_hysteresis=consecutive,
        min_scale=min_scale,
        hysteresis_left=hysteresis,
    )


def _run(scaler: LossScaler, pattern: str) -> list[float]:
    """Apply steps ('O' overflow, 'G' good); the scale after each."""
    out = []
    for c in pattern:
        scaler.update(c == "O")
        out.append(scaler.scale)
    return out


# ---- hysteresis ------------------------------------------------------------------------------


def test_hysteresis_1_halves_on_every_overflow() -> None:
    s = _dynamic(hysteresis=1)
    assert _run(s, "OOOG") == [128.0, 64.0, 32.0, 32.0]
    assert s.iteration == 4
    assert s.last_overflow_iter == 2


def test_hysteresis_2_absorbs_one_overflow_then_halves_each_time() -> None:
    s = _dynamic(hysteresis=2)
    # A scale cut does not restore the budget, and neither does a good step (window 1000).
    assert _run(s, "OOOGO") == [256.0, 128.0, 64.0, 64.0, 32.0]
    assert s.hysteresis_left == 1
    assert s.last_overflow_iter == 4


def test_hysteresis_3() -> None:
    # DeepSpeed's own test (TestZeroStage0Hysteresis.test_hysteresis) expects these four.
    s = _dynamic(hysteresis=3)
    assert _run(s, "OOOO") == [256.0, 256.0, 128.0, 64.0]
    assert s.hysteresis_left == 1


def test_hysteresis_budget_is_counted_down() -> None:
    s = _dynamic(hysteresis=3)
    s.update(True)
    assert (s.scale, s.hysteresis_left) == (256.0, 2)
    s.update(True)
    assert (s.scale, s.hysteresis_left) == (256.0, 1)


def test_consecutive_hysteresis_refills_after_every_good_step() -> None:
    s = _dynamic(hysteresis=2, consecutive=True)
    assert _run(s, "OGOGOGOG") == [256.0] * 8
    assert s.hysteresis_left == 2
    # Two overflows in a row still cut the scale.
    assert _run(s, "OO") == [256.0, 128.0]


def test_without_consecutive_hysteresis_isolated_overflows_add_up() -> None:
    s = _dynamic(hysteresis=2, consecutive=False)
    assert _run(s, "OGOG") == [256.0, 256.0, 128.0, 128.0]


def test_consecutive_hysteresis_3() -> None:
    s = _dynamic(hysteresis=3, consecutive=True)
    assert _run(s, "OOGOOO") == [256.0, 256.0, 256.0, 256.0, 256.0, 128.0]
    s = _dynamic(hysteresis=3, consecutive=False)
    assert _run(s, "OOGOOO") == [256.0, 256.0, 256.0, 128.0, 64.0, 32.0]


# ---- window growth ---------------------------------------------------------------------------


def test_window_growth_holds_for_window_minus_one_steps_and_doubles_by_window_plus_one() -> None:
    # Holds under both DeepSpeed boundaries: no growth in the first window - 1 good steps
    # after an overflow, exactly one doubling within window + 1.
    s = _dynamic(hysteresis=1, window=4)
    assert _run(s, "O") == [128.0]
    assert _run(s, "GGG") == [128.0, 128.0, 128.0]
    assert _run(s, "GG")[-1] == 256.0


def test_window_growth_repeats_every_window() -> None:
    s = _dynamic(hysteresis=1, window=3)
    scales = _run(s, "G" * 30)
    # 30 good steps from the start: 9 or 10 doublings by either boundary, never more often.
    assert scales[-1] in (256.0 * 2**9, 256.0 * 2**10)
    for a, b in itertools.pairwise(scales):
        assert b in (a, 2 * a)
    grow_steps = [i for i in range(1, 30) if scales[i] != scales[i - 1]]
    assert all(b - a == 3 for a, b in itertools.pairwise(grow_steps))


def test_window_growth_restores_hysteresis() -> None:
    s = _dynamic(hysteresis=2, window=2)
    _run(s, "O")
    assert s.hysteresis_left == 1
    # Three good steps pass a window boundary under either rule: the scale doubles and the
    # hysteresis budget is refilled, so the next overflow is absorbed again.
    assert _run(s, "GGG")[-1] == 512.0
    assert s.hysteresis_left == 2
    assert _run(s, "O") == [512.0]
    assert s.hysteresis_left == 1


def test_window_growth_from_start_current_deepspeed() -> None:
    # window 3, no overflow yet (last_overflow_iter -1): stable_interval == cur_iter, so the
    # scale doubles at cur_iter 3 and 6 (the 4th and 7th good steps).
    s = _dynamic(hysteresis=2, window=3)
    assert _run(s, "GGGGGGG") == [256.0, 256.0, 256.0, 512.0, 512.0, 512.0, 1024.0]


def test_window_growth_after_overflow_current_deepspeed() -> None:
    # Overflow at cur_iter 0; stable_interval at cur_iter 1..4 is 0, 1, 2, 3 -> grow at 4.
    s = _dynamic(hysteresis=1, window=3)
    assert _run(s, "OGGGG") == [128.0, 128.0, 128.0, 128.0, 256.0]


# ---- min scale -------------------------------------------------------------------------------


def test_min_scale_floor_then_error() -> None:
    s = _dynamic(scale=3.0, hysteresis=1, min_scale=2.0)
    assert _run(s, "O") == [2.0]  # max(3 / 2, 2)
    with pytest.raises(LossScaleError) as exc:
        s.update(True)
    assert isinstance(exc.value, ZrayError)
    assert "fp16.min_loss_scale = 2.0" in str(exc.value)
    assert "step 1" in str(exc.value)
    assert s.scale == 2.0


def test_all_overflow_reaches_min_and_raises() -> None:
    # DeepSpeed's test_all_overflow shape: 2**4, hysteresis 1, min 1 -> 8, 4, 2, 1, then error.
    s = _dynamic(scale=16.0, hysteresis=1, min_scale=1.0)
    assert _run(s, "OOOO") == [8.0, 4.0, 2.0, 1.0]
    with pytest.raises(LossScaleError):
        s.update(True)


def test_min_scale_with_hysteresis_absorbs_before_raising() -> None:
    s = _dynamic(scale=2.0, hysteresis=2, min_scale=2.0)
    assert _run(s, "O") == [2.0]
    with pytest.raises(LossScaleError):
        s.update(True)


def test_growth_from_min_scale_lifts_the_floor_condition() -> None:
    s = _dynamic(scale=1.0, hysteresis=1, window=2, min_scale=1.0)
    assert _run(s, "GGG")[-1] == 2.0  # one window boundary passed under either rule
    assert _run(s, "O") == [1.0]  # above the floor again: an overflow halves, no error


# ---- static scaler ---------------------------------------------------------------------------


def test_static_scaler_never_changes() -> None:
    s = LossScaler(scale=128.0, dynamic=False)
    assert _run(s, "OOOOGGGGOO") == [128.0] * 10
    assert s.iteration == 10


def test_disabled_scaler() -> None:
    s = LossScaler.disabled()
    assert (s.scale, s.dynamic) == (1.0, False)
    assert _run(s, "OG") == [1.0, 1.0]


# ---- state -----------------------------------------------------------------------------------


def test_state_dict_values_and_round_trip() -> None:
    s = _dynamic(hysteresis=3)
    _run(s, "OG")
    state = s.state_dict()
    assert state == {"scale": 256.0, "iteration": 2, "last_overflow_iter": 0, "hysteresis_left": 2}
    restored = _dynamic(hysteresis=3)
    restored.load_state_dict(state)
    assert (restored.scale, restored.iteration, restored.last_overflow_iter) == (256.0, 2, 0)
    # One overflow is already spent: the second absorbs, the third halves (a fresh scaler
    # would absorb two).
    assert _run(restored, "OO") == [256.0, 128.0]


def test_load_state_dict_coerces_types() -> None:
    s = _dynamic()
    s.load_state_dict(
        {"scale": 1024, "iteration": 7.0, "last_overflow_iter": 3.0, "hysteresis_left": 1.0}
    )
    assert s.scale == 1024.0 and isinstance(s.scale, float)
    assert (s.iteration, s.last_overflow_iter, s.hysteresis_left) == (7, 3, 1)
    assert isinstance(s.iteration, int)


# ---- from config -----------------------------------------------------------------------------


def test_from_fp16_config_dynamic() -> None:
    fp16 = Config.from_dict(
        {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "initial_scale_power": 12,
                "loss_scale_window": 50,
                "hysteresis": 3,
                "consecutive_hysteresis": True,
                "min_loss_scale": 0.5,
            }
        }
    ).fp16
    s = LossScaler.from_fp16_config(fp16)
    assert s.dynamic is True
    assert s.scale == 4096.0
    assert (s.window, s.hysteresis, s.hysteresis_left) == (50, 3, 3)
    assert s.consecutive_hysteresis is True
    assert s.min_scale == 0.5
    assert s.factor == 2.0
    assert (s.iteration, s.last_overflow_iter) == (0, -1)


def test_from_fp16_config_deepspeed_defaults() -> None:
    s = LossScaler.from_fp16_config(Config.from_dict({"fp16": {"enabled": True}}).fp16)
    assert s.dynamic is True
    assert s.scale == 65536.0  # 2 ** 16
    assert (s.window, s.hysteresis, s.hysteresis_left) == (1000, 2, 2)
    assert s.consecutive_hysteresis is False
    assert s.min_scale == 1.0


def test_from_fp16_config_static() -> None:
    fp16 = Config.from_dict({"fp16": {"enabled": True, "loss_scale": 128}}).fp16
    s = LossScaler.from_fp16_config(fp16)
    assert (s.scale, s.dynamic) == (128.0, False)
    assert _run(s, "OO") == [128.0, 128.0]


def test_from_fp16_config_hysteresis_1_sequence() -> None:
    # DeepSpeed's test_some_overflow config: 2**8, window 2, hysteresis 1.
    fp16 = Config.from_dict(
        {
            "fp16": {
                "enabled": True,
                "initial_scale_power": 8,
                "loss_scale_window": 2,
                "hysteresis": 1,
            }
        }
    ).fp16
    s = LossScaler.from_fp16_config(fp16)
    assert _run(s, "OO") == [128.0, 64.0]
    assert _run(s, "GGG")[-1] == 128.0  # window + 1 good steps: doubled once
    assert _run(s, "O") == [64.0]

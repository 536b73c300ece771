"""The driver's live line and FitResult's steady-state rate (no Ray needed)."""

from __future__ import annotations

import io
import math

import pytest

from zray.cluster.controller import RunStatus
from zray.cluster.state import RunState
from zray.fit import FitResult, ProgressLine


def test_live_line_shows_recent_rate_mfu_and_copy_interval() -> None:
    st = RunStatus(RunState.RUNNING, step=120, loss=3.21, tokens_per_s=129_400.0, world_size=2)
    st.mfu, st.copy_interval = 0.412, 12.0
    line = ProgressLine(1000, io.StringIO()).format(st)
    assert "step 120/1000" in line and "loss 3.2100" in line and "tokens/s 129,400" in line
    assert "MFU 41.2%" in line and "copy every 12 steps" in line and "world 2" in line
    st.mfu, st.copy_interval, st.loss = None, 0.0, None
    line = ProgressLine(None, io.StringIO()).format(st)
    assert "MFU" not in line and "copy every" not in line and "loss -" in line


def test_steady_rate_leaves_out_the_warm_up_steps() -> None:
    # Steps 1-3 slow (warm-up), then one step every 0.5 s; 1000 tokens a step.
    times = [(1, 5.0), (2, 8.0), (3, 9.0)] + [(s, 9.0 + 0.5 * (s - 3)) for s in range(4, 14)]
    r = FitResult(steps=13, world_size=1, step_times=times)
    assert r.steady_tokens_per_s(skip=2, tokens_per_step=1000) == pytest.approx(2000.0)
    assert r.steady_tokens_per_s(skip=0, tokens_per_step=1000) < 2000.0
    assert math.isnan(FitResult(steps=0, world_size=1).steady_tokens_per_s(0, 1))

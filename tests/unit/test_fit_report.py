"""The driver's live line, FitResult's steady-state rate, the worker's rate window and loss log
(no Ray needed)."""

from __future__ import annotations

import io
import math
import threading

import pytest

from zray.cluster.controller import RunStatus
from zray.cluster.state import RunState
from zray.fit import FitResult, ProgressLine
from zray.metrics.progress import LossLog, RateWindow


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


def test_rate_window_forgets_the_warm_up() -> None:
    w = RateWindow(dp_size=2)
    w.add(0.0, 0)
    w.add(10.0, 100)  # a slow warm-up: 10 tokens/s on this rank
    for i in range(1, 41):
        w.add(10.0 + i, 100 + 1000 * i)  # then 1000 tokens/s
    assert w.tokens_per_s() == pytest.approx(2000.0)  # both ranks, the last 20 s only
    assert w.seconds_per_step() == pytest.approx(1.0)


def test_loss_log_keeps_the_sampled_steps_and_waits_for_a_step() -> None:
    log = LossLog()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(log.client_state_through(3)))
    t.start()
    for step in (1, 2, 3):
        log.record(step, float(step), keep=step != 2)
    t.join(timeout=5)
    assert got == [{"losses": [[1, 1.0], [3, 3.0]]}] and log.newest() == 3.0
    waiting: list[object] = []
    t = threading.Thread(target=lambda: waiting.append(log.client_state_through(9)))
    t.start()
    log.close()  # step 9 will never be read: the waiter gets None, not a hang
    t.join(timeout=5)
    assert waiting == [None]

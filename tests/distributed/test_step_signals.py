"""StepSignals on real gloo groups: every rank reads the same sums for the same step at the same
point, one step late, so decisions taken on them agree."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import zray
from zray.launch import launch_local
from zray.parallel.context import ParallelContext
from zray.parallel.step_signals import StepSignals

pytestmark = pytest.mark.distributed


def _signals_run(steps: int) -> list[list[Any]]:
    ctx = zray.init_distributed()
    signals = StepSignals(ctx, lag=1)
    seen = []
    for step in range(1, steps + 1):
        # Each rank's own values: rank r's loss is step + r; only rank 1 asks to pause at step 3;
        # rank 0 cannot copy at step 2.
        loss = torch.tensor(float(step + ctx.rank))
        norm = torch.tensor(2.0)
        read = signals.take(through=step - signals.lag)
        seen.append([(v.step, v.loss, v.grad_norm, v.pause, v.copy_ready) for v in read])
        pause = ctx.rank == 1 and step == 3
        ready = not (ctx.rank == 0 and step == 2)
        signals.push(step, loss, norm if step > 1 else None, pause, ready)
    seen.append([(v.step, v.loss, v.grad_norm, v.pause, v.copy_ready) for v in signals.drain()])
    return seen


def test_every_rank_reads_the_same_sums_one_step_late() -> None:
    a, b = launch_local(_signals_run, 2, 4)
    assert a == b
    # Step s's values are read after step s + 1 (the last at the drain); the mean loss of ranks
    # with losses s and s + 1 is s + 0.5; the norm is the same on every rank.
    assert a == [
        [],
        [(1, 1.5, None, False, True)],
        [(2, 2.5, 2.0, False, False)],
        [(3, 3.5, 2.0, True, True)],
        [(4, 4.5, 2.0, False, True)],
    ]


def test_one_process_needs_no_group() -> None:
    s = StepSignals(ParallelContext.single_process("cpu"), lag=2)
    for step in (1, 2, 3):
        s.push(step, torch.tensor(float(step)), None, False, True)
    assert [v.step for v in s.take(through=1)] == [1]
    assert [v.step for v in s.drain()] == [2, 3]

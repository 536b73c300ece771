"""Tests for zray.checkpoint.replica.StateReplicator on one process: a copy taken while training
goes on equals a synchronous capture of its step and resumes bit-identically; a copy counts only
once its holder acknowledges it; the interval stretches instead of the step waiting; the host
budget turns copies off with a message that names the bytes.

Device copies (side stream, page-locked buffers, the fence before the optimizer update) run in
tests/distributed/test_state_copies_gpu.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import zray
from tests.distributed import _workloads as w
from zray.checkpoint.engine_state import capture, restore
from zray.checkpoint.memory import MemoryReader
from zray.checkpoint.replica import STALL_BUDGET, CopyPhase, ReplicaStore, StateReplicator
from zray.checkpoint.shard import PackedShard, RankShard


def engine_and_data(stage: int = 1) -> tuple[Any, torch.Tensor]:
    engine, *_ = zray.initialize(model=w.fresh_model(), config=w.ds_config(stage, 1))
    return engine, w.data()


def train(engine: Any, tokens: torch.Tensor, steps: range) -> None:
    for step in steps:
        for micro in range(w.GAS):
            engine.backward(engine(**w.micro_batch(tokens, step % w.STEPS, micro, 0, 1)))
            engine.step()


class Holder:
    """A holder that acknowledges when told to (or at once)."""

    def __init__(self, hold: bool = False) -> None:
        self.store = ReplicaStore()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.sent: list[int] = []

    def send(self, step: int, packed: PackedShard) -> Callable[[], None]:
        self.sent.append(step)

        def wait() -> None:
            assert self.release.wait(timeout=30)
            self.store.keep(0, step, packed)

        return wait


def history(step: int) -> dict[str, Any]:
    return {"losses": [[s, float(s)] for s in range(1, step + 1)]}


def until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def replicator(engine: Any, holder: Holder, **kw: Any) -> StateReplicator:
    rep = StateReplicator(engine, kw.pop("interval", 1), holder.send, history, **kw)
    rep.ready(at=engine.global_steps + 1, step_seconds=0.1)  # plans, allocates in the background
    until(lambda: rep.phase is not CopyPhase.WAITING)
    return rep


def assert_same_shard(a: RankShard, b: RankShard) -> None:
    assert [(r.name, r.lo, r.hi) for r in a.ranges] == [(r.name, r.lo, r.hi) for r in b.ranges]
    for ra, rb in zip(a.ranges, b.ranges, strict=True):
        assert ra.tensors.keys() == rb.tensors.keys()
        for k in ra.tensors:
            assert torch.equal(ra.tensors[k], rb.tensors[k]), (ra.name, k)
    assert a.group_scalars == b.group_scalars and a.engine == b.engine
    assert a.param_groups == b.param_groups and a.sampler == b.sampler
    assert torch.equal(a.rng["torch"], b.rng["torch"])


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_a_copy_equals_a_synchronous_capture_of_its_step(stage: int) -> None:
    engine, tokens = engine_and_data(stage)
    holder = Holder()
    train(engine, tokens, range(2))  # Adam's state exists after the first step
    rep = replicator(engine, holder, generations=2)
    assert rep.phase is CopyPhase.IDLE
    want = capture(engine, sampler={"consumed_samples": 32}, client_state=history(2))
    rep.capture(2, {"consumed_samples": 32})
    train(engine, tokens, range(2, 4))  # training goes on while the copy completes
    until(lambda: rep.stats.copies == 1)
    assert holder.sent == [2] and rep.stats.newest_step == 2 and rep.phase is CopyPhase.IDLE
    ((step, own),) = rep.snapshots()
    ((held_step, held),) = holder.store.held()[0]
    assert step == held_step == 2
    assert_same_shard(own.unpack(), want)
    assert_same_shard(held.unpack(), want)
    rep.close()


def test_resuming_from_a_copy_is_bit_identical_to_going_on() -> None:
    engine, tokens = engine_and_data(3)
    train(engine, tokens, range(2))
    rep = replicator(engine, Holder())
    rep.capture(2, None)
    until(lambda: rep.stats.copies == 1)
    ((_, packed),) = rep.snapshots()
    train(engine, tokens, range(2, 4))
    going_on = engine.consolidated_state_dict()
    fresh, _ = engine_and_data(3)
    restore(fresh, MemoryReader([packed.unpack()]))
    assert fresh.global_steps == 2
    train(fresh, tokens, range(2, 4))
    resumed = fresh.consolidated_state_dict()
    for k in going_on:
        assert torch.equal(resumed[k], going_on[k]), k
    rep.close()


def test_no_new_copy_until_the_holder_acknowledges() -> None:
    engine, tokens = engine_and_data()
    train(engine, tokens, range(1))
    holder = Holder(hold=True)
    rep = replicator(engine, holder, interval=1)
    assert rep.ready(at=2, step_seconds=0.1)
    rep.capture(1, None)
    until(lambda: rep.phase is CopyPhase.SENDING)
    # Sending takes "forever": the votes say no, so no step waits and the interval stretches.
    for at in range(2, 6):
        assert not rep.ready(at=at, step_seconds=0.1)
    assert rep.stats.copies == 0 and rep.snapshots()[0][0] == 1  # complete here, not acked
    holder.release.set()
    until(lambda: rep.phase is CopyPhase.IDLE)
    assert rep.stats.copies == 1 and rep.ready(at=6, step_seconds=0.1)
    rep.close()


def test_interval_and_stall_budget_space_the_copies() -> None:
    engine, tokens = engine_and_data()
    train(engine, tokens, range(1))
    rep = replicator(engine, Holder(), interval=3)
    rep.capture(1, None)
    until(lambda: rep.phase is CopyPhase.IDLE)
    assert [rep.ready(at=a, step_seconds=0.1) for a in (2, 3, 4)] == [False, False, True]
    # A copy that stalled a 100 ms step by 50 ms may come back every 50 steps at the earliest.
    rep._last_stall = 0.05
    assert rep.min_gap(0.1) == round(0.05 / (STALL_BUDGET * 0.1)) == 50
    assert not rep.ready(at=50, step_seconds=0.1) and rep.ready(at=51, step_seconds=0.1)
    rep.close()


def test_copies_beyond_the_host_budget_are_turned_off_with_the_numbers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, tokens = engine_and_data()
    train(engine, tokens, range(1))
    rep = StateReplicator(engine, 1, Holder().send, history, generations=2, budget_bytes=1000)
    with caplog.at_level("WARNING", logger="zray.replica"):
        assert not rep.ready(at=2, step_seconds=0.1)
    assert rep.phase is CopyPhase.OFF
    msg = rep.stats.off_reason or ""
    assert "zray.replica_interval" in msg and "4 copies" not in msg
    assert "2 own + 2 held for a peer" in msg and "budget of 0.00 GB" in msg
    assert msg in caplog.text


def test_the_fence_runs_before_the_optimizer_writes_the_state() -> None:
    engine, tokens = engine_and_data()
    train(engine, tokens, range(1))
    seg = next(iter(engine.zero.optimizer.state))
    before = engine.zero.optimizer.state[seg]["exp_avg"].clone()
    seen: list[bool] = []
    engine.fence_state(
        lambda: seen.append(torch.equal(engine.zero.optimizer.state[seg]["exp_avg"], before))
    )
    train(engine, tokens, range(1, 2))
    assert seen == [True]  # ran once, while the state was still the old step's
    train(engine, tokens, range(2, 3))
    assert seen == [True]

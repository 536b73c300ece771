"""State copies on a GPU (skipped without CUDA): the device -> host copies run on a side stream
while the next steps are already queued, and the next optimizer update waits for them, so the
copy is exactly the state of its step.

The reference is a device-side clone of every source taken on the compute stream right before
the copy starts (no host sync, so the GPU queue keeps running ahead as in training)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import zray
from zray.checkpoint.engine_state import state_layout
from zray.checkpoint.replica import CopyPhase, ReplicaStore, StateReplicator
from zray.checkpoint.shard import PackedShard
from zray.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# ~100M parameters: 1.2 GB of fp32 master + Adam state, tens of milliseconds over PCIe, while a
# step on 16 tokens takes a few: without the fence the next update would overwrite the state
# long before the copy finished.
MODEL = GPTConfig(vocab_size=8192, seq_len=16, n_layer=8, n_head=8, d_model=1024, bias=False)


def setup(stage: int) -> tuple[Any, Callable[[], None]]:
    torch.manual_seed(0)
    config = {
        "train_batch_size": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "zero_optimization": {"stage": stage},
    }
    engine, *_ = zray.initialize(model=GPT(MODEL), config=config)
    ids = torch.randint(0, MODEL.vocab_size, (1, MODEL.seq_len), device="cuda")

    def step() -> None:
        engine.backward(engine(input_ids=ids, labels=ids))
        engine.step()

    return engine, step


def copy_and_race(stage: int, fence: bool) -> tuple[list[torch.Tensor], PackedShard]:
    """Copy the state of step 2 and queue two more steps at once; the copy and the clones."""
    engine, step = setup(stage)
    for _ in range(2):
        step()
    store = ReplicaStore()

    def send(s: int, packed: PackedShard) -> Callable[[], None]:
        return lambda: store.keep(0, s, packed)

    rep = StateReplicator(engine, 1, send, lambda s: {}, generations=2)
    rep.ready(at=3, step_seconds=0.01)
    end = time.monotonic() + 60
    while rep.phase is CopyPhase.WAITING:
        assert time.monotonic() < end
        time.sleep(0.01)
    if not fence:
        engine.fence_state = lambda wait: None  # the broken variant: nothing waits
    clones = [s.clone() for s in state_layout(engine).sources]  # queued, not synced
    rep.capture(2, None)
    step()
    step()
    while rep.stats.copies < 1:
        assert time.monotonic() < end
        time.sleep(0.01)
    torch.cuda.synchronize()
    ((_, packed),) = store.held()[0]
    rep.close()
    return [c.cpu() for c in clones], packed


def _equal(clones: list[torch.Tensor], packed: PackedShard) -> list[bool]:
    out = []
    for c, a, dtype in zip(clones, packed.arrays, packed.dtypes, strict=True):
        out.append(torch.equal(c.reshape(-1), torch.from_numpy(a.copy()).view(dtype)))
    return out


@pytest.mark.parametrize("stage", [1, 3])
def test_the_copy_is_the_state_of_its_step_while_later_steps_run(stage: int) -> None:
    clones, packed = copy_and_race(stage, fence=True)
    assert all(_equal(clones, packed))


def test_without_the_fence_the_next_update_corrupts_the_copy() -> None:
    """The check above can fail: with the fence removed the copy differs from its step."""
    clones, packed = copy_and_race(1, fence=False)
    assert not all(_equal(clones, packed))

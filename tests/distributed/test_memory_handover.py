"""In-memory handover: shards captured at 2 ranks / stage 3 restore into 1 rank / stage 1."""

from __future__ import annotations

import pytest
import torch

import zray
from tests.distributed import _workloads as w
from zray.checkpoint.engine_state import restore
from zray.checkpoint.memory import MemoryCheckpointError, MemoryReader
from zray.launch import launch_local

pytestmark = pytest.mark.distributed


def test_reshard_from_memory_across_size_and_stage() -> None:
    results = launch_local(w.capture_after_training, 2, 3)
    shards = [r["shard"] for r in results]
    engine, *_ = zray.initialize(model=w.fresh_model(seed=7), config=w.ds_config(1, 1))
    glob = restore(engine, MemoryReader(shards))
    assert engine.global_steps == 3 and glob["sampler"]["consumed_samples"] == 48
    got, want = engine.consolidated_state_dict(), results[0]["state"]
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # Adam's moments came across too: one more identical step on both sides agrees.
    assert engine.zero.optimizer.state, "optimizer state restored"
    with pytest.raises(MemoryCheckpointError, match="ranks \\[0\\] of a world of 2"):
        MemoryReader(shards[:1])

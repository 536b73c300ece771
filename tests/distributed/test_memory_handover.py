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
    # Adam's moments, step count and the schedule came across too: one more step on the same
    # global batch lands where the 2-rank run's 4th step did. Bound 1e-6: fp32 sums in another
    # order (1 rank vs 2) left at most 3.7e-9 when measured; the same step without the restored
    # optimizer state (restore(..., load_optimizer=False)) is off by 1.0e-2 and fails here.
    tokens = w.data()
    for micro in range(w.GAS):
        engine.backward(engine(**w.micro_batch(tokens, 3, micro, 0, 1)))
        engine.step()
    got, want = engine.consolidated_state_dict(), results[0]["after_next_step"]
    for k in want:
        torch.testing.assert_close(
            got[k], want[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )
    with pytest.raises(MemoryCheckpointError, match="ranks \\[0\\] of a world of 2"):
        MemoryReader(shards[:1])

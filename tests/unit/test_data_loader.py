"""Tests for zray.data.loader.RankBatches: each rank's micro-batches, and a checkpoint state that
resumes exactly, at any world size and between or inside accumulation windows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from zray.data import DataError, GlobalBatchSampler, RankBatches, as_source, lm_tokens_table
from zray.data.sources import TableSource
from zray.models.data import synthetic_tokens

N, GB, SEED = 50, 12, 11  # 4 global batches per epoch, 2 samples dropped per epoch


@pytest.fixture(scope="module")
def ids() -> TableSource:
    """A source whose only column is the row index, so a batch shows which samples it holds."""
    return as_source(pa.table({"sample_id": pa.array(np.arange(N))}))


def loaders(source: TableSource, world: int, micro: int, gas: int) -> list[RankBatches]:
    return [
        RankBatches(source, GlobalBatchSampler(N, GB, SEED), r, world, micro, gas, "cpu")
        for r in range(world)
    ]


def run_steps(ranks: list[RankBatches], steps: int) -> list[list[int]]:
    """Drive every rank through ``steps`` optimizer steps; each global batch's samples as the
    ranks read them, put back in (micro-step, rank) order."""
    out = []
    gas = ranks[0].gas
    for _ in range(steps):
        per_micro = [[next(rb)["sample_id"].tolist() for rb in ranks] for _ in range(gas)]
        out.append([i for micro in per_micro for rank_part in micro for i in rank_part])
    return out


def test_resume_across_world_sizes_matches_an_uninterrupted_run(ids: TableSource) -> None:
    uninterrupted = GlobalBatchSampler(N, GB, SEED)
    reference = [uninterrupted.next_global_batch().tolist() for _ in range(12)]
    got: list[list[int]] = []
    state = None
    for world, micro, gas, steps in [(4, 3, 1, 3), (2, 3, 2, 4), (3, 2, 2, 5)]:
        ranks = loaders(ids, world, micro, gas)
        if state is not None:
            for rb in ranks:
                rb.load_state_dict(state)
        got += run_steps(ranks, steps)
        states = [rb.state_dict() for rb in ranks]
        assert all(s == states[0] for s in states)  # any rank's copy will do
        state = states[0]
    assert got == reference
    assert state["consumed_samples"] == 12 * GB


def test_checkpoint_inside_accumulation_replays_that_global_batch(ids: TableSource) -> None:
    (rb,) = loaders(ids, world=1, micro=3, gas=4)
    run_steps([rb], 2)
    after_two = rb.state_dict()
    first_micro = next(rb)["sample_id"].tolist()  # global batch 3 begun, not finished
    assert rb.micro_step == 1
    assert rb.state_dict() == after_two
    (resumed,) = loaders(ids, world=1, micro=3, gas=4)
    resumed.load_state_dict(rb.state_dict())
    assert next(resumed)["sample_id"].tolist() == first_micro
    for _ in range(3):
        next(resumed)
    assert resumed.state_dict()["consumed_samples"] == 3 * GB


def test_lm_batches_have_the_model_shapes() -> None:
    tokens = synthetic_tokens(N, 16, 64, seed=0)
    source = as_source(lm_tokens_table(tokens))
    sampler = GlobalBatchSampler(N, GB, SEED)
    rb = RankBatches(source, sampler, rank=1, world=2, micro_batch=3, gas=2, device="cpu")
    batch = next(rb)
    assert batch["input_ids"].shape == (3, 16) and batch["input_ids"].dtype == torch.int64
    g = GlobalBatchSampler(N, GB, SEED).next_global_batch()
    rows = torch.from_numpy(g[3:6])  # micro-step 0, rank 1 of world 2
    assert torch.equal(batch["input_ids"], tokens[rows])
    assert list(batch) == ["input_ids"]  # no collate given: the columns as they are
    assert batch["input_ids"].device == torch.device("cpu")
    assert rb.last_fetch_seconds > 0 and rb.total_fetch_seconds >= rb.last_fetch_seconds


def test_validation_names_the_numbers(ids: TableSource) -> None:
    with pytest.raises(DataError, match=r"global_batch 12 != micro_batch 2 x gas 2 x world 2 = 8"):
        RankBatches(ids, GlobalBatchSampler(N, GB, SEED), 0, 2, 2, 2, "cpu")
    with pytest.raises(DataError, match=r"num_samples 60 != the source's 50 rows"):
        RankBatches(ids, GlobalBatchSampler(60, GB, SEED), 0, 2, 3, 2, "cpu")
    with pytest.raises(DataError, match=r"rank: got 2"):
        RankBatches(ids, GlobalBatchSampler(N, GB, SEED), 2, 2, 3, 2, "cpu")

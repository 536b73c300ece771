"""Tests for zray.data.sampler: deterministic, drop-last, epoch-crossing global batches whose
content and order do not depend on the world size, and the rank split of one global batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zray.data import DataError, GlobalBatchSampler, rank_slice
from zray.data.sampler import epoch_permutation


def draw(sampler: GlobalBatchSampler, k: int) -> list[list[int]]:
    return [sampler.next_global_batch().tolist() for _ in range(k)]


def test_permutation_is_pinned() -> None:
    # The order is part of a checkpoint's meaning: a numpy that changed PCG64, SeedSequence or
    # the stable integer argsort would silently change which samples a resumed job reads.
    assert epoch_permutation(10, seed=0, epoch=0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert epoch_permutation(10, seed=0, epoch=1).tolist() == [7, 4, 5, 1, 9, 8, 6, 2, 0, 3]
    assert epoch_permutation(10, seed=1, epoch=0).tolist() == [9, 2, 4, 7, 5, 0, 8, 6, 3, 1]


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    a = draw(GlobalBatchSampler(100, 8, seed=5), 30)
    b = draw(GlobalBatchSampler(100, 8, seed=5), 30)
    c = draw(GlobalBatchSampler(100, 8, seed=6), 30)
    assert a == b
    assert a != c


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    n = 1000
    perms = [epoch_permutation(n, seed=2, epoch=e) for e in range(3)]
    for p in perms:
        assert p.dtype == np.int64
        assert np.array_equal(np.sort(p), np.arange(n))
    assert not np.array_equal(perms[0], perms[1])
    assert not np.array_equal(perms[1], perms[2])


def test_drop_last_and_epoch_crossing() -> None:
    # 103 samples, global batch 10: 10 batches per epoch, 3 samples dropped each epoch.
    s = GlobalBatchSampler(103, 10, seed=4)
    assert (s.batches_per_epoch, s.samples_per_epoch) == (10, 100)
    epoch0 = np.concatenate([s.next_global_batch() for _ in range(10)])
    assert s.epoch == 1 and s.consumed_samples == 100 and s.global_step == 10
    perm0 = epoch_permutation(103, 4, 0)
    assert np.array_equal(epoch0, perm0[:100])  # every batch full; the tail perm0[100:] dropped
    assert len(set(epoch0.tolist())) == 100
    first_of_epoch1 = s.next_global_batch()
    assert np.array_equal(first_of_epoch1, epoch_permutation(103, 4, 1)[:10])
    assert s.epoch == 1


def test_no_shuffle_reads_in_order_and_wraps() -> None:
    s = GlobalBatchSampler(25, 10, seed=0, shuffle=False)
    assert draw(s, 3) == [list(range(10)), list(range(10, 20)), list(range(10))]


def test_state_round_trips_through_json_and_resumes_exactly() -> None:
    full = draw(GlobalBatchSampler(50, 6, seed=9), 20)  # 8 batches per epoch: crosses 2 epochs
    s = GlobalBatchSampler(50, 6, seed=9)
    head = draw(s, 11)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["consumed_samples"] == 66 and state["seed"] == 9
    resumed = GlobalBatchSampler(50, 6, seed=123)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    assert head + draw(resumed, 9) == full


def _global_batch_from_ranks(
    g: np.ndarray, world: int, micro: int, gas: int
) -> tuple[list[list[int]], np.ndarray]:
    """Every rank's micro-batches of global batch g, and them put back in (m, r) order."""
    per_rank = [[rank_slice(g, r, world, micro, gas, m) for m in range(gas)] for r in range(world)]
    flat = [per_rank[r][m] for m in range(gas) for r in range(world)]
    return [np.concatenate(p).tolist() for p in per_rank], np.concatenate(flat)


@pytest.mark.parametrize(("world", "micro", "gas"), [(1, 3, 8), (4, 3, 2), (3, 4, 2), (6, 1, 4)])
def test_rank_slices_are_disjoint_and_cover_the_global_batch(
    world: int, micro: int, gas: int
) -> None:
    g = GlobalBatchSampler(100, 24, seed=1).next_global_batch()
    per_rank, rejoined = _global_batch_from_ranks(g, world, micro, gas)
    assert np.array_equal(rejoined, g)  # covered, in order
    seen = [i for rank_samples in per_rank for i in rank_samples]
    assert sorted(seen) == sorted(g.tolist()) and len(set(seen)) == len(g)  # disjoint
    assert all(len(p) == micro * gas for p in per_rank)


def test_resume_at_other_world_sizes_reads_the_same_global_batches() -> None:
    """Train 3 steps at world 4, resume at world 2 for 4 steps, then at world 3 for 5 steps:
    the global batches the ranks read together are those of an uninterrupted run."""
    gb, n = 24, 100  # 4 global batches per epoch: the 12 steps cross two epoch boundaries
    reference = draw(GlobalBatchSampler(n, gb, seed=7), 12)
    got: list[list[int]] = []
    state = GlobalBatchSampler(n, gb, seed=7).state_dict()
    for world, micro, gas, steps in [(4, 3, 2, 3), (2, 3, 4, 4), (3, 4, 2, 5)]:
        # Each rank owns a sampler restored from the same (world-size free) state.
        samplers = [GlobalBatchSampler(n, gb, seed=7) for _ in range(world)]
        for s in samplers:
            s.load_state_dict(state)
        for _ in range(steps):
            gs = [s.next_global_batch() for s in samplers]
            assert all(np.array_equal(g, gs[0]) for g in gs)
            slices = [
                rank_slice(gs[r], r, world, micro, gas, m) for m in range(gas) for r in range(world)
            ]
            got.append(np.concatenate(slices).tolist())
        state = samplers[0].state_dict()
    assert got == reference


def test_rank_slice_validation_names_the_numbers() -> None:
    g = np.arange(24)
    with pytest.raises(
        DataError,
        match=r"global batch of 24 samples does not split as micro_batch 5 x gas 2 x world 2 = 20",
    ):
        rank_slice(g, 0, 2, 5, 2, 0)
    with pytest.raises(DataError, match=r"rank: got 2; allowed: 0 <= rank < world \(2\)"):
        rank_slice(g, 2, 2, 6, 2, 0)
    with pytest.raises(DataError, match=r"micro_step: got 2; allowed: 0 <= micro_step < gas"):
        rank_slice(g, 0, 2, 6, 2, 2)


def test_sampler_validation_errors() -> None:
    with pytest.raises(DataError, match=r"global_batch: got 11 with only 10 samples"):
        GlobalBatchSampler(10, 11, seed=0)
    with pytest.raises(DataError, match=r"num_samples: got 0; allowed: an integer >= 1"):
        GlobalBatchSampler(0, 1, seed=0)
    with pytest.raises(DataError, match=r"seed: got -1; allowed: an integer >= 0"):
        GlobalBatchSampler(10, 2, seed=-1)
    s = GlobalBatchSampler(10, 2, seed=0)
    bad = GlobalBatchSampler(10, 5, seed=0).state_dict()
    with pytest.raises(DataError, match=r"global_batch: saved 5, this run has 2"):
        s.load_state_dict(bad)
    with pytest.raises(DataError, match=r"num_samples: saved 12, this run has 10"):
        s.load_state_dict({**s.state_dict(), "num_samples": 12})
    with pytest.raises(DataError, match=r"consumed_samples: got 3; allowed: a multiple of"):
        s.load_state_dict({**s.state_dict(), "consumed_samples": 3})
    with pytest.raises(DataError, match=r"no 'consumed_samples'"):
        s.load_state_dict({"seed": 0})

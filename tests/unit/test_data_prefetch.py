"""Tests for zray.data.prefetch.Prefetcher: the same batches as RankBatches, in order, built
ahead on a thread; the sampler state of what was consumed; errors and waiting time surfaced."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pytest
import torch

from zray.data import DataError, GlobalBatchSampler, RankBatches, as_source
from zray.data.prefetch import Prefetcher
from zray.data.sources import TableSource

N, GB, SEED = 50, 12, 11


def ids() -> TableSource:
    return as_source(pa.table({"sample_id": pa.array(np.arange(N))}))


def rank_batches(source: TableSource, gas: int = 2) -> RankBatches:
    return RankBatches(source, GlobalBatchSampler(N, GB, SEED), 1, 2, GB // (2 * gas), gas, "cpu")


def test_same_batches_in_the_same_order_as_the_loader() -> None:
    want = rank_batches(ids())
    pf = Prefetcher(rank_batches(ids()), torch.device("cpu"), depth=3)
    try:
        for _ in range(20):  # several epochs' worth
            assert torch.equal(next(pf)["sample_id"], next(want)["sample_id"])
    finally:
        pf.close()


def test_state_is_of_the_consumed_batches_not_the_ones_built_ahead() -> None:
    """Resuming from state_dict() after k micro-batches gives what an uninterrupted loader gives
    after k, although the thread has built more."""
    reference = rank_batches(ids())
    for _ in range(6):  # three global batches of 2 micro-batches
        next(reference)
    pf = Prefetcher(rank_batches(ids()), torch.device("cpu"), depth=4)
    try:
        for _ in range(6):
            next(pf)
        deadline = time.monotonic() + 5
        while not pf._queue.full() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pf._queue.full(), "the thread should have built batches ahead"
        state = pf.state_dict()
    finally:
        pf.close()
    assert state == reference.state_dict()
    resumed = rank_batches(ids())
    resumed.load_state_dict(state)
    for _ in range(4):
        assert torch.equal(next(resumed)["sample_id"], next(reference)["sample_id"])


class _Slow(TableSource):
    """Rows that take `delay` seconds to fetch; row `bad` raises a DataError."""

    def __init__(self, delay: float, bad: int | None = None) -> None:
        self.delay, self.bad = delay, bad

    @property
    def columns(self) -> list[str]:
        return ["x"]

    def __len__(self) -> int:
        return N

    def take(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        time.sleep(self.delay)
        idx = np.asarray(indices)
        if self.bad is not None and (idx == self.bad).any():
            raise DataError(f"row {self.bad}: broken")
        return {"x": torch.as_tensor(idx)}

    def select(self, columns: list[str]) -> TableSource:
        return self


def test_a_slow_source_shows_up_as_waiting_time() -> None:
    pf = Prefetcher(rank_batches(_Slow(0.05)), torch.device("cpu"), depth=2)
    try:
        for _ in range(6):
            next(pf)
    finally:
        pf.close()
    # Six fetches of 50 ms with nothing else to do: the training thread waited for nearly all.
    assert pf.wait_seconds > 0.2
    fast = Prefetcher(rank_batches(ids()), torch.device("cpu"), depth=4)
    try:
        time.sleep(0.2)  # let the thread fill the queue
        for _ in range(4):
            next(fast)
    finally:
        fast.close()
    assert fast.wait_seconds < 0.05


def test_a_data_error_is_raised_on_the_training_thread() -> None:
    bad = int(GlobalBatchSampler(N, GB, SEED).next_global_batch()[-1])  # in the first batch
    one_rank = RankBatches(_Slow(0.0, bad), GlobalBatchSampler(N, GB, SEED), 0, 1, 6, 2, "cpu")
    pf = Prefetcher(one_rank, torch.device("cpu"))
    try:
        with pytest.raises(DataError, match=f"row {bad}: broken"):
            for _ in range(2):  # the first global batch's two micro-batches
                next(pf)
    finally:
        pf.close()

"""One rank's stream of micro-batches: sampler -> rank slice -> source.take -> device.

[Note: what a checkpoint records] The engine consumes ``gas`` micro-batches per optimizer step.
`RankBatches.state_dict` reports the sampler as of the last *completed* global batch, one whose
``gas`` micro-batches have all been handed out. A checkpoint saved after an optimizer step (the
engine has taken the last micro-batch and stepped) therefore resumes with the next global batch;
one saved mid-accumulation resumes at the start of the global batch in progress, whose
accumulated gradients the checkpoint does not hold anyway. Every rank reports the same state,
and it holds no rank or world size, so any rank's copy resumes a job of any size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from zray.data.collate import Collate
from zray.data.errors import DataError
from zray.data.sampler import GlobalBatchSampler, rank_slice
from zray.data.sources import TableSource

__all__ = ["RankBatches"]


class RankBatches(Iterator[dict[str, torch.Tensor]]):
    """Rank ``rank``'s micro-batches, in order: ``gas`` per global batch, without end.

    Micro-batch m of each global batch holds the samples `rank_slice` gives this rank, passed
    through ``collate`` when given (`zray.data.collate.collate_for`). Tensors are moved to
    ``device``; ``last_fetch_seconds`` is the wall time of the last micro-batch's
    fetch (index lookup, gather, conversion and the copy to ``device``), and
    ``total_fetch_seconds`` their sum, for the metrics. The sampler is owned by this iterator:
    advance it only through ``next``."""

    def __init__(
        self,
        source: TableSource,
        sampler: GlobalBatchSampler,
        rank: int,
        world: int,
        micro_batch: int,
        gas: int,
        device: torch.device | str,
        collate: Collate | None = None,
    ) -> None:
        if micro_batch * gas * world != sampler.global_batch:
            raise DataError(
                f"sampler global_batch {sampler.global_batch} != micro_batch {micro_batch} x gas "
                f"{gas} x world {world} = {micro_batch * gas * world}; allowed: global_batch == "
                "micro_batch * gas * world"
            )
        if sampler.num_samples != len(source):
            raise DataError(
                f"sampler num_samples {sampler.num_samples} != the source's {len(source)} rows; "
                "allowed: a sampler built with num_samples=len(source)"
            )
        if not 0 <= rank < world:
            raise DataError(f"rank: got {rank}; allowed: 0 <= rank < world ({world})")
        self.source = source
        self.sampler = sampler
        self.rank, self.world, self.micro_batch, self.gas = rank, world, micro_batch, gas
        self.device = torch.device(device)
        self.collate = collate
        self.last_fetch_seconds = 0.0
        self.total_fetch_seconds = 0.0
        self._micro_step = 0
        self._global_indices: np.ndarray | None = None  # int64 [global_batch], in progress
        self._completed_state = sampler.state_dict()

    @property
    def micro_step(self) -> int:
        """Index, within its global batch, of the micro-batch ``next`` returns."""
        return self._micro_step

    def __iter__(self) -> RankBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        if self._micro_step == 0:
            self._global_indices = self.sampler.next_global_batch()
        assert self._global_indices is not None
        rows = rank_slice(
            self._global_indices,
            self.rank,
            self.world,
            self.micro_batch,
            self.gas,
            self._micro_step,
        )
        batch = self.source.take(rows)
        if self.collate is not None:
            batch = self.collate(batch)
        if self.device.type != "cpu":
            # Host -> device copy of a few KB-MB. From pageable memory (this case) CUDA stages
            # the data through a pinned buffer and the call may block the host until staged;
            # it does not wait for queued GPU work. Pinning in a prefetch thread is the fix if
            # last_fetch_seconds ever shows it.
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self._micro_step += 1
        if self._micro_step == self.gas:
            self._micro_step = 0
            self._global_indices = None
            self._completed_state = self.sampler.state_dict()
        self.last_fetch_seconds = time.perf_counter() - start
        self.total_fetch_seconds += self.last_fetch_seconds
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler state as of the last completed global batch (see the Note above)."""
        return dict(self._completed_state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the global batch ``state`` was saved at; the next micro-batch is micro-
        step 0 of the following global batch."""
        self.sampler.load_state_dict(state)
        self._completed_state = self.sampler.state_dict()
        self._micro_step = 0
        self._global_indices = None

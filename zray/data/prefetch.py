"""Micro-batches built ahead on a background thread, so that data never sits on the step's path.

The thread runs the rank's `RankBatches` (sampler -> rows -> Arrow -> tensors) `depth`
micro-batches ahead and, for a GPU, copies each batch into page-locked memory; the training
thread only starts the host-to-device copies (`non_blocking`: they queue on the stream like
kernels and the host goes on). torch's pinned allocator keeps a page-locked block until the
copies reading it are done, so the thread may reuse memory freely.

Time the training thread spends waiting for a batch is counted (`wait_seconds`): a slow source
shows up as waiting, not as a slower step. The sampler position saved in checkpoints is the one
of the last micro-batch *consumed* (`state_dict`), not of the ones built ahead.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from zray.data.loader import RankBatches

__all__ = ["Prefetcher"]


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Iterator[dict[str, torch.Tensor]]):
    def __init__(self, batches: RankBatches, device: torch.device, depth: int = 4) -> None:
        assert batches.device.type == "cpu", "the prefetcher moves batches to the device itself"
        self.batches, self.device = batches, torch.device(device)
        self.wait_seconds = 0.0  # the training thread's time blocked in __next__
        self._state = batches.state_dict()
        self._queue: queue.Queue[tuple[dict[str, torch.Tensor], dict[str, Any]] | _Failed] = (
            queue.Queue(maxsize=depth)
        )
        self._stop = threading.Event()
        self._pin = self.device.type == "cuda"
        self._thread = threading.Thread(target=self._produce, name="zray-prefetch", daemon=True)
        self._thread.start()

    @property
    def fetch_seconds(self) -> float:
        """Seconds the background thread spent building batches."""
        return self.batches.total_fetch_seconds

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                batch = next(self.batches)
                if self._pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                item: Any = (batch, self.batches.state_dict())
            except BaseException as e:  # a data error: raised on the training thread
                item = _Failed(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        batch, self._state = item
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler state as of the last consumed micro-batch's global batch (RankBatches'
        Note on what a checkpoint records)."""
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)

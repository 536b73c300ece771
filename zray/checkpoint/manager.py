"""One rank's training state outside the engine: resume, checkpoints, in-memory copies, handover.

The trainer asks this one object for every move of its state: `resume` (from a checkpoint on disk
or from shards handed over in memory), `save` every `checkpoint_interval` steps (synchronously or
through the AsyncSaver), the in-memory copies a peer keeps (zray.checkpoint.replica), and the
`handover` of a planned pause. Nothing else in the worker calls the snapshot code.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from zray.checkpoint.async_saver import AsyncSaver
from zray.checkpoint.engine_state import capture, restore
from zray.checkpoint.replica import Send, StateReplicator
from zray.checkpoint.shard import PackedShard, RankShard
from zray.checkpoint.writer import save_shard
from zray.metrics.progress import LossLog

if TYPE_CHECKING:
    from zray.config.run import RunConfig
    from zray.engine import Engine
    from zray.metrics.worker import WorkerMetrics

# Where a group resumes from: a checkpoint dir, or in-memory shards (RankShard / PackedShard).
Resume = str | list[Any] | None


def checkpoint_save_id(run_id: str, attempt: int, step: int) -> str:
    """The id every rank's checkpoint piece of one save carries (see save_shard's save_id)."""
    return f"{run_id}-attempt{attempt}-step{step}"


class CheckpointManager:
    def __init__(
        self,
        engine: Engine,
        run: RunConfig,
        run_id: str,
        attempt: int,
        losses: LossLog,
        metrics: WorkerMetrics,
        send_copy: Send | None = None,
        copy_budget_bytes: int | None = None,
    ) -> None:
        self.engine, self.run, self.run_id, self.attempt = engine, run, run_id, attempt
        self.losses, self.metrics = losses, metrics
        self.root = run.checkpoint_dir
        self.saver = AsyncSaver() if run.async_checkpoint else None
        self.last: str | None = None  # the newest checkpoint saved or resumed from
        self.copies: StateReplicator | None = None
        if run.replica_interval and send_copy is not None:
            world = engine.ctx.world_size
            self.copies = StateReplicator(
                engine,
                run.replica_interval,
                send_copy,
                losses.client_state_through,
                # A single worker's own copy dies with it: one buffer; with peers, the newest
                # complete copy must survive while the next is taken.
                generations=2 if world > 1 else 1,
                budget_bytes=copy_budget_bytes,
            )

    # ---- resume ------------------------------------------------------------------------------

    def resume(self, source: Resume) -> dict[str, Any]:
        """Load `source` into the engine (resharding to its layout); records the loss history
        the state has behind it; returns the sampler state to continue from (or {})."""
        if not source:
            return {}
        t0 = time.perf_counter()
        reader = _reader(source)
        glob = restore(self.engine, reader)
        self.metrics.checkpoint_loaded(time.perf_counter() - t0)
        if isinstance(source, str):
            self.last = source
        # Rolled-back steps are not in it: a resumed or resized run reports one history.
        history = ((reader.rank_state(0) or {}).get("client_state") or {}).get("losses")
        for step, loss in history or []:
            self.losses.record(int(step), float(loss))
        return dict(glob.get("sampler") or {})

    # ---- checkpoints on disk -----------------------------------------------------------------

    def due(self, step: int, max_steps: int) -> bool:
        interval = self.run.checkpoint_interval
        return bool(self.root and interval and step % interval == 0 and step < max_steps)

    def save(self, step: int, sampler: dict[str, Any]) -> str:
        """This rank's shard of the checkpoint of `step` (rank 0 commits it); its path."""
        assert self.root
        t0 = time.perf_counter()
        shard = capture(self.engine, sampler=sampler, client_state=self.losses.client_state())
        nbytes = sum(t.numel() * t.element_size() for r in shard.ranges for t in r.tensors.values())
        # The same id on every rank of this run and attempt: a step saved again after a
        # restart, or by another run in the same directory, can never commit a mix of the old
        # files and the new ones.
        save_id = checkpoint_save_id(self.run_id, self.attempt, step)
        if self.saver is not None:
            # capture() already copied to the host: the snapshot needs no second copy.
            self.saver.save(
                self.root, step, shard, keep_last=self.run.keep_last, save_id=save_id,
                copy_ranges=False,
            )  # fmt: skip
            path = os.path.join(self.root, f"step_{step:08d}")
        else:
            saved = save_shard(
                self.root, step, shard, keep_last=self.run.keep_last, save_id=save_id
            )
            path = str(saved)
        # With async saves this is the snapshot's time, not the write's.
        self.metrics.checkpoint_saved(time.perf_counter() - t0, nbytes)
        self.last = path
        return path

    def finish(self) -> None:
        """Wait for background writes (their errors surface here)."""
        if self.saver is not None:
            self.saver.wait()

    # ---- in memory ---------------------------------------------------------------------------

    def handover(self, sampler: dict[str, Any]) -> RankShard:
        """This rank's state for the group that follows a planned pause (a resize)."""
        return capture(self.engine, sampler=sampler, client_state=self.losses.client_state())

    def copy_ready(self, at: int, step_seconds: float) -> bool:
        """This rank's vote: could an in-memory copy start at step `at`?"""
        return self.copies is not None and self.copies.ready(at, step_seconds)

    def copy(self, step: int, sampler: dict[str, Any]) -> None:
        if self.copies is not None:
            self.copies.capture(step, sampler)

    def snapshots(self) -> list[tuple[int, PackedShard]]:
        return self.copies.snapshots() if self.copies is not None else []

    def close(self) -> None:
        if self.copies is not None:
            self.copies.close()


def _reader(source: Resume) -> Any:
    """A RangeReader over a checkpoint on disk or shards handed over in memory."""
    from zray.checkpoint.memory import MemoryReader
    from zray.checkpoint.reader import CheckpointReader

    if isinstance(source, str):
        return CheckpointReader(source)
    assert source is not None
    shards: list[Any] = []
    for item in source:  # shards, or lists of them
        shards.extend(item if isinstance(item, list) else [item])
    return MemoryReader([s.unpack() if isinstance(s, PackedShard) else s for s in shards])

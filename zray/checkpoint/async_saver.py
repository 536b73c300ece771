"""Checkpoint in the background: snapshot the shard now, write it while training goes on.

Memory cost: one CPU copy of the rank's shard per save in flight: every range tensor (fp32
master + optimizer state: with Adam 12 bytes per element the rank holds) and the state's
tensors. At most one save is in flight (a second save waits for the first), so the cost is one
copy. A shard whose range tensors are already private copies (engine_state.capture makes them)
can skip this copy: `save(..., copy_ranges=False)`.

Time cost on the training thread: the copy itself (a memcpy for CPU tensors; a device-to-host
copy, which syncs with the device, for GPU ones) and, if the previous save has not finished,
the wait for it. The writing thread competes for CPU (hashing) and disk bandwidth.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zray.checkpoint.shard import ParamRange, RankShard
from zray.checkpoint.writer import save_shard


def snapshot(shard: RankShard, copy_ranges: bool = True) -> RankShard:
    """A deep copy of `shard` whose tensors are private CPU copies: training may change its
    tensors (in place) right after this returns without changing what is saved.

    copy_ranges=False keeps the range tensors themselves (the caller promises they are private
    already, as engine_state.capture's are) and copies only the small non-tensor state.
    """
    if copy_ranges:
        ranges = [
            ParamRange(
                r.name, tuple(r.shape), r.lo, r.hi, {k: _copy(t) for k, t in r.tensors.items()}
            )
            for r in shard.ranges
        ]
    else:
        ranges = list(shard.ranges)
    return replace(
        shard,
        ranges=ranges,
        group_scalars=_deep(shard.group_scalars),
        param_groups=_deep(shard.param_groups),
        engine=_deep(shard.engine),
        sampler=_deep(shard.sampler),
        rng=_deep(shard.rng),
        client_state=_deep(shard.client_state),
    )


def _copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone()
    return t.to("cpu")  # host-device sync: the copy must be complete before training goes on


def _deep(obj: Any) -> Any:
    # Containers are rebuilt and tensors copied; other values are immutable in practice (the
    # state codec accepts only plain data, numpy arrays excepted, which are copied).
    if isinstance(obj, torch.Tensor):
        return _copy(obj)
    if isinstance(obj, dict):
        return {k: _deep(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_deep(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return obj


class AsyncSaver:
    """One rank's background checkpoint writer.

    `save()` takes a snapshot and returns; a thread runs `save_shard` on it. `wait()` blocks
    until that save is done and re-raises its exception, if any (once: the error is then
    cleared, so a later save can be tried). `save()` begins with `wait()`: a failed save is
    reported, at the latest, by the next save call. Call `wait()` before the process exits to
    learn whether the last save succeeded (the thread is not a daemon: an interpreter exit waits
    for it rather than dropping a half-written checkpoint).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Path | None = None
        self._error: BaseException | None = None

    def save(
        self,
        root: Path | str,
        step: int,
        shard: RankShard,
        *,
        keep_last: int | None = None,
        commit_timeout: float = 600.0,
        save_id: str | None = None,
        verify: bool = True,
        copy_ranges: bool = True,
    ) -> None:
        """Snapshot `shard` and start writing it (see save_shard for the other arguments).

        copy_ranges=False skips the copy of the range tensors, saving one CPU copy of the shard,
        when the caller will never modify them (a shard built fresh for this save).
        """
        self.wait()
        snap = snapshot(shard, copy_ranges)
        kwargs = {
            "keep_last": keep_last,
            "commit_timeout": commit_timeout,
            "save_id": save_id,
            "verify": verify,
        }
        self._thread = threading.Thread(
            target=self._run,
            args=(root, step, snap, kwargs),
            name=f"zray-checkpoint-rank{shard.rank}-step{step}",
        )
        self._thread.start()

    def _run(self, root: Path | str, step: int, shard: RankShard, kwargs: dict[str, Any]) -> None:
        try:
            self._result = save_shard(root, step, shard, **kwargs)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is done; return its step dir or raise its
        error. None when no save was started since the last wait."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        result, error = self._result, self._error
        self._result = self._error = None
        if error is not None:
            raise error
        return result

"""Save one rank's shard; rank 0 also commits the checkpoint. No collectives.

Every rank calls `save_shard` with its own RankShard, in any order, possibly from a background
thread while training goes on (see async_saver.py): nothing here touches torch.distributed.
The ranks meet only through the filesystem:

  1. every rank removes the step dir's COMMITTED marker (if this step was saved before: a crash
     while the files are rewritten must leave an uncommitted dir, never a mixed committed one)
     and its own old piece,
  2. writes its safetensors file (range tensors + state tensors), atomically, hashing on the way,
  3. writes its piece `shard_{rank:05d}.json` (ranges, file hash, JSON-encoded state): the
     piece's existence says "this rank is done",
  4. rank 0 then waits for every piece and commits (commit.py): verify, check coverage, write
     manifest.json, COMMITTED, `latest`, and prune old checkpoints.

Cost per rank: one streaming write of its shard (no in-memory copy of the file); rank 0 reads
every rank's file once more to verify its hash before committing (verify=False skips that; the
hashes are then checked only by readers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from zray.checkpoint import commit as _commit
from zray.checkpoint.atomic import write_json_atomic
from zray.checkpoint.atomic_stream import remove_durably
from zray.checkpoint.format import (
    COMMITTED,
    FORMAT,
    STATE_PREFIX,
    data_file_name,
    piece_name,
    range_tensor_key,
    step_dir_name,
)
from zray.checkpoint.safetensors_io import TensorSpec, write_safetensors
from zray.checkpoint.shard import RankShard
from zray.checkpoint.state_codec import encode
from zray.checkpoint.tp_read import tp_json

# Non-tensor state every rank saves, and what rank 0 adds (identical on all ranks: saved once).
_RANK_SECTIONS = ("group_scalars", "param_groups", "rng", "client_state")
_GLOBAL_SECTIONS = ("engine", "sampler", "tied")


def save_shard(
    root: Path | str,
    step: int,
    shard: RankShard,
    *,
    keep_last: int | None = None,
    commit_timeout: float = 600.0,
    save_id: str | None = None,
    verify: bool = True,
) -> Path:
    """Write `shard` into `root/step_{step:08d}/`; on rank 0 also commit. Returns the step dir.

    Rank 0 returns once the checkpoint is committed (or raises: CheckpointCommitTimeout naming
    the ranks whose pieces never came within `commit_timeout` seconds, CheckpointCorruptError,
    CheckpointFormatError when the ranges do not cover the parameters). Other ranks return once
    their own files are durable: their save is not yet committed then.

    keep_last: after committing, rank 0 deletes all but the `keep_last` most recently committed
        checkpoints, and uncommitted step dirs of lower steps (leftovers of failed saves).
    save_id: a token identical on every rank for this save and different from any earlier save
        of the same step (e.g. the controller's attempt number). Rank 0 commits only pieces that
        carry it. Without it, re-saving a step whose earlier pieces are still on disk can commit
        an old piece of a rank that has not yet started its new save; pass one whenever a step
        may be saved twice (a restart that replays steps).
    verify: rank 0 re-reads every file to check its hash before committing.
    """
    _check_args(step, shard, keep_last, commit_timeout)
    step_dir = Path(root) / step_dir_name(step)
    step_dir.mkdir(parents=True, exist_ok=True)
    # Un-commit first, then drop this rank's old piece: from here on, until rank 0 commits
    # again, the dir is an incomplete save that no reader loads.
    remove_durably(step_dir / COMMITTED)
    remove_durably(step_dir / piece_name(shard.rank))

    specs, tensors, ranges_json = _range_tensors(shard)
    state_tensors: dict[str, torch.Tensor] = {}
    state = _encode_state(shard, state_tensors)
    for key, t in state_tensors.items():
        specs.append(TensorSpec(key, t.dtype, tuple(t.shape)))
        tensors.append(t)
    # Widest dtypes first keeps every tensor's data aligned to its element size in the file.
    order = sorted(range(len(specs)), key=lambda i: -specs[i].dtype.itemsize)
    file_name = data_file_name(shard.rank, shard.world_size)
    sha, nbytes = write_safetensors(
        step_dir / file_name,
        [specs[i] for i in order],
        (tensors[i] for i in order),
        metadata={"format": FORMAT, "step": str(step), "rank": str(shard.rank)},
    )
    piece = {
        "format": FORMAT,
        "step": step,
        "rank": shard.rank,
        "world_size": shard.world_size,
        "zero_stage": shard.zero_stage,
        "tp_size": shard.tp_size,
        "save_id": save_id,
        "file": file_name,
        "sha256": sha,
        "bytes": nbytes,
        "ranges": ranges_json,
        "state": state,
        "pid": os.getpid(),  # for people reading a stuck save's leftovers
    }
    write_json_atomic(step_dir / piece_name(shard.rank), piece)
    if shard.rank == 0:
        _commit.commit(
            Path(root),
            step_dir,
            piece,
            timeout=commit_timeout,
            verify=verify,
            keep_last=keep_last,
        )
    return step_dir


def _check_args(step: int, shard: RankShard, keep_last: int | None, commit_timeout: float) -> None:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: got {step!r}; allowed: an int >= 0")
    if shard.world_size < 1 or not 0 <= shard.rank < shard.world_size:
        raise ValueError(
            f"shard.rank / shard.world_size: got rank {shard.rank}, world size "
            f"{shard.world_size}; allowed: 0 <= rank < world_size"
        )
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last: got {keep_last!r}; allowed: None or an int >= 1")
    if commit_timeout <= 0:
        raise ValueError(f"commit_timeout: got {commit_timeout!r}; allowed: seconds > 0")


def _range_tensors(
    shard: RankShard,
) -> tuple[list[TensorSpec], list[torch.Tensor], list[dict[str, Any]]]:
    specs: list[TensorSpec] = []
    tensors: list[torch.Tensor] = []
    ranges_json: list[dict[str, Any]] = []
    seen: set[tuple[str, int, int]] = set()
    for r in shard.ranges:
        # One rank holds one slice of a parameter, so (name, lo, hi) names a range in its file.
        if (r.name, r.lo, r.hi) in seen:
            raise ValueError(
                f"rank {shard.rank}: parameter {r.name!r} range [{r.lo}, {r.hi}) appears twice "
                "in one shard"
            )
        seen.add((r.name, r.lo, r.hi))
        dtypes: dict[str, str] = {}
        for key in sorted(r.tensors):
            t = r.tensors[key]
            if not t.is_floating_point():
                raise ValueError(
                    f"rank {shard.rank}: parameter {r.name!r} range [{r.lo}, {r.hi}) key "
                    f"{key!r}: dtype {t.dtype}; allowed: floating point (fp32 expected)"
                )
            specs.append(
                TensorSpec(range_tensor_key(r.name, r.lo, r.hi, key), t.dtype, (r.hi - r.lo,))
            )
            tensors.append(t.reshape(-1))
            dtypes[key] = str(t.dtype).removeprefix("torch.")
        entry: dict[str, Any] = {
            "name": r.name,
            "shape": list(r.shape),
            "lo": r.lo,
            "hi": r.hi,
            "keys": sorted(r.tensors),
            "dtypes": dtypes,
        }
        if r.tp is not None:
            # The slice's place in the full tensor (full shape: "shape"); lo / hi index the slice.
            entry["tp"] = tp_json(r.tp)
        ranges_json.append(entry)
    return specs, tensors, ranges_json


def _encode_state(shard: RankShard, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    sections = _RANK_SECTIONS + (_GLOBAL_SECTIONS if shard.rank == 0 else ())
    return {s: encode(getattr(shard, s), f"{STATE_PREFIX}{s}", tensors) for s in sections}

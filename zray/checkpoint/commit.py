"""Rank 0's commit: wait for every rank's piece, verify, write the manifest, then COMMITTED.

The order is what makes a checkpoint all-or-nothing: COMMITTED is written (atomically) only
after every file it vouches for is durable, and it records the manifest's hash and a commit
sequence number. Readers load only committed dirs and pick the highest sequence (not the
highest step: a job that went back to an older checkpoint and saves again has a newer
checkpoint at a lower step). `latest` is updated after COMMITTED, as a hint.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from zray.checkpoint.atomic import write_bytes_atomic, write_json_atomic
from zray.checkpoint.atomic_stream import remove_durably
from zray.checkpoint.coverage import select_ranges
from zray.checkpoint.format import (
    COMMITTED,
    FORMAT,
    LATEST,
    MANIFEST,
    CheckpointCommitTimeout,
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointWarning,
    committed_dirs,
    parse_step_dir_name,
    piece_name,
    sha256_file,
    sha256_files,
)

# Polling for the other ranks' pieces starts fast (ranks usually finish together) and backs
# off to this interval, so a long wait costs a few stat() calls per second at most.
_MAX_POLL_S = 0.5


def commit(
    root: Path,
    step_dir: Path,
    piece0: dict[str, Any],
    *,
    timeout: float,
    verify: bool,
    keep_last: int | None,
) -> None:
    pieces = _wait_for_pieces(step_dir, piece0, timeout)
    files: dict[str, dict[str, Any]] = {}
    paths = [step_dir / p["file"] for p in pieces]
    actual = sha256_files(paths) if verify else [p["sha256"] for p in pieces]
    for p, path, sha in zip(pieces, paths, actual, strict=True):
        if sha != p["sha256"]:
            raise CheckpointCorruptError(path, p["sha256"], sha)
        files[p["file"]] = {"sha256": p["sha256"], "bytes": p["bytes"]}
        piece_path = step_dir / piece_name(p["rank"])
        files[piece_path.name] = {
            "sha256": sha256_file(piece_path),
            "bytes": piece_path.stat().st_size,
        }

    params, chosen, layouts = select_ranges(str(step_dir), pieces)
    step = piece0["step"]
    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": piece0["world_size"],
        "zero_stage": piece0["zero_stage"],
        # Tensor slicing: the saving job's tp size, and how each sliced parameter was cut (its
        # ranges index slices, see coverage.py); readers at any tp size map through these.
        "tp_size": piece0.get("tp_size", 1),
        "tp_layouts": layouts,
        "save_id": piece0["save_id"],
        # A list, not a dict: the JSON writer sorts dict keys, and this order is worth keeping
        # (first appearance in rank order, which follows the model's order within each unit).
        "params": [[name, list(shape)] for name, shape in params],
        "ranges": [s.to_json() for s in chosen],
        "ranks": [
            {"rank": p["rank"], "file": p["file"], "piece": piece_name(p["rank"])} for p in pieces
        ],
        "files": files,
        # Engine and sampler state as rank 0 encoded them; their tensors live in rank 0's file.
        "engine": piece0["state"]["engine"],
        "sampler": piece0["state"]["sampler"],
        # Further names of tied parameters -> the saved name (absent before 2026-12-07).
        "tied": piece0["state"].get("tied") or {},
    }
    write_json_atomic(step_dir / MANIFEST, manifest)
    marker = {
        "format": FORMAT,
        "step": step,
        "sequence": _next_sequence(root, step_dir.name),
        "manifest_sha256": sha256_file(step_dir / MANIFEST),
        "time": time.time(),  # for people; ordering uses `sequence`
    }
    write_json_atomic(step_dir / COMMITTED, marker)
    write_bytes_atomic(root / LATEST, step_dir.name.encode())
    if keep_last is not None:
        prune(root, keep_last, keep=step_dir)


def _wait_for_pieces(
    step_dir: Path, piece0: dict[str, Any], timeout: float
) -> list[dict[str, Any]]:
    """Every rank's piece of this save, in rank order; stale pieces (an earlier save of the same
    step dir: other world size or save_id) are waited past, since their rank may rewrite them."""
    world = piece0["world_size"]
    got: dict[int, dict[str, Any]] = {0: piece0}
    start = time.monotonic()
    delay = 0.005
    while True:
        why: dict[int, str] = {}
        for r in range(world):
            if r in got:
                continue
            path = step_dir / piece_name(r)
            try:
                p = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:  # atomic writes make this rare: a foreign file
                why[r] = f"{path.name} unreadable: {e}"
                continue
            stale = _stale_reason(p, piece0)
            if stale:
                why[r] = f"{path.name} is from another save ({stale})"
                continue
            if p["zero_stage"] != piece0["zero_stage"]:
                raise CheckpointFormatError(
                    f"{path}: rank {r} saved ZeRO stage {p['zero_stage']}, rank 0 stage "
                    f"{piece0['zero_stage']}; all ranks of one save must agree"
                )
            got[r] = p
        if len(got) == world:
            return [got[r] for r in range(world)]
        waited = time.monotonic() - start
        if waited >= timeout:
            missing = [r for r in range(world) if r not in got]
            raise CheckpointCommitTimeout(step_dir, missing, waited, "; ".join(why.values()))
        time.sleep(min(delay, max(timeout - waited, 0.0)))
        delay = min(delay * 2, _MAX_POLL_S)


def _stale_reason(p: dict[str, Any], piece0: dict[str, Any]) -> str:
    for field in ("format", "step", "world_size", "save_id"):
        if p.get(field) != piece0[field]:
            return f"{field} {p.get(field)!r}, this save has {piece0[field]!r}"
    return ""


def _next_sequence(root: Path, this_dir: str) -> int:
    seqs = [seq for seq, _, d in committed_dirs(root) if d.name != this_dir]
    return max(seqs, default=0) + 1


def prune(root: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the `keep_last` newest committed checkpoints (never `keep`), and
    uncommitted step dirs of steps below `keep`'s: leftovers of failed saves. An uncommitted dir
    of a higher step may be a save in progress and is left alone.

    Failures to delete are warnings: the new checkpoint is committed whatever happens here.
    """
    committed = committed_dirs(root)
    doomed = [d for _, _, d in committed[keep_last:] if d != keep]
    keep_step = parse_step_dir_name(keep.name)
    assert keep_step is not None
    committed_names = {d.name for _, _, d in committed}
    for d in root.iterdir():
        step = parse_step_dir_name(d.name)
        if step is not None and step < keep_step and d.is_dir() and d.name not in committed_names:
            doomed.append(d)
    for d in doomed:
        try:
            # Un-commit before deleting: a crash halfway leaves an uncommitted dir, not a
            # committed one with files missing.
            remove_durably(d / COMMITTED)
            shutil.rmtree(d)
        except OSError as e:
            warnings.warn(
                f"{d}: could not delete old checkpoint (keep_last={keep_last}): {e}",
                CheckpointWarning,
                stacklevel=2,
            )

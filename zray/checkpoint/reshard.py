"""Rewrite a committed checkpoint for another world size, offline: `zray checkpoint reshard`.

Loading never needs this: a loader at any world size asks the reader for the ranges its rank
owns, whatever layout saved them. What a reshard buys is file layout: N files to read in parallel
(one per reader), or smaller per-rank files than the saving job wrote. The output is an ordinary
committed checkpoint at the same step, so it loads anywhere the input did.

Layout of the output: every parameter's flat range [0, numel) is split into `world_size`
contiguous pieces whose sizes differ by at most one (the first numel % world_size ranks get one
more element, so rank 0 always holds the start of every parameter and the manifest keeps the
input's parameter order). Each piece carries every key the input holds over that whole parameter
(master and the optimizer's element-wise state). A parameter with fewer elements than ranks
leaves the last ranks without a piece of it.

Non-tensor state: engine and sampler (global) come from the input as rank 0 saved them. Per-rank
state (optimizer scalars, param-group hyperparameters, RNG, client state) is copied for ranks
that existed in the input; a new rank beyond the input's world gets rank 0's state without its
RNG (one RNG stream copied onto two ranks would make their dropout masks identical; with no RNG
saved, the loader leaves that rank's generator as it is).

Memory: the new ranks are built and written one at a time (ranks 1..N-1, then rank 0, whose
save commits after finding the others' pieces already on disk). save_shard takes a complete
RankShard, so the peak is one new rank's tensors: about total_elements x keys x 4 bytes / N
(fp32; Adam: 3 keys), plus that rank's non-tensor state, the hashing buffers (8 MiB per file
hashed at once; up to 64 MiB while rank 0 verifies the files before committing), and the input
files' mmaps (page cache, shared and reclaimable, though counted in RSS). At N = 1 that is the
whole model's master and optimizer state once.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from zray.checkpoint.format import numel, step_dir_name
from zray.checkpoint.reader import CheckpointReader
from zray.checkpoint.shard import ParamRange, RankShard
from zray.checkpoint.writer import save_shard


def even_split(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s piece [lo, hi) of n elements split into `world_size` contiguous pieces
    whose sizes differ by at most one, the larger ones first (numpy's array_split rule)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def reshard(step_dir: Path | str, out_root: Path | str, world_size: int) -> Path:
    """Write the committed checkpoint `step_dir` as a `world_size`-rank checkpoint at the same
    step under `out_root` (committed, so loaders find it). Returns the new step dir.

    Raises ValueError for a bad world_size, or when the output step dir already exists (it
    might be the input, or a checkpoint someone still needs: never overwritten); the reader's
    CheckpointFormatError / CheckpointCorruptError when the input is incomplete or corrupt
    (every input file is hashed once, when first read).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: got {world_size!r}; allowed: an int >= 1")
    with CheckpointReader(step_dir) as reader:
        out_dir = Path(out_root) / step_dir_name(reader.step)
        if out_dir.exists():
            raise ValueError(
                f"out_root: {out_dir} already exists; allowed: a root without a "
                f"{out_dir.name} dir (the input is {reader.path}; remove the old output or "
                "choose another root)"
            )
        params = reader.params()
        keys = {name: sorted(reader.keys(name)) for name in params}
        glob = reader.global_state()
        rank0 = reader.rank_state(0) or {}
        # One token for all pieces of this save: rank 0 commits only pieces that carry it.
        save_id = f"reshard-{uuid.uuid4().hex}"
        # Rank 0 last: its save_shard waits for every other piece, then commits.
        for rank in [*range(1, world_size), 0]:
            mine = reader.rank_state(rank)
            if mine is None:
                mine = {**rank0, "rng": {}}
            shard = RankShard(
                rank=rank,
                world_size=world_size,
                zero_stage=reader.zero_stage,
                ranges=_ranges(reader, params, keys, world_size, rank),
                group_scalars=mine.get("group_scalars") or [],
                param_groups=mine.get("param_groups") or [],
                engine=glob["engine"] if rank == 0 else {},
                sampler=glob["sampler"] if rank == 0 else None,
                tied=glob.get("tied") or {},
                rng=mine.get("rng") or {},
                client_state=mine.get("client_state") or {},
            )
            save_shard(out_root, reader.step, shard, save_id=save_id)
            del shard  # drop this rank's tensors before the next rank's are read
    return out_dir


def _ranges(
    reader: CheckpointReader,
    params: dict[str, tuple[int, ...]],
    keys: dict[str, list[str]],
    world_size: int,
    rank: int,
) -> list[ParamRange]:
    out: list[ParamRange] = []
    for name, shape in params.items():
        lo, hi = even_split(numel(shape), world_size, rank)
        if lo == hi:
            continue  # fewer elements than ranks: this rank holds none of this parameter
        # Each read is a fresh fp32 [hi - lo] tensor, assembled from whichever saved ranges
        # overlap; it becomes the shard's tensor as is (no second copy).
        tensors: dict[str, torch.Tensor] = {k: reader.read(name, lo, hi, k) for k in keys[name]}
        out.append(ParamRange(name, shape, lo, hi, tensors))
    return out

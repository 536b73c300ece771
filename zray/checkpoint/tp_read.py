"""Read a flat range of one tensor-parallel layout from ranges saved in another.

A checkpoint stores each sliced parameter as the saving ranks' slices (flat ranges of each tp
rank's local tensor) with the `TPSlice` that places them in the full tensor; replicated
parameters as flat ranges of the full tensor. The full tensor is the canonical index space: a
loader asks for a flat range of *its* slice (or of the full tensor), each position is mapped to
its full position, then to the saved rank and local position holding it. Same layout on both
sides (same tp size) short-cuts to a plain range read, as before tensor slicing existed.

Cost of a changed layout: per saved tp rank, one read of the contiguous saved range covering
the positions needed from it (for a dim-1 slice that is nearly the rank's whole requested rows),
plus int64 index tensors of the request's size: about 3 x 8 bytes per element requested.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zray.parallel.tp_slice import TPSlice

# (saved tp rank, or None for a parameter saved whole; lo; hi) -> fp32 [hi - lo], the saved
# rank's local flat positions [lo, hi).
SavedRead = Callable[[int | None, int, int], torch.Tensor]


def read_mapped(
    saved: TPSlice | None, want: TPSlice | None, lo: int, hi: int, read_saved: SavedRead
) -> torch.Tensor:
    """Flat positions [lo, hi) of `want`'s slice (of the full tensor when None), fp32 [hi - lo],
    from a parameter saved with layout `saved` (whole when None). The callers check that both
    describe the same full shape."""
    if saved is None and want is None:
        return read_saved(None, lo, hi)
    if saved is not None and want is not None and saved.same_layout(want):
        return read_saved(want.rank, lo, hi)
    if hi <= lo:
        return torch.empty(0, dtype=torch.float32)
    full = want.local_to_full(lo, hi) if want is not None else torch.arange(lo, hi)
    if saved is None:
        return _gather(read_saved, None, full)
    owner, local = saved.full_to_local(full)
    out = torch.empty(hi - lo, dtype=torch.float32)
    for r in owner.unique().tolist():
        sel = (owner == r).nonzero().squeeze(1)
        out[sel] = _gather(read_saved, r, local[sel])
    return out


def _gather(read_saved: SavedRead, rank: int | None, positions: torch.Tensor) -> torch.Tensor:
    a, b = int(positions.min()), int(positions.max()) + 1
    return read_saved(rank, a, b)[positions - a]


def tp_json(spec: TPSlice) -> dict[str, int]:
    """How a piece or manifest records a slice (the full shape is recorded beside it)."""
    return {"dim": spec.dim, "size": spec.size, "rank": spec.rank, "parts": spec.parts}


def tp_from_json(d: dict[str, Any], full_shape: tuple[int, ...], rank: int = 0) -> TPSlice:
    """The TPSlice of a recorded slice layout, for `rank` (a manifest's layout has no rank)."""
    return TPSlice(int(d["dim"]), int(d["size"]), rank, tuple(full_shape), int(d["parts"]))

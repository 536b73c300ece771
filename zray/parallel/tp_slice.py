"""`TPSlice`: which part of a full parameter one tensor-parallel rank holds, and the index maps.

Pure bookkeeping (no communication, no modules): the sliced layers mark their parameters with
it, and checkpoints record it, so a tensor saved at one tensor-parallel size can be cut for
another. Positions are flat element indices in row-major order, of the full tensor ("full") or
of one rank's slice ("local").

[Note: the layout] The full tensor's dimension `dim` (length n) is `parts` equal blocks laid end
to end (3 for a fused [q; k; v] projection, otherwise 1); each block is cut in `size` equal
pieces and rank r holds piece r of every block, concatenated in block order. So position i
along `dim` belongs to rank (i % block) // piece, at local position
(i // block) * piece + i % piece, where block = n / parts and piece = block / size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TPSlice"]


@dataclass(frozen=True)
class TPSlice:
    """Which slice of a full parameter a rank holds (see the Note on the layout)."""

    dim: int
    size: int
    rank: int
    full_shape: tuple[int, ...]
    parts: int = 1

    def __post_init__(self) -> None:
        assert 0 <= self.dim < len(self.full_shape), (self.dim, self.full_shape)
        assert 0 <= self.rank < self.size, (self.rank, self.size)
        assert self.full_shape[self.dim] % (self.parts * self.size) == 0, self

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] //= self.size
        return tuple(shape)

    def same_layout(self, other: TPSlice) -> bool:
        """Whether `other` cuts the same full tensor the same way (whatever the rank)."""
        return (self.dim, self.size, self.parts, self.full_shape) == (
            other.dim,
            other.size,
            other.parts,
            other.full_shape,
        )

    def indices(self, rank: int | None = None) -> torch.Tensor:
        """Positions along `dim` of the full tensor that `rank`'s slice holds, in its order."""
        r = self.rank if rank is None else rank
        block = self.full_shape[self.dim] // self.parts
        piece = block // self.size
        return torch.cat(
            [
                torch.arange(j * block + r * piece, j * block + (r + 1) * piece)
                for j in range(self.parts)
            ]
        )

    def take(self, full: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """This rank's (or `rank`'s) slice of the full tensor, as a new tensor."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(
                f"TPSlice.take: got shape {list(full.shape)}, expected {list(self.full_shape)}"
            )
        return full.index_select(self.dim, self.indices(rank).to(full.device))

    def assemble(self, slices: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's slice, given in group-rank order."""
        if len(slices) != self.size:
            raise ValueError(f"TPSlice.assemble: got {len(slices)} slices, expected {self.size}")
        out = slices[0].new_empty(self.full_shape)
        for r, s in enumerate(slices):
            out.index_copy_(self.dim, self.indices(r).to(out.device), s)
        return out

    # ---- flat positions (checkpoints address tensors by flat element ranges) ------------------

    def _dims(self) -> tuple[int, int, int, int]:
        """(n along dim, elements after dim, block, piece)."""
        n = self.full_shape[self.dim]
        inner = 1
        for d in self.full_shape[self.dim + 1 :]:
            inner *= d
        block = n // self.parts
        return n, inner, block, block // self.size

    def local_to_full(self, lo: int, hi: int) -> torch.Tensor:
        """Full flat positions of this rank's local flat positions [lo, hi): int64 [hi - lo]."""
        n, inner, block, piece = self._dims()
        n_local = n // self.size
        pos = torch.arange(lo, hi, dtype=torch.int64)
        outer, rest = pos // (n_local * inner), pos % (n_local * inner)
        li, e = rest // inner, rest % inner
        i = (li // piece) * block + self.rank * piece + li % piece
        return (outer * n + i) * inner + e

    def full_to_local(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owning rank, local flat position in that rank's slice) of full flat positions."""
        n, inner, block, piece = self._dims()
        n_local = n // self.size
        outer, rest = full // (n * inner), full % (n * inner)
        i, e = rest // inner, rest % inner
        owner = (i % block) // piece
        li = (i // block) * piece + i % piece
        return owner, (outer * n_local + li) * inner + e

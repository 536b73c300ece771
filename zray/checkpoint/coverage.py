"""Which saved range to read for each element: the check rank 0 runs before committing.

Rule: the "master" ranges of all ranks together cover every element of every parameter exactly
once. A tensor-sliced parameter counts as its `size` slices, each covered on its own (ranges
index the slice), and every rank must have sliced it the same way (dim, size, parts). Ranges may overlap only when they are the same range (stage 0: every rank holds whole
parameters); then one copy is chosen, the lowest rank's, and the others are never read. The
check is pure bookkeeping on (lo, hi) pairs: no tensors are read.

Cost of the rule at stage 0: every rank writes a full copy, and world_size - 1 of them are dead
weight on disk. An engine can avoid that by saving ranges only from rank 0 at stage 0 (the other
ranks pass no ranges, still their RNG and client state): the union is then rank 0's copy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zray.checkpoint.format import CheckpointFormatError, numel
from zray.checkpoint.shard import MASTER

# Problems listed in one error; the rest are counted (a broken layout can produce thousands).
_MAX_PROBLEMS = 12


@dataclass(frozen=True)
class SavedRange:
    """One range as the manifest records it: where to read it from."""

    name: str
    lo: int
    hi: int
    rank: int  # the rank whose file holds the copy that is read
    keys: tuple[str, ...]  # sorted
    dtypes: dict[str, str]
    tp_rank: int | None = None  # the slice [lo, hi) indexes; None: the whole parameter

    def to_json(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "lo": self.lo,
            "hi": self.hi,
            "rank": self.rank,
            "keys": list(self.keys),
            "dtypes": dict(self.dtypes),
        }
        if self.tp_rank is not None:
            d["tp_rank"] = self.tp_rank
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> SavedRange:
        tp_rank = d.get("tp_rank")
        return SavedRange(
            d["name"],
            int(d["lo"]),
            int(d["hi"]),
            int(d["rank"]),
            tuple(d["keys"]),
            d["dtypes"],
            None if tp_rank is None else int(tp_rank),
        )


# A parameter's slice layout as the manifest records it ({"dim", "size", "parts"}), or None.
Layout = dict[str, int] | None


def _layout_of(r: dict[str, Any]) -> tuple[Layout, int | None]:
    """(layout without the rank, tp rank) of one range entry of a piece."""
    tp = r.get("tp")
    if tp is None:
        return None, None
    return {k: int(tp[k]) for k in ("dim", "size", "parts")}, int(tp["rank"])


def _slice_numel(shape: tuple[int, ...], layout: Layout) -> int:
    n = numel(shape)
    return n if layout is None else n // layout["size"]


def select_ranges(
    where: str, pieces: list[dict[str, Any]]
) -> tuple[list[tuple[str, tuple[int, ...]]], list[SavedRange], dict[str, dict[str, int]]]:
    """Check the ranks' ranges and choose one copy per range.

    `pieces[r]["ranges"]` are rank r's ranges as its piece records them ({"name", "shape", "lo",
    "hi", "keys", "dtypes"}, and "tp" {"dim", "size", "rank", "parts"} for a slice). Returns the
    parameters with their full shapes (in order of first appearance, scanning ranks in order),
    the chosen ranges sorted by parameter, slice, then lo, and the slice layout of every sliced
    parameter. Raises CheckpointFormatError listing the problems; `where` (the step dir)
    prefixes it.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    layouts: dict[str, Layout] = {}
    by_slice: dict[tuple[str, int | None], list[SavedRange]] = {}
    problems: list[str] = []
    for rank, piece in enumerate(pieces):
        for r in piece["ranges"]:
            name, shape = r["name"], tuple(int(d) for d in r["shape"])
            layout, tp_rank = _layout_of(r)
            if name not in shapes:
                shapes[name], layouts[name] = shape, layout
            elif shapes[name] != shape:
                problems.append(
                    f"parameter {name!r}: rank {rank} saved shape {list(shape)}, an earlier rank "
                    f"{list(shapes[name])}"
                )
                continue
            elif layouts[name] != layout:
                problems.append(
                    f"parameter {name!r}: rank {rank} saved it sliced as {layout}, an earlier rank "
                    f"as {layouts[name]} (None: whole); every rank must slice it alike"
                )
                continue
            by_slice.setdefault((name, tp_rank), []).append(
                SavedRange(
                    name,
                    int(r["lo"]),
                    int(r["hi"]),
                    rank,
                    tuple(sorted(r["keys"])),
                    dict(r["dtypes"]),
                    tp_rank,
                )
            )

    chosen: list[SavedRange] = []
    for name, layout in layouts.items():
        slices = [None] if layout is None else list(range(layout["size"]))
        for tp_rank in slices:
            what = name if tp_rank is None else f"{name} (tp slice {tp_rank} of {layout['size']})"
            n_elem = _slice_numel(shapes[name], layout)
            ranges = by_slice.get((name, tp_rank), [])
            chosen += _cover(what, shapes[name], n_elem, ranges, problems)
    if problems:
        shown = "\n  ".join(problems[:_MAX_PROBLEMS])
        more = len(problems) - _MAX_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise CheckpointFormatError(
            f"{where}: the ranks' saved ranges do not cover every parameter element exactly once "
            f"(not committing):\n  {shown}{tail}"
        )
    params = list(shapes.items())
    return params, chosen, {n: lay for n, lay in layouts.items() if lay is not None}


def _cover(
    what: str,
    shape: tuple[int, ...],
    n_elem: int,
    ranges: list[SavedRange],
    problems: list[str],
) -> list[SavedRange]:
    """One copy of each range of one parameter (or one slice of it) covering [0, n_elem)."""
    chosen: list[SavedRange] = []
    ranges.sort(key=lambda s: (s.lo, s.hi, s.rank))
    pos = 0
    prev: SavedRange | None = None
    for s in ranges:
        if prev is not None and (s.lo, s.hi) == (prev.lo, prev.hi):
            # An identical copy (stage 0): the lower rank's copy, already chosen, is read.
            if s.keys != prev.keys:
                problems.append(
                    f"parameter {what!r} range [{s.lo}, {s.hi}): rank {prev.rank} saved keys "
                    f"{list(prev.keys)}, rank {s.rank} saved {list(s.keys)}; copies of one "
                    "range must hold the same keys"
                )
            continue
        if MASTER not in s.keys:
            problems.append(
                f"parameter {what!r} range [{s.lo}, {s.hi}) from rank {s.rank} has no "
                f"{MASTER!r} tensor (keys {list(s.keys)})"
            )
        if s.hi > n_elem:
            problems.append(
                f"parameter {what!r} of shape {list(shape)} ({n_elem} elements): range "
                f"[{s.lo}, {s.hi}) from rank {s.rank} runs past its end"
            )
        if s.lo > pos:
            problems.append(f"parameter {what!r}: elements [{pos}, {s.lo}) saved by no rank")
        elif s.lo < pos:
            assert prev is not None
            problems.append(
                f"parameter {what!r}: range [{s.lo}, {s.hi}) from rank {s.rank} overlaps "
                f"[{prev.lo}, {prev.hi}) from rank {prev.rank}; ranges may overlap only when "
                "identical"
            )
        chosen.append(s)
        pos = max(pos, s.hi)
        prev = s
    if pos < n_elem:
        problems.append(
            f"parameter {what!r} of shape {list(shape)}: elements [{pos}, {n_elem}) saved by no "
            "rank"
        )
    return chosen

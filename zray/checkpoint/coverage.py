"""Which saved range to read for each element: the check rank 0 runs before committing.

Rule: the "master" ranges of all ranks together cover every element of every parameter exactly
once. Ranges may overlap only when they are the same range (stage 0: every rank holds whole
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

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lo": self.lo,
            "hi": self.hi,
            "rank": self.rank,
            "keys": list(self.keys),
            "dtypes": dict(self.dtypes),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> SavedRange:
        return SavedRange(
            d["name"], int(d["lo"]), int(d["hi"]), int(d["rank"]), tuple(d["keys"]), d["dtypes"]
        )


def select_ranges(
    where: str, pieces: list[dict[str, Any]]
) -> tuple[list[tuple[str, tuple[int, ...]]], list[SavedRange]]:
    """Check the ranks' ranges and choose one copy per range.

    `pieces[r]["ranges"]` are rank r's ranges as its piece records them ({"name", "shape", "lo",
    "hi", "keys", "dtypes"}). Returns the parameters with their shapes (in order of first
    appearance, scanning ranks in order) and the chosen ranges sorted by parameter then lo.
    Raises CheckpointFormatError listing the problems; `where` (the step dir) prefixes it.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    by_name: dict[str, list[SavedRange]] = {}
    problems: list[str] = []
    for rank, piece in enumerate(pieces):
        for r in piece["ranges"]:
            name, shape = r["name"], tuple(int(d) for d in r["shape"])
            if name not in shapes:
                shapes[name] = shape
                by_name[name] = []
            elif shapes[name] != shape:
                problems.append(
                    f"parameter {name!r}: rank {rank} saved shape {list(shape)}, an earlier rank "
                    f"{list(shapes[name])}"
                )
                continue
            by_name[name].append(
                SavedRange(
                    name,
                    int(r["lo"]),
                    int(r["hi"]),
                    rank,
                    tuple(sorted(r["keys"])),
                    dict(r["dtypes"]),
                )
            )

    chosen: list[SavedRange] = []
    for name, ranges in by_name.items():
        n_elem = numel(shapes[name])
        ranges.sort(key=lambda s: (s.lo, s.hi, s.rank))
        pos = 0
        prev: SavedRange | None = None
        for s in ranges:
            if prev is not None and (s.lo, s.hi) == (prev.lo, prev.hi):
                # An identical copy (stage 0): the lower rank's copy, already chosen, is read.
                if s.keys != prev.keys:
                    problems.append(
                        f"parameter {name!r} range [{s.lo}, {s.hi}): rank {prev.rank} saved keys "
                        f"{list(prev.keys)}, rank {s.rank} saved {list(s.keys)}; copies of one "
                        "range must hold the same keys"
                    )
                continue
            if MASTER not in s.keys:
                problems.append(
                    f"parameter {name!r} range [{s.lo}, {s.hi}) from rank {s.rank} has no "
                    f"{MASTER!r} tensor (keys {list(s.keys)})"
                )
            if s.hi > n_elem:
                problems.append(
                    f"parameter {name!r} of shape {list(shapes[name])} ({n_elem} elements): range "
                    f"[{s.lo}, {s.hi}) from rank {s.rank} runs past its end"
                )
            if s.lo > pos:
                problems.append(f"parameter {name!r}: elements [{pos}, {s.lo}) saved by no rank")
            elif s.lo < pos:
                assert prev is not None
                problems.append(
                    f"parameter {name!r}: range [{s.lo}, {s.hi}) from rank {s.rank} overlaps "
                    f"[{prev.lo}, {prev.hi}) from rank {prev.rank}; ranges may overlap only when "
                    "identical"
                )
            chosen.append(s)
            pos = max(pos, s.hi)
            prev = s
        if pos < n_elem:
            problems.append(
                f"parameter {name!r} of shape {list(shapes[name])}: elements [{pos}, {n_elem}) "
                "saved by no rank"
            )
    if problems:
        shown = "\n  ".join(problems[:_MAX_PROBLEMS])
        more = len(problems) - _MAX_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise CheckpointFormatError(
            f"{where}: the ranks' saved ranges do not cover every parameter element exactly once "
            f"(not committing):\n  {shown}{tail}"
        )
    return list(shapes.items()), chosen

"""Read a committed checkpoint by parameter range, whatever world size and stage saved it.

A loader at any new world size asks `read(name, lo, hi, key)` for exactly the ranges its rank
owns; the reader assembles them from the saved ranges that overlap (possibly several files),
reading only those slices (safetensors files are mmap'ed; `get_slice` touches only the bytes
asked for). That is all resharding is. Tensor-sliced parameters were saved as slices; a read
names the slice it wants (`tp=`, or None for the full tensor) and tp_read.py maps it onto the
saved ones, so any tp size loads what any other saved.

Integrity: the manifest is checked against the hash in COMMITTED when the reader opens; every
other file is hashed once, the first time it is opened (cost: one full read of that file; a
rank that needs a sliver of a large file still reads all of it once). `verify=False` skips the
data files' hashes, for tools that have just verified them (latest_valid) or trust the disk.

A reader is not thread-safe; use one per thread.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from bisect import bisect_right
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from zray.checkpoint.coverage import SavedRange
from zray.checkpoint.format import (
    COMMITTED,
    FORMAT,
    MANIFEST,
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointWarning,
    committed_dirs,
    numel,
    parse_step_dir_name,
    range_tensor_key,
    read_marker,
    sha256_files,
    verify_file,
)
from zray.checkpoint.shard import MASTER
from zray.checkpoint.state_codec import decode
from zray.checkpoint.tp_read import read_mapped, tp_from_json
from zray.parallel.tp_slice import TPSlice

_RANK_SECTIONS = ("group_scalars", "param_groups", "rng", "client_state")


class CheckpointReader:
    """One committed step dir, read by parameter range. Raises CheckpointFormatError when the
    dir is not committed and CheckpointCorruptError when its manifest fails its hash."""

    def __init__(self, step_dir: Path | str, *, verify: bool = True) -> None:
        self.path = Path(step_dir)
        marker = read_marker(self.path)
        if marker is None:
            raise CheckpointFormatError(
                f"{self.path}: not a committed checkpoint (no valid COMMITTED marker): the save "
                "never finished, or the dir is being rewritten"
            )
        manifest_path = self.path / MANIFEST
        # The manifest is small and everything hangs off it: always verified.
        verify_file(manifest_path, marker["manifest_sha256"])
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except ValueError as e:
            raise CheckpointFormatError(f"{manifest_path}: not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointFormatError(
                f"{manifest_path}: format {manifest.get('format')!r}; this zray reads {FORMAT!r}"
            )
        self._manifest = manifest
        self._verify = verify
        self._verified: set[str] = set()
        self._handles: dict[str, Any] = {}  # file name -> safetensors handle (mmap'ed)
        self._params: dict[str, tuple[int, ...]] = {n: tuple(s) for n, s in manifest["params"]}
        # Saved layouts of the sliced parameters (rank 0's slice stands for the layout).
        self._layouts: dict[str, TPSlice] = {
            n: tp_from_json(d, self._params[n]) for n, d in manifest.get("tp_layouts", {}).items()
        }
        # Ranges by (parameter, saved tp slice or None for a whole parameter).
        self._ranges: dict[tuple[str, int | None], list[SavedRange]] = {}
        for d in manifest["ranges"]:
            s = SavedRange.from_json(d)
            self._ranges.setdefault((s.name, s.tp_rank), []).append(s)
        for rs in self._ranges.values():
            rs.sort(key=lambda s: s.lo)
        self._starts = {k: [s.lo for s in rs] for k, rs in self._ranges.items()}
        self._rank_files: list[dict[str, Any]] = sorted(manifest["ranks"], key=lambda r: r["rank"])

    # ---- what the checkpoint holds ------------------------------------------------------------

    @property
    def step(self) -> int:
        return int(self._manifest["step"])

    @property
    def world_size(self) -> int:
        return int(self._manifest["world_size"])

    @property
    def zero_stage(self) -> int:
        return int(self._manifest["zero_stage"])

    @property
    def tp_size(self) -> int:
        """The saving job's tensor-parallel size (1 for checkpoints from before slicing)."""
        return int(self._manifest.get("tp_size", 1))

    def params(self) -> dict[str, tuple[int, ...]]:
        """{name: whole (full, unsliced) shape}, in the order the save recorded them."""
        return dict(self._params)

    def layout(self, name: str) -> TPSlice | None:
        """How parameter `name` was sliced when saved (its rank-0 slice), None if whole."""
        self._check_name(name)
        return self._layouts.get(name)

    def keys(self, name: str) -> set[str]:
        """Keys readable over the whole parameter ("master", and the optimizer's state keys
        once the optimizer has stepped)."""
        ranges = [s for t in self._slices(name) for s in self._param_ranges(name, t)]
        keys = set(ranges[0].keys)
        for s in ranges[1:]:
            keys &= set(s.keys)
        return keys

    # ---- tensors --------------------------------------------------------------------------------

    def read(
        self, name: str, lo: int, hi: int, key: str = MASTER, tp: TPSlice | None = None
    ) -> torch.Tensor:
        """Elements [lo, hi) of parameter `name`'s flat `key` tensor: fp32, shape [hi - lo].

        With `tp`, the elements are those of that tensor-parallel slice of the parameter (flat
        positions of the slice), whatever tp size saved it; without, of the full parameter."""
        self._check_name(name)
        shape = self._params[name]
        if tp is not None and tp.full_shape != shape:
            raise CheckpointFormatError(
                f"{self.path}: parameter {name!r} has full shape {list(shape)} in this "
                f"checkpoint; the loading model's slice is of a {list(tp.full_shape)} tensor"
            )
        n_elem = numel(tp.local_shape if tp is not None else shape)
        if not 0 <= lo <= hi <= n_elem:
            where = f"slice {tp.rank} of {tp.size}" if tp is not None else "parameter"
            raise ValueError(
                f"{self.path}: parameter {name!r} range [{lo}, {hi}): outside the {where}'s "
                f"{n_elem} elements (parameter shape {list(shape)}); allowed: 0 <= lo <= hi "
                f"<= {n_elem}"
            )
        return read_mapped(
            self._layouts.get(name),
            tp,
            lo,
            hi,
            lambda t, a, b: self._read_saved(name, t, a, b, key),
        )

    def _read_saved(
        self, name: str, tp_rank: int | None, lo: int, hi: int, key: str
    ) -> torch.Tensor:
        """Elements [lo, hi) of the saved whole parameter (tp_rank None) or saved slice."""
        ranges = self._param_ranges(name, tp_rank)
        out = torch.empty(hi - lo, dtype=torch.float32)
        i = max(bisect_right(self._starts[(name, tp_rank)], lo) - 1, 0)
        pos = lo
        while pos < hi:
            s = ranges[i] if i < len(ranges) else None
            if s is None or not s.lo <= pos < s.hi:
                # The commit checked coverage; only a hand-edited manifest gets here.
                raise CheckpointFormatError(
                    f"{self.path}: parameter {name!r} element {pos} lies in no saved range"
                )
            end = min(hi, s.hi)
            if key not in s.keys:
                raise CheckpointFormatError(
                    f"{self.path}: parameter {name!r} range [{s.lo}, {s.hi}) (saved by rank "
                    f"{s.rank}) has no {key!r} tensor; it has {list(s.keys)}"
                )
            tkey = range_tensor_key(s.name, s.lo, s.hi, key)
            handle = self._handle(self._rank_files[s.rank]["file"])
            try:
                part = handle.get_slice(tkey)[pos - s.lo : end - s.lo]
            except Exception as e:  # safetensors raises its own error type for a missing key
                raise CheckpointFormatError(
                    f"{self.path / self._rank_files[s.rank]['file']}: cannot read tensor "
                    f"{tkey!r} (parameter {name!r} range [{s.lo}, {s.hi})): {e}"
                ) from e
            out[pos - lo : end - lo].copy_(part)
            pos = end
            i += 1
        return out

    def _check_name(self, name: str) -> None:
        if name not in self._params:
            some = ", ".join(repr(n) for n in list(self._params)[:5])
            raise CheckpointFormatError(
                f"{self.path}: no parameter {name!r} in this checkpoint; it has "
                f"{len(self._params)} parameters ({some}{', ...' if len(self._params) > 5 else ''})"
            )

    def _slices(self, name: str) -> list[int | None]:
        layout = self.layout(name)
        return [None] if layout is None else list(range(layout.size))

    def _param_ranges(self, name: str, tp_rank: int | None) -> list[SavedRange]:
        self._check_name(name)
        ranges = self._ranges.get((name, tp_rank))
        if not ranges:
            # The commit checked coverage; only a hand-edited manifest gets here.
            which = "" if tp_rank is None else f" (tp slice {tp_rank})"
            raise CheckpointFormatError(f"{self.path}: parameter {name!r}{which} has no range")
        return ranges

    # ---- non-tensor state ---------------------------------------------------------------------

    def rank_state(self, rank: int) -> dict[str, Any] | None:
        """Saved rank `rank`'s group_scalars, param_groups, rng, client_state; None if the
        checkpoint was saved by fewer ranks."""
        if not 0 <= rank < self.world_size:
            return None
        entry = self._rank_files[rank]
        piece_path = self.path / entry["piece"]
        try:
            raw = piece_path.read_bytes()
        except FileNotFoundError:
            raise CheckpointFormatError(
                f"{piece_path}: file missing (listed in the manifest)"
            ) from None
        # Hash the bytes that are parsed (not the file before reading it again): small file.
        expected = self._manifest["files"][entry["piece"]]["sha256"]
        actual = hashlib.sha256(raw).hexdigest()
        if actual != expected:
            raise CheckpointCorruptError(piece_path, expected, actual)
        state = json.loads(raw)["state"]

        def load(key: str) -> torch.Tensor:
            return self._handle(entry["file"]).get_tensor(key)

        return {s: decode(state[s], load) for s in _RANK_SECTIONS}

    def global_state(self) -> dict[str, Any]:
        """Engine (counters, loss scaler, scheduler) and sampler state, as rank 0 saved them,
        and the tied parameters' further names."""
        file0 = self._rank_files[0]["file"]

        def load(key: str) -> torch.Tensor:
            return self._handle(file0).get_tensor(key)

        return {
            "engine": decode(self._manifest["engine"], load),
            "sampler": decode(self._manifest["sampler"], load),
            "tied": dict(self._manifest.get("tied") or {}),
        }

    # ---- files and integrity ------------------------------------------------------------------

    def files(self) -> dict[str, dict[str, Any]]:
        """{file name: {"sha256", "bytes"}} of every file the manifest vouches for."""
        return {k: dict(v) for k, v in self._manifest["files"].items()}

    def problems(self) -> list[CheckpointFormatError]:
        """Check every file's presence and hash (in parallel); the problems found, none if
        sound. Cost: reads the whole checkpoint once."""
        names = sorted(self._manifest["files"])
        present = [n for n in names if (self.path / n).is_file()]
        found: list[CheckpointFormatError] = [
            CheckpointFormatError(f"{self.path / n}: file missing (listed in the manifest)")
            for n in names
            if n not in present
        ]
        hashes = sha256_files([self.path / n for n in present])
        for n, actual in zip(present, hashes, strict=True):
            expected = self._manifest["files"][n]["sha256"]
            if actual != expected:
                found.append(CheckpointCorruptError(self.path / n, expected, actual))
            else:
                self._verified.add(n)
        return found

    def verify_all(self) -> None:
        """Raise the first problem `problems()` finds."""
        found = self.problems()
        if found:
            raise found[0]

    def _verify_once(self, name: str) -> None:
        if name in self._verified:
            return
        entry = self._manifest["files"].get(name)
        if entry is None:
            raise CheckpointFormatError(f"{self.path / name}: not listed in the manifest")
        verify_file(self.path / name, entry["sha256"])
        self._verified.add(name)

    def _handle(self, name: str) -> Any:
        h = self._handles.get(name)
        if h is None:
            if self._verify:
                self._verify_once(name)
            path = self.path / name
            if not path.is_file():
                raise CheckpointFormatError(f"{path}: file missing (listed in the manifest)")
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:
                raise CheckpointFormatError(f"{path}: not a readable safetensors file: {e}") from e
            self._handles[name] = h
        return h

    def close(self) -> None:
        self._handles.clear()  # drops the mmaps

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def latest_valid(root: Path | str, *, verify_data: bool = True) -> Path | None:
    """The most recently committed step dir under `root` that verifies, or None.

    A committed dir with a missing or corrupt file is skipped with a CheckpointWarning naming
    the file, and the one committed before it is tried. Cost with verify_data (the default):
    reads every file of the chosen checkpoint (and of each skipped one). Without it, only the
    manifest and the files' presence and sizes are checked; a corrupt data file then surfaces as
    CheckpointCorruptError when a reader first opens it.
    """
    for _, step, d in committed_dirs(Path(root)):
        try:
            with CheckpointReader(d, verify=verify_data) as r:
                if verify_data:
                    r.verify_all()
                else:
                    _check_sizes(r)
            _warn_uncommitted(Path(root), after=step)
            return d
        except CheckpointFormatError as e:
            warnings.warn(
                f"skipping checkpoint {d}, falling back to the previous committed one: {e}",
                CheckpointWarning,
                stacklevel=2,
            )
    _warn_uncommitted(Path(root), after=-1)
    return None


def _warn_uncommitted(root: Path, after: int) -> None:
    """Name the step dirs newer than the one chosen that have no COMMITTED marker (a save that
    was interrupted, or a marker removed): they are skipped, not silently."""
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        step = parse_step_dir_name(d.name)
        if step is not None and step > after and d.is_dir() and read_marker(d) is None:
            warnings.warn(
                f"skipping checkpoint {d}: it has no {COMMITTED} marker (a save that did not "
                "finish, or the marker was removed); using the newest committed one before it",
                CheckpointWarning,
                stacklevel=3,
            )


def _check_sizes(r: CheckpointReader) -> None:
    for name, entry in r.files().items():
        path = r.path / name
        if not path.is_file():
            raise CheckpointFormatError(f"{path}: file missing (listed in the manifest)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointFormatError(
                f"{path}: {size} bytes; the manifest recorded {entry['bytes']}"
            )

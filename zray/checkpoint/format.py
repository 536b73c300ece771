"""The sharded checkpoint format: names on disk, version, error types, checksums.

Layout of one checkpoint, `root/step_{step:08d}/` (see writer.py for who writes what, when):

  shard_{rank:05d}_of_{world:05d}.safetensors   rank's range tensors + tensors of its state
  shard_{rank:05d}.json                        rank's piece of the manifest (written last)
  manifest.json                                written by rank 0 once every piece is in
  COMMITTED                                    commit marker, written last, names the
                                               manifest's sha256 and the commit sequence
`root/latest` names the most recently committed step dir (a hint for people and tools; readers
pick by commit sequence, see reader.latest_valid).

Range tensors are stored under `range_tensor_key(name, lo, hi, key)`, e.g.
"layer.0.weight@0:4096/exp_avg"; state tensors (RNG states, tensors in client state) under
"__state__/...". Readers never parse these keys: they rebuild them from the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zray.errors import ZrayError

FORMAT = "zray-sharded-v1"

MANIFEST = "manifest.json"
COMMITTED = "COMMITTED"
LATEST = "latest"
STATE_PREFIX = "__state__/"

_STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")

# Read files in chunks this large when hashing: large enough that per-call overhead vanishes,
# small enough to stay out of the way of training's memory.
_HASH_CHUNK_BYTES = 8 << 20


class CheckpointFormatError(ZrayError):
    """A checkpoint that does not hold what the format requires (missing file, key, range)."""


class CheckpointCorruptError(CheckpointFormatError):
    """A file whose content does not match the checksum recorded when it was written."""

    def __init__(self, path: Path | str, expected: str, actual: str) -> None:
        self.path = str(path)
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{self.path}: checksum mismatch: expected sha256 {expected}, file has {actual}; "
            "the file is corrupt or was replaced after the checkpoint was committed"
        )

    def __reduce__(self) -> tuple[type[CheckpointCorruptError], tuple[str, str, str]]:
        # Errors cross process boundaries (Ray); replay __init__'s arguments, not the message.
        return (type(self), (self.path, self.expected, self.actual))


class CheckpointCommitTimeout(ZrayError, TimeoutError):
    """Rank 0 waited for the other ranks' pieces of a save and some never arrived."""

    def __init__(
        self, step_dir: Path | str, missing_ranks: list[int], waited_s: float, detail: str = ""
    ) -> None:
        self.step_dir = str(step_dir)
        self.missing_ranks = list(missing_ranks)
        self.waited_s = waited_s
        self.detail = detail
        files = ", ".join(piece_name(r) for r in self.missing_ranks[:8])
        more = "" if len(self.missing_ranks) <= 8 else f" and {len(self.missing_ranks) - 8} more"
        super().__init__(
            f"{self.step_dir}: rank 0 waited {waited_s:.1f} s for the pieces of ranks "
            f"{self.missing_ranks} ({files}{more}) and they never arrived"
            + (f" ({detail})" if detail else "")
            + "; the step is left uncommitted, so the previous committed checkpoint stays the "
            "one to resume from"
        )

    def __reduce__(
        self,
    ) -> tuple[type[CheckpointCommitTimeout], tuple[str, list[int], float, str]]:
        return (type(self), (self.step_dir, self.missing_ranks, self.waited_s, self.detail))


class CheckpointWriteError(ZrayError, OSError):
    """A checkpoint file could not be written (disk full, read-only, quota): names the file,
    the operation, the bytes wanted and the room there was. The previous committed checkpoint
    is untouched (writes go to a temporary name first)."""

    def __init__(self, path: str, operation: str, wanted: int, cause: OSError) -> None:
        self.path, self.operation, self.wanted = path, operation, wanted
        self.reason = cause.strerror or str(cause)
        free = _free_bytes(path)
        room = "" if free is None else f", {free / 1e9:.2f} GB free there"
        super().__init__(
            cause.errno,
            f"{operation} {path}: {self.reason} ({wanted / 1e9:.3f} GB wanted{room}); "
            "the previous committed checkpoint is kept",
        )

    def __str__(self) -> str:
        return str(self.args[1])

    def __reduce__(self) -> tuple[type, tuple[str, str, int, OSError]]:
        cause = OSError(self.errno, self.reason)
        return (type(self), (self.path, self.operation, self.wanted, cause))


def _free_bytes(path: str) -> int | None:
    import shutil

    p = Path(path)
    for candidate in (p.parent, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


class CheckpointWarning(UserWarning):
    """A checkpoint problem that does not stop the job: a committed checkpoint that failed
    verification and was passed over for an older one, an old one that could not be deleted."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step_dir_name(name: str) -> int | None:
    """The step of a step dir name, or None for any other name."""
    m = _STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def data_file_name(rank: int, world_size: int) -> str:
    # The world size is in the name so that pieces of a save at another world size over the
    # same step dir can never be mistaken for this save's files.
    return f"shard_{rank:05d}_of_{world_size:05d}.safetensors"


def piece_name(rank: int) -> str:
    return f"shard_{rank:05d}.json"


def range_tensor_key(name: str, lo: int, hi: int, key: str) -> str:
    return f"{name}@{lo}:{hi}/{key}"


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes. Cost: reads the whole file once."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL for large updates
    return h.hexdigest()


def sha256_files(paths: list[Path], max_workers: int = 8) -> list[str]:
    """Hashes of several files, read in parallel: a parallel filesystem serves several readers
    faster than one, and hashing releases the GIL."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def verify_file(path: Path, expected: str) -> None:
    """Raise CheckpointFormatError if `path` is missing, CheckpointCorruptError if it differs."""
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: file missing (listed in the checkpoint's manifest)")
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointCorruptError(path, expected, actual)


def read_marker(step_dir: Path) -> dict[str, Any] | None:
    """The COMMITTED marker's content, or None if the dir is not committed (or the marker is not
    one of ours)."""
    try:
        marker = json.loads((step_dir / COMMITTED).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        return None
    return marker


def committed_dirs(root: Path) -> list[tuple[int, int, Path]]:
    """(sequence, step, dir) of every committed step dir under root, newest commit first."""
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        step = parse_step_dir_name(d.name)
        if step is None or not d.is_dir():
            continue
        marker = read_marker(d)
        if marker is not None:
            out.append((int(marker.get("sequence", 0)), step, d))
    out.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return out

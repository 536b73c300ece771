"""Atomic writes of files too large to build in memory first.

atomic.write_bytes_atomic needs the whole file as one bytes object: for a rank's shard or a
consolidated model that is a second copy of the data. `open_atomic` gives a file object to stream
into instead, with the same guarantee (temporary name in the same directory, fsync, rename over
the target, fsync of the directory): a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from zray.checkpoint.atomic import _fsync_dir


@contextmanager
def open_atomic(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file; on normal exit it replaces `path`, on an exception it vanishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and thread id: several ranks may save from threads of one process (tests, AsyncSaver).
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    f = open(tmp, "wb")  # noqa: SIM115 (closed below on both paths)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_durably(path: Path) -> bool:
    """Unlink `path` if present and make the removal itself survive a crash. True if removed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True

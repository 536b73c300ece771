"""The errors zray's data input raises for bad user input.

Both derive from `ZrayError`, so a driver can tell zray's own refusals apart from bugs. A missing
file is also a `FileNotFoundError` (what callers of file APIs expect to catch); every other bad
input is also a `ValueError`.
"""

from __future__ import annotations

from zray.errors import ZrayError

__all__ = ["DataError", "DataFileNotFoundError"]


class DataError(ZrayError, ValueError):
    """Data the loader cannot use: an unsupported type, a ragged or non-numeric column, a bad
    index, or sampler settings that do not add up. The message names the input and the value."""


class DataFileNotFoundError(ZrayError, FileNotFoundError):
    """A Parquet path, directory or glob that matches no file; the message names it."""

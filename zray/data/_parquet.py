"""Parquet input and output: resolve paths (file, directory, glob, URI) to an ordered file list,
read them into one Arrow table, and write a table atomically.

[Note: file order] Row order must be the same on every worker and every restart, because the
sampler addresses rows by global index. Files are therefore read in a fixed order: a list of
paths in the order given, a directory's files and a glob's matches sorted by name. A directory
is not read through Arrow's dataset discovery, whose fragment order is not a documented
guarantee.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from zray.data.errors import DataError, DataFileNotFoundError

PathLike = str | os.PathLike

_GLOB_CHARS = frozenset("*?[")


def _is_data_file(base_name: str) -> bool:
    # Writers leave markers and metadata beside the data (_SUCCESS, _metadata, .crc files).
    return base_name.endswith(".parquet") and not base_name.startswith(("_", "."))


def _resolve_one(path: PathLike) -> list[tuple[pafs.FileSystem, str]]:
    """One path -> the files it names, each with the filesystem that reads it."""
    text = os.fspath(path)
    if "://" in text:
        # A URI (s3://, gs://, hdfs://, file://): pyarrow picks the filesystem. Globs are
        # local only, since object stores have no cheap portable glob.
        fs, inner = pafs.FileSystem.from_uri(text)
    else:
        fs, inner = pafs.LocalFileSystem(), os.path.abspath(text)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [(fs, inner)]
    if info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
        files = sorted(e.path for e in entries if e.is_file and _is_data_file(e.base_name))
        if not files:
            raise DataFileNotFoundError(
                f"Parquet directory {text!r} holds no *.parquet files; allowed: a directory "
                "with at least one *.parquet file"
            )
        return [(fs, f) for f in files]
    if "://" not in text and _GLOB_CHARS & set(text):
        matches = sorted(m for m in glob.glob(text) if os.path.isfile(m))
        if not matches:
            raise DataFileNotFoundError(f"Parquet glob {text!r} matches no file")
        return [(fs, os.path.abspath(m)) for m in matches]
    raise DataFileNotFoundError(f"Parquet path {text!r} does not exist")


def resolve_files(paths: list[PathLike]) -> list[tuple[pafs.FileSystem, str]]:
    """Every file the paths name, in order (see the Note on file order)."""
    return [f for p in paths for f in _resolve_one(p)]


def read_parquet(paths: list[PathLike], columns: list[str] | None) -> pa.Table:
    """Read the files ``paths`` name into one table; only ``columns`` when given.

    Only the footers are read before the column check, so a typo in ``columns`` fails before
    any data is read. Files must share one schema (metadata aside); the error names the first
    file that differs, and a file that cannot be read (corrupt, truncated) is named too."""
    files = resolve_files(paths)
    tables = []
    first: tuple[str, pa.Schema] | None = None
    for fs, path in files:
        try:
            schema, table = _read_one(fs, path, columns)
        except DataError:
            raise
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(
                f"Parquet file {path!r} cannot be read ({type(e).__name__}: {e}); allowed: "
                "readable Parquet files"
            ) from None
        if first is None:
            first = (path, schema)
        elif not schema.equals(first[1]):
            raise DataError(
                f"Parquet file {path!r} has schema {schema} but {first[0]!r} has "
                f"{first[1]}; allowed: one schema across all files"
            )
        tables.append(table)
    return pa.concat_tables(tables)


def _read_one(
    fs: pafs.FileSystem, path: str, columns: list[str] | None
) -> tuple[pa.Schema, pa.Table]:
    """One file's schema (of the columns asked for) and its table."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow.remove_metadata()
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise DataError(
                    f"columns {missing} are not in Parquet file {path!r}; allowed: {schema.names}"
                )
            schema = pa.schema([schema.field(c) for c in columns])
        return schema, pf.read(columns=columns).replace_schema_metadata(None)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet(table: pa.Table, path: PathLike) -> Path:
    """Write ``table`` to the local Parquet file ``path`` atomically and return the path.

    Written under a temporary name in the same directory, fsynced, then renamed over the
    target, so a reader (another worker, a restarted job) sees the old file or the whole new
    one, never a torn one; the directory is fsynced so the rename survives a crash. The
    temporary name starts with '.', so a directory reader never picks it up."""
    if not isinstance(table, pa.Table):
        raise DataError(f"write_parquet needs a pyarrow.Table, got {type(table).__name__}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)
    return target

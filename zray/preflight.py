"""Checks `zray.fit` runs on the driver before Ray or any worker starts.

A mistake that would fail on every worker at its first step (a path that does not exist, a
column the model does not take, fewer rows than one global batch, sequences longer than the
model's, a tensor-parallel size that does not divide the model's heads, widths or vocabulary or
any worker count in the range, a checkpoint directory that cannot be written or has no room for
one checkpoint) is
reported here as one line naming the thing, the value and what is allowed, in a second or two,
instead of after Ray and the workers started. Everything is read cheaply: Parquet footers and
one row, the model built on the meta device (no memory, no initialisation cost).

What cannot be checked cheaply (every row's length, a Ray or torch Dataset's contents) is left
to the workers, whose data errors end the run without restarts.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zray.config import Config
from zray.config.batch import plan_run
from zray.data.errors import DataError
from zray.entrypoint import load_entry
from zray.errors import ConfigError


@dataclass(frozen=True)
class DataShape:
    """What the driver learned of Parquet data without reading it."""

    files: int
    rows: int
    columns: list[str]
    lengths: dict[str, int]  # list columns: the first row's length


def preflight(cfg: Config, model: Callable[..., nn.Module] | str, data: Any) -> None:
    """Raise ConfigError / DataError for the first mistake found (see the module note)."""
    plans, _ = plan_run(cfg)  # a worker range in which no size keeps the batch: refused
    shape = parquet_shape(data)
    module = meta_model(model, cfg)
    if shape is not None:
        batch = plans[min(plans)].global_batch  # the same at every size
        if shape.rows < batch:
            raise DataError(
                f"data: {shape.rows} rows in {shape.files} Parquet file(s), fewer than one global "
                f"batch ({batch} = train_batch_size at {min(plans)} worker(s)); "
                "allowed: at least train_batch_size rows"
            )
        if module is not None:
            check_columns(module, shape)
    tp = cfg.tensor_parallel.tp_size
    if tp > 1 and module is not None:
        check_tensor_slicing(meta_model(model, cfg), tp)  # a fresh one: slicing edits it
    if cfg.zray.checkpoint_dir:
        need = None if module is None else checkpoint_bytes(module, cfg)
        check_checkpoint_dir(cfg.zray.checkpoint_dir, need)


def parquet_shape(data: Any) -> DataShape | None:
    """Rows, columns and list lengths of local or remote Parquet data (None: not Parquet)."""
    import pyarrow.parquet as pq

    from zray.data._parquet import resolve_files

    paths = [data] if isinstance(data, str | os.PathLike) else data
    if not (isinstance(paths, list | tuple) and paths):
        return None
    if not all(isinstance(p, str | os.PathLike) for p in paths):
        return None
    files = resolve_files(list(paths))  # names a path that matches nothing
    rows, columns, lengths = 0, None, {}
    for fs, path in files:
        try:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                rows += pf.metadata.num_rows
                if columns is None:
                    columns = list(pf.schema_arrow.names)
                    if pf.metadata.num_row_groups and pf.metadata.num_rows:
                        first = pf.read_row_group(0).slice(0, 1).to_pylist()[0]
                        lengths = {k: len(v) for k, v in first.items() if isinstance(v, list)}
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(
                f"Parquet file {path!r} cannot be read ({type(e).__name__}: {e}); allowed: "
                "readable Parquet files"
            ) from None
    if rows == 0:
        raise DataError(
            f"data: the {len(files)} Parquet file(s) given hold 0 rows; allowed: at least "
            "train_batch_size rows"
        )
    return DataShape(len(files), rows, columns or [], lengths)


def meta_model(model: Callable[..., nn.Module] | str, cfg: Config) -> nn.Module | None:
    """The model built on the meta device (no memory), or None where that cannot be done."""
    factory = load_entry(model) if isinstance(model, str) else model
    try:
        with torch.device("meta"):
            built = factory(**cfg.zray.model_kwargs)
    except ConfigError:
        raise
    except Exception:  # a factory that needs real tensors: the workers will tell
        return None
    return built if isinstance(built, nn.Module) else None


def check_tensor_slicing(module: nn.Module | None, tp: int) -> None:
    """The model's layers split over `tp` ranks (heads, widths, vocabulary divisible)."""
    from zray.parallel.tp_policy import check_slicing

    if module is None:
        return
    try:
        check_slicing(module, tp)
    except ValueError as e:
        raise ConfigError(
            "tensor_parallel.tp_size", tp, "a size that divides every sliced dimension", str(e)
        ) from None


def check_columns(module: nn.Module, shape: DataShape) -> None:
    """Every column is an argument of the model's forward (called as model(**batch)), every
    argument it requires is a column, and no sequence is longer than the model takes."""
    name = f"{type(module).__name__}.forward"
    params = inspect.signature(module.forward).parameters
    takes = [p for p in params.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names = [p.name for p in takes]
        for col in shape.columns:
            if col not in names:
                raise DataError(
                    f"data column {col!r}: not an argument of {name}({', '.join(names)}); "
                    "allowed: columns named as the model's forward arguments (the batch is "
                    "passed as model(**batch))"
                )
    for p in takes:
        if p.default is p.empty and p.name not in shape.columns:
            raise DataError(
                f"{name} needs {p.name!r}, which is not a data column; the data has "
                f"{shape.columns}; allowed: a column named {p.name!r}"
            )
    limit = _max_length(module)
    if limit is not None:
        for col, n in shape.lengths.items():
            if n > limit:
                raise DataError(
                    f"data column {col!r}: sequences of {n} tokens, longer than the model's "
                    f"{limit}; allowed: at most {limit} (the model's sequence length)"
                )


def _max_length(module: nn.Module) -> int | None:
    """zray's GPT: cfg.seq_len; Hugging Face models: config.max_position_embeddings."""
    for owner, attr in (("cfg", "seq_len"), ("config", "max_position_embeddings")):
        value = getattr(getattr(module, owner, None), attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def checkpoint_bytes(module: nn.Module, cfg: Config) -> int:
    """One checkpoint's size: fp32 master weights plus the optimizer's per-element state."""
    params = sum(p.numel() for p in module.parameters())
    kind = (cfg.optimizer.type if cfg.optimizer is not None else "adamw").lower()
    per_param = 4 + (8 if "adam" in kind or "lamb" in kind else 4)
    return params * per_param


def check_checkpoint_dir(root: str, need: int | None) -> None:
    """The directory exists or can be made, a file can be written in it, and (local disks) it
    has room for one checkpoint."""
    if "://" in root:
        return  # remote storage: its own errors name the URI
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".zray-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            "zray.checkpoint_dir", root, "a directory this user can create and write", e.strerror
        ) from None
    free = shutil.disk_usage(root).free
    if need is not None and free < need:
        gb = 1e9
        raise ConfigError(
            "zray.checkpoint_dir",
            root,
            f"a disk with room for one checkpoint ({need / gb:.2f} GB)",
            f"only {free / gb:.2f} GB free there",
        )

"""Training data as a table of rows, addressed by global row index.

`as_source` accepts what ``zray.fit(data=...)`` accepts and returns a `TableSource`, whose
``take(indices)`` turns any list of row indices into a training batch: a dict of tensors, one
per column, the way Hugging Face models take ``model(**batch)`` (column types: see the Note in
`_arrow.py`). The sampler decides which indices; the source only fetches them, so the same
sampler state yields the same samples whatever the input kind or the world size.

Two implementations:
- `ArrowTableSource` holds one in-memory Arrow table (from a table, Parquet files or a Ray
  Dataset). ``take`` is vectorised: ``Table.take`` plus one flatten + reshape per column.
- `TorchDatasetSource` wraps a map-style torch Dataset and reads only the items asked for.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset, IterableDataset

from zray.data import _arrow, _torch_dataset
from zray.data._parquet import read_parquet, write_parquet
from zray.data.errors import DataError

__all__ = [
    "ArrowTableSource",
    "TableSource",
    "TorchDatasetSource",
    "as_source",
    "lm_tokens_table",
    "write_parquet",
]

_ALLOWED_DATA = (
    "a pyarrow.Table; a Parquet file, directory or glob (str or os.PathLike, local or URI); "
    "a list of such paths; a ray.data.Dataset; a map-style torch.utils.data.Dataset of dicts; "
    "or a TableSource"
)


def _check_indices(indices: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Indices as int64 [B], each in [0, n); the error names the first bad one."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        raise DataError(
            f"row index {int(idx[bad.argmax()])} is out of range; allowed: 0 <= index < {n}"
        )
    return idx


class TableSource(ABC):
    """Rows addressed by index 0..len-1, fetched as a batch dict of [B] / [B, T] tensors."""

    @property
    @abstractmethod
    def columns(self) -> list[str]:
        """The batch's keys, in order."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def take(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``indices`` (any order, repeats allowed) as {column: [B] or [B, T] tensor} on
        the CPU, row b of every tensor from row ``indices[b]``."""

    @abstractmethod
    def select(self, columns: list[str]) -> TableSource:
        """The same rows with only ``columns``, in that order."""


class ArrowTableSource(TableSource):
    """An in-memory Arrow table; every column validated once, here (see `_arrow.py`).

    The table is combined into one chunk per column: a table read from many Parquet row groups
    or files has many chunks, and ``take`` across chunks is far slower (64 x 512 tokens from a
    100-chunk table: 26 ms against 0.3 ms from one chunk, on the dev CPU). Cost: one copy of
    the data at construction when the table is chunked; none when it is one chunk already (a
    table shared through Ray's object store stays zero-copy)."""

    def __init__(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            raise DataError(
                f"the data has no rows (columns {table.column_names}); allowed: >= 1 row"
            )
        if table.num_columns == 0:
            raise DataError("the data has no columns; allowed: >= 1 numeric column")
        self._table = _arrow.combine(table)
        self._specs = _arrow.column_specs(self._table)

    @property
    def table(self) -> pa.Table:
        return self._table

    @property
    def columns(self) -> list[str]:
        return list(self._table.column_names)

    def __len__(self) -> int:
        return self._table.num_rows

    def take(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        idx = _check_indices(indices, len(self))
        taken = self._table.take(pa.array(idx))  # zero-copy view of idx; gathers B rows
        return {s.name: _arrow.to_tensor(taken.column(s.name), s) for s in self._specs}

    def select(self, columns: list[str]) -> ArrowTableSource:
        return ArrowTableSource(_select(self._table, columns))


class TorchDatasetSource(TableSource):
    """A map-style torch Dataset of dict items, read lazily (one item read here, to learn the
    columns); see `_torch_dataset.py` for the cost."""

    def __init__(self, dataset: Dataset, columns: list[str] | None = None) -> None:
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise DataError(
                f"torch Dataset {type(dataset).__name__} has no __len__; allowed: a map-style "
                "Dataset with __len__ and __getitem__"
            ) from None
        if n == 0:
            raise DataError(f"torch Dataset {type(dataset).__name__} is empty; allowed: >= 1 item")
        self._dataset = dataset
        self._len = n
        self._columns = _torch_dataset.item_columns(dataset, columns)

    @property
    def dataset(self) -> Dataset:
        return self._dataset

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return self._len

    def take(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        idx = _check_indices(indices, len(self)).tolist()
        if not idx:
            raise DataError("take needs at least one index from a torch Dataset; got none")
        return _torch_dataset.take_items(self._dataset, self._columns, idx)

    def select(self, columns: list[str]) -> TorchDatasetSource:
        return TorchDatasetSource(self._dataset, columns)


def _select(table: pa.Table, columns: list[str] | None) -> pa.Table:
    if columns is None:
        return table
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"columns {missing} are not in the data; allowed: {table.column_names}")
    return table.select(columns)


def _is_ray_dataset(data: object) -> bool:
    # Checked by class name and module so that ray is imported only when the object already
    # comes from it (importing ray costs ~1 s and is not needed for other inputs).
    return any(
        c.__name__ == "Dataset" and c.__module__.startswith("ray.data") for c in type(data).__mro__
    )


def _ray_dataset_table(data: Any, columns: list[str] | None) -> pa.Table:
    """Materialise a Ray Dataset into one Arrow table, blocks in the dataset's order.

    The row order is the Ray Dataset's block order. It is reproducible for datasets read or
    built without transforms; a dataset with map stages is reproducible only when built with
    ``DataContext.get_current().execution_options.preserve_order = True``."""
    import ray

    if columns is not None:
        missing = [c for c in columns if c not in data.columns()]
        if missing:
            raise DataError(
                f"columns {missing} are not in the Ray Dataset; allowed: {data.columns()}"
            )
        data = data.select_columns(columns)
    blocks = [t.replace_schema_metadata(None) for t in ray.get(data.to_arrow_refs())]
    # Empty blocks (left by filters) may carry a looser schema (null types); they add no rows.
    tables = [t for t in blocks if t.num_rows]
    if not tables:
        raise DataError("the Ray Dataset is empty; allowed: >= 1 row")
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as e:
        raise DataError(
            f"the Ray Dataset's blocks have different schemas ({e}); allowed: one schema"
        ) from e


def _is_path(x: object) -> bool:
    return isinstance(x, str | os.PathLike)


def as_source(data: Any, columns: list[str] | None = None) -> TableSource:
    """The `TableSource` for ``data`` (see ``_ALLOWED_DATA``), keeping only ``columns`` if given.

    Arrow tables, Parquet files and Ray Datasets are loaded into memory (Parquet reads only the
    requested columns); a torch Dataset is wrapped and read item by item."""
    if columns is not None and (
        isinstance(columns, str) or not all(isinstance(c, str) for c in columns)
    ):
        raise DataError(f"columns must be a list of column names; got {columns!r}")
    if isinstance(data, TableSource):
        return data if columns is None else data.select(columns)
    if isinstance(data, pa.Table):
        return ArrowTableSource(_select(data, columns))
    if _is_path(data):
        return ArrowTableSource(read_parquet([data], columns))
    if isinstance(data, list | tuple) and data and all(_is_path(p) for p in data):
        return ArrowTableSource(read_parquet(list(data), columns))
    if _is_ray_dataset(data):
        return ArrowTableSource(_ray_dataset_table(data, columns))
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return TorchDatasetSource(data, columns)
    if isinstance(data, IterableDataset):
        raise DataError(
            f"data is an IterableDataset ({type(data).__name__}), which cannot be addressed by "
            f"index for a resumable sampler; allowed: {_ALLOWED_DATA}"
        )
    shown = f"{type(data).__name__}"
    if isinstance(data, list | tuple):
        shown += " (allowed only when every element is a path)" if data else " (empty)"
    raise DataError(f"data of type {shown} is not supported; allowed: {_ALLOWED_DATA}")


def lm_tokens_table(tokens: torch.Tensor) -> pa.Table:
    """[N, T] token ids -> a table with one ``input_ids`` column, list<int32> of length T: what
    a causal LM trains on (labels are derived from it, see `zray.data.collate`).

    int32 halves the file against int64; `TableSource` widens back to int64 per batch."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        shown = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise DataError(f"tokens must be a [N, T] tensor with T >= 2; got {shown}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise DataError(f"tokens must hold integer ids; got dtype {tokens.dtype}")
    lo, hi = int(tokens.min()), int(tokens.max())
    info = np.iinfo(np.int32)
    if lo < info.min or hi > info.max:
        raise DataError(f"token ids must fit int32; got range [{lo}, {hi}]")
    n, t = tokens.shape
    arr = tokens.detach().cpu().to(torch.int32).numpy()
    # [N*T] values and N+1 offsets 0, T, 2T, ... build the list array without a row loop.
    # list<> offsets are int32; past 2^31 values the column needs large_list<> (int64 offsets).
    large = n * t > info.max
    offsets = pa.array(np.arange(n + 1, dtype=np.int64 if large else np.int32) * t)
    list_cls = pa.LargeListArray if large else pa.ListArray
    values = pa.array(np.ascontiguousarray(arr).ravel())
    return pa.table({"input_ids": list_cls.from_arrays(offsets, values)})

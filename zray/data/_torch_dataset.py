"""Batching for a map-style torch Dataset whose items are dicts of tensors, lists or numbers.

The dataset is wrapped, not materialised: `take` reads only the items asked for. That costs one
Python ``__getitem__`` per sample (unavoidable for an arbitrary Dataset); Arrow input is the
fast path. Values convert with the dtype rule of `_arrow.py` (integers int64, floats float32,
booleans bool), so a torch Dataset and an Arrow table holding the same rows give identical
batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from zray.data.errors import DataError

_ALLOWED_ITEM = "a dict of column name -> tensor, numpy array, list of numbers, or number"


def _normalise_dtype(column: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t
    if t.is_floating_point():
        return t.to(torch.float32)
    if not t.is_complex():
        return t.to(torch.int64)
    raise DataError(
        f"column {column!r} is not numeric: got torch dtype {t.dtype}; allowed: integer, "
        "floating point or boolean values"
    )


def _as_tensor(column: str, index: int, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(
            f"column {column!r} of item {index} is not numeric: got {type(value).__name__} "
            f"({e}); allowed: {_ALLOWED_ITEM}"
        ) from None


def _describe(shape: torch.Size) -> str:
    return f"{shape[0]} values" if len(shape) == 1 else f"shape {list(shape)}"


def stack_column(column: str, indices: Sequence[int], values: list[Any]) -> torch.Tensor:
    """[B, ...] tensor of one column's values from B items; the ragged error names two sizes."""
    tensors = [_as_tensor(column, i, v) for i, v in zip(indices, values, strict=True)]
    first = tensors[0].shape
    for i, t in zip(indices, tensors, strict=True):
        if t.shape != first:
            raise DataError(
                f"column {column!r} is ragged: item {indices[0]} has {_describe(first)}, item "
                f"{i} has {_describe(t.shape)}; allowed: one shape in every item (pad or pack "
                "the sequences to a fixed length first)"
            )
    # torch.stack copies into one new [B, ...] buffer; the dtype cast afterwards is a no-op
    # when the items already hold int64 / float32.
    return _normalise_dtype(column, torch.stack(tensors))


def read_item(dataset: Dataset, index: int) -> Mapping[str, Any]:
    item = dataset[index]
    if not isinstance(item, Mapping):
        raise DataError(
            f"torch Dataset item {index} is a {type(item).__name__}; allowed: {_ALLOWED_ITEM}"
        )
    return item


def item_columns(dataset: Dataset, columns: list[str] | None) -> list[str]:
    """Column names from the first item (one item read), checked against ``columns``."""
    keys = [str(k) for k in read_item(dataset, 0)]
    if columns is None:
        return keys
    missing = [c for c in columns if c not in keys]
    if missing:
        raise DataError(f"columns {missing} are not in the torch Dataset's items; allowed: {keys}")
    return list(columns)


def take_items(
    dataset: Dataset, columns: list[str], indices: Sequence[int]
) -> dict[str, torch.Tensor]:
    items = [read_item(dataset, i) for i in indices]
    batch = {}
    for c in columns:
        values = []
        for i, item in zip(indices, items, strict=True):
            if c not in item:
                raise DataError(
                    f"torch Dataset item {i} has no column {c!r}; allowed: every item has the "
                    f"columns {columns}"
                )
            values.append(item[c])
        batch[c] = stack_column(c, indices, values)
    return batch

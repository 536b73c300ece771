"""Arrow columns -> torch tensors: which column types a batch can hold, and the conversion.

[Note: column types] A batch is what a Hugging Face model takes as ``model(**batch)``, so
every column must become one dense tensor:
- a numeric scalar column becomes [B];
- a list / large_list / fixed_size_list column whose rows all hold T numbers becomes [B, T].
Integers become int64 (what embedding lookups and ``cross_entropy`` labels take), floats
float32, booleans bool. The same mapping is used for torch Datasets (`_torch_dataset.py`), so
every kind of input gives identical batches. Everything else (strings, nested lists, structs,
nulls, lists of unequal length) is refused once, when the source is built, with the column
named, rather than at some later step on some rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from zray.data.errors import DataError

_ALLOWED = (
    "integer, floating point or boolean scalars, or lists of them (list, large_list, "
    "fixed_size_list) with the same length in every row"
)


@dataclass(frozen=True)
class ColumnSpec:
    """How one validated column converts: the numpy dtype of its values, and T for a list
    column (None for a scalar column)."""

    name: str
    np_dtype: np.dtype
    list_len: int | None


def _value_dtype(column: str, value_type: pa.DataType, column_type: pa.DataType) -> np.dtype:
    if pa.types.is_integer(value_type):
        return np.dtype(np.int64)
    if pa.types.is_floating(value_type):
        return np.dtype(np.float32)
    if pa.types.is_boolean(value_type):
        return np.dtype(np.bool_)
    raise DataError(
        f"column {column!r} is not numeric: got Arrow type {column_type}; allowed: {_ALLOWED}"
    )


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _check_no_nulls(column: str, values: pa.ChunkedArray | pa.Array, where: str) -> None:
    if values.null_count:
        raise DataError(
            f"column {column!r} has {values.null_count} null {where}; allowed: no nulls "
            "(fill or drop them before training)"
        )


def _list_length(column: str, col: pa.ChunkedArray) -> int:
    """T of a list column whose rows all have T values; the ragged error names two lengths.

    Cost: one vectorised pass over the row lengths (no Python loop over rows)."""
    if pa.types.is_fixed_size_list(col.type):
        return col.type.list_size
    lengths = pc.list_value_length(col)
    bounds = pc.min_max(lengths)
    lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
    if lo != hi:
        first = lengths[0].as_py()
        other_row = pc.index(pc.not_equal(lengths, first), True).as_py()
        other = lengths[other_row].as_py()
        raise DataError(
            f"column {column!r} is ragged: row 0 has {first} values, row {other_row} has "
            f"{other}; allowed: lists of one length in every row (pad or pack the sequences "
            "to a fixed length first)"
        )
    return int(lo)


def combine(table: pa.Table) -> pa.Table:
    """``table`` with one chunk per column (a no-op, zero-copy, when it has one already).

    A list<> column holding more than 2^31 - 1 values in all cannot be one chunk (its offsets
    are int32), so it is first cast to large_list<> (int64 offsets)."""
    int32_max = np.iinfo(np.int32).max
    for i, field in enumerate(table.schema):
        col = table.column(i)
        if pa.types.is_list(field.type) and col.num_chunks > 1:
            total = pc.sum(pc.list_value_length(col)).as_py() or 0
            if total > int32_max:
                large = pa.large_list(field.type.value_type)
                table = table.set_column(i, field.with_type(large), col.cast(large))
    return table.combine_chunks()


def column_specs(table: pa.Table) -> list[ColumnSpec]:
    """Validate every column of ``table`` (see the Note above) and say how each converts."""
    specs = []
    for name in table.column_names:
        col = table.column(name)
        _check_no_nulls(name, col, "rows")
        if _is_list(col.type):
            value_type = col.type.value_type
            np_dtype = _value_dtype(name, value_type, col.type)
            list_len = _list_length(name, col) if len(col) else 0
            _check_no_nulls(name, pc.list_flatten(col), "values inside its lists")
        else:
            np_dtype = _value_dtype(name, col.type, col.type)
            list_len = None
        specs.append(ColumnSpec(name, np_dtype, list_len))
    return specs


def to_tensor(col: pa.ChunkedArray, spec: ColumnSpec) -> torch.Tensor:
    """One column of B taken rows -> [B] or [B, T] tensor.

    Cost: the Arrow values are flattened and copied once into a new numpy buffer of the target
    dtype (the copy also makes the tensor own writable memory, which Arrow's buffers are not),
    then wrapped by torch without another copy."""
    if spec.list_len is None:
        flat = col.to_numpy()
        shape: tuple[int, ...] = (len(col),)
    else:
        # list_flatten honours each chunk's offsets (a taken or sliced list array need not
        # start at offset 0, so `.values` would be wrong).
        flat = pc.list_flatten(col).to_numpy()
        shape = (len(col), spec.list_len)
    return torch.from_numpy(np.array(flat, dtype=spec.np_dtype).reshape(shape))

"""Tests for zray.data.sources: every input kind gives the same batches for the same indices.

The reference is computed straight from the token tensor, not from another source, so a bug shared by all input kinds would still show. Ray is started once for
the module, and only if a Ray test runs (about 5 s on the dev machine).
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from zray.data import (
    ArrowTableSource,
    DataError,
    DataFileNotFoundError,
    TableSource,
    TorchDatasetSource,
    as_source,
    lm_tokens_table,
    write_parquet,
)
from zray.models.data import synthetic_tokens

N, T, V = 30, 8, 64
# Any order, with a repeat, touching both ends.
INDICES = [7, 0, 29, 7, 12, 3]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return synthetic_tokens(N, T, V, seed=3)  # [N, T]


def own_labels(tokens: torch.Tensor) -> torch.Tensor:
    """A labels column of a user's own, different from input_ids so that a mix-up shows."""
    return (tokens * 7 + 1) % V


@pytest.fixture(scope="module")
def table(tokens: torch.Tensor) -> pa.Table:
    """input_ids / labels list<int32> [T], plus a scalar int and a scalar float column."""
    t = lm_tokens_table(tokens)
    labels = lm_tokens_table(own_labels(tokens)).column("input_ids")
    t = t.append_column("labels", labels)
    t = t.append_column("sample_id", pa.array(np.arange(N, dtype=np.int32)))
    return t.append_column("weight", pa.array(np.arange(N, dtype=np.float64) / 4))


def expected(tokens: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
    rows = torch.tensor(indices)
    batch = {"input_ids": tokens[rows], "labels": own_labels(tokens[rows])}
    batch["sample_id"] = rows.clone()
    batch["weight"] = rows.to(torch.float32) / 4
    return batch


def assert_batch_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


class DictDataset(Dataset):
    """Map-style dataset of dict items: tensors, python lists and numbers mixed."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        self.reads.append(i)
        row = self.tokens[i]
        return {
            "input_ids": row.to(torch.int32),  # widened to int64 like the Arrow path
            "labels": own_labels(row).tolist(),
            "sample_id": i,
            "weight": i / 4,
        }


@pytest.fixture(scope="module")
def parquet_dir(table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three files written out of name order, plus files a directory reader must skip."""
    d = tmp_path_factory.mktemp("parquet")
    parts = {"part-2.parquet": (20, 10), "part-0.parquet": (0, 7), "part-1.parquet": (7, 13)}
    for name, (start, length) in parts.items():
        write_parquet(table.slice(start, length), d / name)
    (d / "_SUCCESS").write_text("")
    write_parquet(table.slice(0, 1), d / "_metadata.parquet")
    (d / "notes.txt").write_text("not data")
    return d


def _sources(kind: str, table: pa.Table, tokens: torch.Tensor, d: Path) -> TableSource:
    files = [d / f"part-{i}.parquet" for i in range(3)]
    if kind == "arrow":
        return as_source(table)
    if kind == "file":
        single = d.parent / "single.parquet"
        write_parquet(table, single)
        return as_source(str(single))
    if kind == "directory":
        return as_source(d)
    if kind == "glob":
        return as_source(str(d / "part-*.parquet"))
    if kind == "file_list":
        return as_source([str(files[0]), files[1], files[2]])  # str and PathLike mixed
    if kind == "uri":
        return as_source([f"file://{f}" for f in files])
    if kind == "torch":
        return as_source(DictDataset(tokens))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["arrow", "file", "directory", "glob", "file_list", "uri", "torch"]
)
def test_every_input_kind_gives_the_same_batch(
    kind: str, table: pa.Table, tokens: torch.Tensor, parquet_dir: Path
) -> None:
    source = _sources(kind, table, tokens, parquet_dir)
    assert len(source) == N
    assert source.columns == ["input_ids", "labels", "sample_id", "weight"]
    assert_batch_equal(source.take(INDICES), expected(tokens, INDICES))
    # numpy indices, as the sampler hands them, give the same batch.
    assert_batch_equal(source.take(np.array(INDICES)), expected(tokens, INDICES))


def test_columns_selects_and_orders(
    table: pa.Table, tokens: torch.Tensor, parquet_dir: Path
) -> None:
    want = expected(tokens, INDICES)
    for data in (table, parquet_dir, DictDataset(tokens)):
        source = as_source(data, columns=["labels", "input_ids"])
        assert source.columns == ["labels", "input_ids"]
        got = source.take(INDICES)
        assert_batch_equal(got, {"labels": want["labels"], "input_ids": want["input_ids"]})


def test_torch_dataset_is_wrapped_not_materialised(tokens: torch.Tensor) -> None:
    ds = DictDataset(tokens)
    source = as_source(ds)
    assert isinstance(source, TorchDatasetSource) and source.dataset is ds
    assert ds.reads == [0]  # one item read, to learn the columns
    source.take([5, 2])
    assert ds.reads == [0, 5, 2]


def test_fixed_size_list_float_and_bool_columns() -> None:
    values = pa.array(np.arange(12, dtype=np.float64))
    table = pa.table(
        {
            "pixels": pa.FixedSizeListArray.from_arrays(values, 3),
            "flags": pa.array([[True, False], [False, False], [True, True], [False, True]]),
        }
    )
    batch = as_source(table).take([3, 1])
    assert batch["pixels"].dtype == torch.float32
    assert torch.equal(batch["pixels"], torch.tensor([[9.0, 10, 11], [3, 4, 5]]))
    assert batch["flags"].dtype == torch.bool
    assert torch.equal(batch["flags"], torch.tensor([[False, True], [False, False]]))


def test_chunked_table_reads_like_one_chunk(table: pa.Table, tokens: torch.Tensor) -> None:
    chunked = pa.concat_tables([table.slice(i, 4) for i in range(0, N, 4)])
    assert chunked.column(0).num_chunks > 1
    source = as_source(chunked)
    assert isinstance(source, ArrowTableSource)
    assert source.table.column(0).num_chunks == 1
    assert_batch_equal(source.take(INDICES), expected(tokens, INDICES))


def test_arrow_source_pickles(table: pa.Table, tokens: torch.Tensor) -> None:
    # Workers receive their source through Ray (pickle); it must arrive whole.
    source = pickle.loads(pickle.dumps(as_source(table)))
    assert_batch_equal(source.take(INDICES), expected(tokens, INDICES))


def test_lm_tokens_table_holds_the_rows_as_input_ids(tokens: torch.Tensor) -> None:
    t = lm_tokens_table(tokens)
    assert t.column_names == ["input_ids"]  # labels are derived from them (zray.data.collate)
    assert t.schema.field("input_ids").type == pa.list_(pa.int32())
    assert t.column("input_ids")[2].as_py() == tokens[2].tolist()
    assert t.num_rows == N


def test_write_parquet_is_atomic_and_leaves_no_temp(table: pa.Table, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.parquet"
    write_parquet(table.slice(0, 3), target)
    write_parquet(table, target)  # replaces the old file whole
    assert pq.read_table(target).num_rows == N
    assert sorted(os.listdir(target.parent)) == ["data.parquet"]


# --- errors: each names the bad input ---------------------------------------------------------


def test_unknown_type_says_what_is_allowed() -> None:
    with pytest.raises(DataError, match=r"type dict .*allowed: a pyarrow.Table.*Parquet"):
        as_source({"input_ids": [[1, 2]]})
    with pytest.raises(DataError, match=r"list \(allowed only when every element is a path\)"):
        as_source(["a.parquet", 3])

    class Stream(IterableDataset):
        def __iter__(self) -> Iterator[dict[str, int]]:
            yield {"x": 1}

    with pytest.raises(DataError, match="IterableDataset"):
        as_source(Stream())


def test_missing_paths_are_named(tmp_path: Path, parquet_dir: Path) -> None:
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataFileNotFoundError, match=r"nope\.parquet.* does not exist"):
        as_source(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):  # also a FileNotFoundError
        as_source([parquet_dir / "part-0.parquet", missing])
    with pytest.raises(DataFileNotFoundError, match=r"glob .*zzz-\*\.parquet.* matches no file"):
        as_source(str(tmp_path / "zzz-*.parquet"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFileNotFoundError, match="holds no"):
        as_source(empty)


def test_ragged_list_column_names_column_and_lengths() -> None:
    table = pa.table({"input_ids": [[1, 2, 3], [4, 5, 6], [7, 8]]})
    with pytest.raises(DataError, match=r"'input_ids' is ragged: row 0 has 3 values, row 2 has 2"):
        as_source(table)

    class Ragged(Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            return {"input_ids": [1] * (4 if i == 1 else 3)}

    source = as_source(Ragged())
    with pytest.raises(
        DataError, match=r"'input_ids' is ragged: item 0 has 3 values, item 1 has 4"
    ):
        source.take([0, 1, 2])


def test_non_numeric_column_names_column_and_type() -> None:
    table = pa.table({"input_ids": [[1], [2]], "text": ["a", "b"]})
    with pytest.raises(DataError, match=r"column 'text' is not numeric: got Arrow type string"):
        as_source(table)
    nested = pa.table({"deep": [[[1]], [[2]]]})
    with pytest.raises(DataError, match=r"'deep' is not numeric: got Arrow type list<item: list"):
        as_source(nested)

    class Texts(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict[str, str]:
            return {"text": "hello"}

    with pytest.raises(DataError, match=r"column 'text' of item 1 is not numeric: got str"):
        as_source(Texts()).take([1])


def test_other_bad_inputs_are_named(table: pa.Table) -> None:
    with pytest.raises(DataError, match=r"columns \['nope'\] are not in the data"):
        as_source(table, columns=["nope"])
    with pytest.raises(DataError, match=r"has 1 null rows"):
        as_source(pa.table({"x": [1, None]}))
    with pytest.raises(DataError, match=r"row index 30 is out of range; allowed: 0 <= index < 30"):
        as_source(table).take([0, 30])
    with pytest.raises(DataError, match="no rows"):
        as_source(table.slice(0, 0))
    with pytest.raises(DataError, match=r"\[N, T\] tensor with T >= 2"):
        lm_tokens_table(torch.zeros(4, dtype=torch.long))


# --- Ray Dataset ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, at import
def test_ray_dataset_gives_the_same_batch(
    ray_session: None, table: pa.Table, tokens: torch.Tensor
) -> None:
    import ray.data

    # Several blocks, so the order of blocks matters.
    ds = ray.data.from_arrow([table.slice(0, 11), table.slice(11, 9), table.slice(20, 10)])
    source = as_source(ds)
    assert isinstance(source, ArrowTableSource) and len(source) == N
    assert_batch_equal(source.take(INDICES), expected(tokens, INDICES))
    narrow = as_source(ds, columns=["labels"])
    assert narrow.columns == ["labels"]
    assert torch.equal(narrow.take(INDICES)["labels"], expected(tokens, INDICES)["labels"])


def test_ray_is_imported_only_for_a_ray_dataset(
    monkeypatch: pytest.MonkeyPatch, table: pa.Table, tokens: torch.Tensor, parquet_dir: Path
) -> None:
    # A None entry in sys.modules makes `import ray` raise, so any import of ray on these
    # paths would fail the test (ray may be imported already by the Ray test above).
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    for data in (table, parquet_dir, DictDataset(tokens)):
        as_source(data).take([1])


def test_a_corrupt_parquet_file_is_named(tmp_path: Path) -> None:
    from zray.data import lm_tokens_table, write_parquet
    from zray.models.data import synthetic_tokens

    write_parquet(lm_tokens_table(synthetic_tokens(8, 4, 16, seed=1)), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"Parquet file '.*b\.parquet' cannot be read"):
        as_source(str(tmp_path))

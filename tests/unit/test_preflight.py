"""zray.preflight: the driver's checks before Ray starts, each one failure with one message
naming the thing, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from zray.config import Config
from zray.data import DataError, lm_tokens_table, write_parquet
from zray.data.errors import DataFileNotFoundError
from zray.errors import ConfigError
from zray.models.data import synthetic_tokens
from zray.preflight import check_checkpoint_dir, preflight

MODEL = "zray.models.gpt:build"


def config(**run: Any) -> Config:
    return Config.from_dict(
        {
            "train_batch_size": 8,
            "zray": {"model_kwargs": {"size": "tiny", "seq_len": 16}, "num_workers": 2, **run},
        }
    )


def tokens(path: Path, rows: int = 64, seq: int = 16) -> Path:
    return write_parquet(lm_tokens_table(synthetic_tokens(rows, seq, 256, seed=1)), path)


def test_good_data_passes(tmp_path: Path) -> None:
    preflight(
        config(checkpoint_dir=str(tmp_path / "ckpt")), MODEL, str(tokens(tmp_path / "t.parquet"))
    )
    assert (tmp_path / "ckpt").is_dir()


def test_a_path_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match=r"nope\.parquet.* does not exist"):
        preflight(config(), MODEL, str(tmp_path / "nope.parquet"))


def test_a_column_the_model_does_not_take(tmp_path: Path) -> None:
    table = lm_tokens_table(synthetic_tokens(64, 16, 256, seed=1)).rename_columns(["tokens"])
    path = write_parquet(table, tmp_path / "t.parquet")
    with pytest.raises(
        DataError,
        match=r"data column 'tokens': not an argument of GPT.forward\(input_ids, labels, attention_mask\)",
    ):
        preflight(config(), MODEL, str(path))


def test_fewer_rows_than_one_global_batch_and_zero_rows(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"5 rows in 1 Parquet file\(s\), fewer than one global batch \(8"
    ):
        preflight(config(), MODEL, str(tokens(tmp_path / "t.parquet", rows=5)))
    empty = lm_tokens_table(synthetic_tokens(4, 16, 256, seed=1)).slice(0, 0)
    path = write_parquet(empty, tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="hold 0 rows"):
        preflight(config(), MODEL, str(path))


def test_sequences_longer_than_the_model(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sequences of 32 tokens, longer than the model's 16"):
        preflight(config(), MODEL, str(tokens(tmp_path / "t.parquet", seq=32)))


def test_a_corrupt_file_in_a_directory_is_named(tmp_path: Path) -> None:
    tokens(tmp_path / "d" / "a.parquet")
    (tmp_path / "d" / "b.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=r"Parquet file '.*b\.parquet' cannot be read"):
        preflight(config(), MODEL, str(tmp_path / "d"))


def test_a_model_entry_that_does_not_import(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"zray\.model: .*no_such_module"):
        preflight(config(), "no_such_module:build", str(tokens(tmp_path / "t.parquet")))


def test_checkpoint_dir_not_writable_or_too_small(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a directory must be (root ignores permission bits)
    with pytest.raises(
        ConfigError, match=r"zray.checkpoint_dir: Not a directory; got '.*file/ckpt'"
    ):
        check_checkpoint_dir(str(blocker / "ckpt"), None)
    with pytest.raises(ConfigError, match=r"only .* GB free there.*room for one checkpoint"):
        check_checkpoint_dir(str(tmp_path / "ok"), need=10**18)


def test_data_that_is_not_parquet_is_left_to_the_workers() -> None:
    table = lm_tokens_table(synthetic_tokens(4, 16, 256, seed=1))
    preflight(config(), MODEL, table)  # an Arrow table: nothing read here
    preflight(config(), MODEL, {"synthetic": {"seq_len": 16, "vocab_size": 256}})
    assert isinstance(table, pa.Table)

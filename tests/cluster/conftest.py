"""One real local Ray cluster for the cluster tests (starting one takes ~6 s), stopped after them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=max(6, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def parquet_tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Parquet file of learnable tokens (one input_ids column; labels are derived)."""
    from zray.data.sources import lm_tokens_table, write_parquet
    from zray.models.data import synthetic_tokens

    path = tmp_path_factory.mktemp("data") / "tokens.parquet"
    return write_parquet(lm_tokens_table(synthetic_tokens(2048, 16, 64, seed=1)), path)

"""Training data: Arrow / Parquet / Ray Dataset / torch Dataset input, and a deterministic,
resumable, world-size independent sampler.

    source = as_source("tokens.parquet")                     # any supported input
    sampler = GlobalBatchSampler(len(source), global_batch=32, seed=0)
    batches = RankBatches(source, sampler, rank, world, micro_batch=4, gas=2, device=dev)
    batch = next(batches)                                    # {"input_ids": [4, T], ...}
    state = batches.state_dict()                             # into the checkpoint, any rank's
"""

from zray.data.errors import DataError, DataFileNotFoundError
from zray.data.loader import RankBatches
from zray.data.sampler import GlobalBatchSampler, rank_slice
from zray.data.sources import (
    ArrowTableSource,
    TableSource,
    TorchDatasetSource,
    as_source,
    lm_tokens_table,
    write_parquet,
)

__all__ = [
    "ArrowTableSource",
    "DataError",
    "DataFileNotFoundError",
    "GlobalBatchSampler",
    "RankBatches",
    "TableSource",
    "TorchDatasetSource",
    "as_source",
    "lm_tokens_table",
    "rank_slice",
    "write_parquet",
]

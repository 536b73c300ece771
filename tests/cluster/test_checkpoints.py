"""Checkpoints on a real local Ray cluster: corruption, interrupted saves, consolidation."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zray
from tests.cluster import _runs
from zray.checkpoint.consolidate import consolidate
from zray.checkpoint.format import CheckpointCorruptError
from zray.checkpoint.reader import CheckpointReader, latest_valid
from zray.data.collate import causal_lm_batch
from zray.data.sampler import GlobalBatchSampler
from zray.data.sources import as_source
from zray.models.gpt import build

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("ray_cluster")]


def test_corrupt_shard_is_named_and_the_run_falls_back(
    parquet_tokens: Path, tmp_path: Path
) -> None:
    cfg = _runs.config(2, steps=4, num_workers=2, checkpoint_interval=2, keep_last=5)
    zray.fit(config=cfg, data=str(parquet_tokens), checkpoint_dir=str(tmp_path), progress=False)
    shard = tmp_path / "step_00000004" / "shard_00001_of_00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match=r"shard_00001_of_00002\.safetensors"):
        reader = CheckpointReader(tmp_path / "step_00000004")
        for name, shape in reader.params().items():
            reader.read(name, 0, int(torch.Size(shape).numel()))
    # An interrupted later save: shards written, never committed. Never visible.
    partial = tmp_path / "step_00000005"
    partial.mkdir()
    (partial / "shard_00000_of_00002.safetensors").write_bytes(b"half-written")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert latest_valid(tmp_path) == tmp_path / "step_00000002"
    run = zray.fit(
        config=_runs.config(2, steps=6, num_workers=2),
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path),
        progress=False,
    )
    # Resumed after step 2 (its history holds steps 1-2), not after 4 or 5.
    assert [s for s, _ in run.losses] == [1, 2, 3, 4, 5, 6]
    assert any("step_00000002" in d for d in run.decisions), run.decisions


def test_consolidated_equals_single_process_training(parquet_tokens: Path, tmp_path: Path) -> None:
    """2 workers at stage 3 -> `consolidate` -> the state_dict of plain one-process training on
    the same global batches (fp32, 1e-5)."""
    steps, batch = 4, 12
    run = zray.fit(
        config=_runs.config(3, steps=steps, global_batch=batch, num_workers=2),
        data=str(parquet_tokens),
        checkpoint_dir=str(tmp_path / "ckpt"),
        progress=False,
    )
    out = consolidate(run.checkpoint, tmp_path / "model.safetensors")
    got = load_file(str(out))

    torch.manual_seed(0)  # zray.seed's default: the workers seed the same way
    model = build(**_runs.MODEL_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    source = as_source(str(parquet_tokens))
    sampler = GlobalBatchSampler(len(source), batch, seed=0)
    for _ in range(steps):
        opt.zero_grad()
        model(**causal_lm_batch(source.take(sampler.next_global_batch()))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    want = dict(model.named_parameters())
    assert got.keys() == want.keys()
    for name, p in want.items():
        err = float((got[name] - p.detach()).norm() / p.detach().norm())
        assert err <= 1e-5, (name, err)

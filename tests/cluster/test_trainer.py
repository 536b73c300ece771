"""The Trainer without Ray: `python -m zray.launch --nproc 2 zray/trainer.py run.json` trains
the same model, config and data as `zray.fit` and gets the same losses, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest

import zray
from tests.cluster import _runs

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("ray_cluster")]


def test_trainer_under_zray_launch_matches_fit(parquet_tokens: Path, tmp_path: Path) -> None:
    cfg = _runs.config(2, steps=8, num_workers=2)
    cfg["zray"]["data"] = str(parquet_tokens)
    launched = _runs.launch_trainer(cfg, 2, tmp_path)
    fitted = zray.fit(config=cfg, progress=False)
    assert launched["steps"] == fitted.steps == 8
    assert [tuple(x) for x in launched["losses"]] == fitted.losses

"""zray.fit on a GPU (skipped without CUDA), so that this path is never again unmeasured: one
worker, bf16, state copies on (kept by the controller), and a worker killed mid-run recovering
from that copy without disk."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import zray
from zray.cluster.controller import RunStatus

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.usefixtures("ray_cluster"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def gpu_config(stage: int, steps: int, **run: Any) -> dict[str, Any]:
    return {
        "train_batch_size": 8,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage},
        "zray": {
            "model": "zray.models.gpt:build",
            "model_kwargs": {"size": "tiny", "vocab_size": 64, "seq_len": 16},
            "max_steps": steps,
            "use_gpu": True,
            "num_workers": 1,
            "replica_interval": 1,
            "metrics_port": None,
            "poll_interval_s": 0.05,
            **run,
        },
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_fit_trains_on_one_gpu_with_state_copies(parquet_tokens: Path, stage: int) -> None:
    result = zray.fit(config=gpu_config(stage, 60), data=str(parquet_tokens), progress=False)
    assert result.steps == 60 and result.restarts == 0
    assert [s for s, _ in result.losses] == list(range(1, 61))
    assert result.losses[-1][1] < result.losses[0][1] - 1.0, result.losses
    assert [s for s, _ in result.step_times] == list(range(1, 61))
    assert result.copy_interval >= 2, "copies were taken and acknowledged by the controller"


def test_a_killed_gpu_worker_resumes_from_the_controllers_copy(parquet_tokens: Path) -> None:
    cfg = gpu_config(2, 300, max_failures=1)
    killed: list[int] = []

    def kill(st: RunStatus) -> None:
        if not killed and st.step >= 100 and st.worker_pids:
            killed.append(st.step)
            os.kill(st.worker_pids[0], signal.SIGKILL)

    run = zray.fit(config=cfg, data=str(parquet_tokens), progress=kill)
    assert killed and run.restarts == 1 and run.steps == 300
    assert any(d.startswith("recover from in-memory snapshots") for d in run.decisions), (
        run.decisions
    )
    assert [s for s, _ in run.losses] == list(range(1, 301))

"""Shared run settings for the cluster tests: a tiny GPT, fp32, deterministic; and the two
ways the tests run things in other processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

MODEL = "zray.models.gpt:build"
MODEL_KWARGS = {
    "size": "tiny",
    "vocab_size": 64,
    "seq_len": 16,
    "n_layer": 2,
    "n_head": 2,
    "d_model": 32,
    "bias": False,
}


def config(stage: int, steps: int, global_batch: int = 12, **run: Any) -> dict[str, Any]:
    return {
        "train_batch_size": global_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 3000,
            "stage3_param_persistence_threshold": 100,
        },
        "steps_per_print": 1000,
        "zray": {
            "model": MODEL,
            "model_kwargs": MODEL_KWARGS,
            "max_steps": steps,
            "log_interval": 1,
            "poll_interval_s": 0.2,
            **run,
        },
    }


def scenario(module: str, parquet: Path, timeout: float = 600) -> dict[str, Any]:
    """Run `python -m module PARQUET` (a scenario that builds its own multi-node Ray cluster,
    which cannot share a process with the session's) and return its last line, JSON."""
    out = subprocess.run(
        [sys.executable, "-m", module, str(parquet)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # not another Ray's
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def launch_trainer(cfg: dict[str, Any], nproc: int, where: Path) -> dict[str, Any]:
    """The Trainer without Ray: `python -m zray.launch --nproc N zray/trainer.py run.json`;
    returns rank 0's summary (steps, losses)."""
    path = where / "run.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "zray.launch", "--nproc", str(nproc), "zray/trainer.py", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

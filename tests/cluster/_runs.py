"""Shared run settings for the cluster tests: a tiny GPT, fp32, deterministic."""

from __future__ import annotations

from typing import Any

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

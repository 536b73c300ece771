"""`zray fit` on local worker processes: the run section of a config, trained end to end.

This is the launcher until the Ray runtime lands: `launch_local` starts one process per worker
on this machine (gloo on CPU), each builds the model from the config's entry point, wraps it in
the Engine and trains on its slice of every global batch. Rank 0 prints progress.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zray.config import Config
from zray.errors import ConfigError
from zray.initialize import init_distributed, initialize
from zray.launch import launch_local
from zray.models.data import lm_batch, synthetic_tokens


@dataclass
class FitResult:
    steps: int
    world_size: int
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    checkpoint: str | None = None

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def load_entry(spec: str) -> Callable[..., Any]:
    """'package.module:attr.attr' -> the object (a callable building the model)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ConfigError("zray.model", spec, "'package.module:callable'")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            "zray.model", spec, "an importable 'package.module:callable'", str(e)
        ) from e
    if not callable(obj):
        raise ConfigError("zray.model", spec, "a callable returning an nn.Module")
    return obj


def token_source(data: Any, max_steps: int, global_batch: int) -> torch.Tensor:
    """The token table [N, T+1] the run reads (synthetic until Parquet input lands)."""
    spec = data.get("synthetic") if isinstance(data, dict) else None
    if spec is None:
        raise ConfigError(
            "zray.data",
            data,
            "{'synthetic': {'seq_len': T, 'vocab_size': V, 'n_samples': N}} (Parquet, Arrow "
            "and Ray Dataset input come with the Ray runtime)",
        )
    n = int(spec.get("n_samples", max_steps * global_batch))
    return synthetic_tokens(
        n, int(spec["seq_len"]), int(spec["vocab_size"]), seed=int(spec.get("seed", 1))
    )


def rank_batches(
    tokens: torch.Tensor, rank: int, world: int, micro: int, gas: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Rank's micro-batches in order: micro-step m of global step s takes rows
    [s * B + (m * world + rank) * micro, + micro) of the table (wrapping around), B the global
    batch. Every rank sees a disjoint slice, and together they cover each global batch."""
    n, global_batch, step = len(tokens), micro * gas * world, 0
    while True:
        for m in range(gas):
            start = step * global_batch + (m * world + rank) * micro
            rows = torch.arange(start, start + micro) % n
            yield {k: v.to(device) for k, v in lm_batch(tokens[rows]).items()}
        step += 1


def _worker(config: dict[str, Any]) -> FitResult:
    cfg = Config.from_dict(config)
    run = cfg.zray
    ctx = init_distributed()
    torch.manual_seed(run.seed)
    if run.model is None:
        raise ConfigError("zray.model", None, "'package.module:callable' building the model")
    model: nn.Module = load_entry(run.model)(**run.model_kwargs)
    engine, *_ = initialize(model=model, config=cfg)
    steps = run.max_steps or 100
    b = engine.batch
    tokens = token_source(run.data, steps, b.train_batch_size)
    it = rank_batches(
        tokens,
        ctx.dp_rank,
        ctx.dp_size,
        b.micro_batch_per_gpu,
        b.gradient_accumulation_steps,
        ctx.device,
    )
    result = FitResult(steps=steps, world_size=ctx.dp_size)
    tokens_per_step = b.train_batch_size * (tokens.shape[1] - 1)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = engine.train_batch(it)
        if step % run.log_interval == 0 or step == steps:
            value = loss.item()  # host sync, only when logging
            result.losses.append(value)
            if ctx.rank == 0:
                rate = tokens_per_step * step / (time.perf_counter() - t0)
                print(
                    f"step {step:>5}/{steps}  loss {value:.4f}  lr {engine.get_lr()[0]:.2e}  "
                    f"tokens/s {rate:,.0f}  world {ctx.dp_size}",
                    flush=True,
                )
    result.tokens_per_s = tokens_per_step * steps / (time.perf_counter() - t0)
    if run.checkpoint_dir:
        result.checkpoint = engine.save_checkpoint(run.checkpoint_dir)
    return result


def fit_local(config: Config) -> FitResult:
    """Train the config's run on `zray.num_workers` local processes; rank 0's result."""
    return launch_local(_worker, config.zray.num_workers, config.to_dict())[0]

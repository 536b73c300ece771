"""`zray.initialize` and `zray.init_distributed`: deepspeed.initialize's contract, zray's engine.

A training script written for DeepSpeed runs after `import zray as deepspeed`:
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), config="ds_config.json")
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zray.config import Config
from zray.engine import Engine
from zray.parallel.context import ParallelContext
from zray.parallel.context import init_distributed as _init_distributed


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeepSpeed's --deepspeed / --deepspeed_config command-line flags."""
    group = parser.add_argument_group("zray", "zray / DeepSpeed configuration")
    group.add_argument("--deepspeed", action="store_true", help="accepted; zray is always on")
    group.add_argument("--deepspeed_config", default=None, type=str, help="config JSON or YAML")
    return parser


def init_distributed(
    dist_backend: str | None = None,
    timeout: datetime.timedelta | float = 1800.0,
    **ignored: Any,
) -> ParallelContext:
    """Join the job's process group (DeepSpeed's signature; extra DeepSpeed arguments ignored)."""
    return _init_distributed(backend=dist_backend, timeout=timeout)


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
    model_parameters: Iterable[Any] | None = None,
    training_data: Dataset | None = None,
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    collate_fn: Callable[..., Any] | None = None,
    config: Config | dict[str, Any] | str | None = None,
    config_params: dict[str, Any] | None = None,
    **ignored: Any,
) -> tuple[Engine, Any, DataLoader | None, Any]:
    """Returns (engine, optimizer, training_dataloader, lr_scheduler), like deepspeed.initialize.

    The config comes from `config`, `config_params` (DeepSpeed's older name) or
    `args.deepspeed_config`. The process group is joined from the launcher's environment
    (torchrun / deepspeed / zray) when there is one; otherwise the job is a single process.
    """
    if model is None:
        raise ValueError("initialize: model is required")
    if config is None:
        config = config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    cfg = Config.load(config)
    ctx = _init_distributed()
    engine = Engine(model, cfg, ctx, model_parameters, optimizer, lr_scheduler)
    # The engine's context is the data x tensor mesh: ranks of one tensor group read the same
    # samples, so the data is split over the data-parallel dimension only.
    ctx = engine.ctx
    loader = None
    if training_data is not None:
        sampler = (
            DistributedSampler(training_data, num_replicas=ctx.dp_size, rank=ctx.dp_rank)
            if ctx.dp_size > 1
            else None
        )
        loader = DataLoader(
            training_data,
            batch_size=engine.batch.micro_batch_per_gpu,
            sampler=sampler,
            shuffle=sampler is None,
            collate_fn=collate_fn,
            drop_last=True,
        )
    return engine, engine.optimizer, loader, engine.lr_scheduler

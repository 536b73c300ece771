"""Checkpoints across tensor-parallel sizes, run inside each spawned rank (4 ranks).

One job trains zray's GPT (the `_workloads` model, data and config) on a `save` mesh, saves
after `SPLIT` steps and trains on: the uninterrupted run. A second engine on a `load` mesh, built
from another seed so that only a real restore can match, loads that checkpoint and trains the
same steps. Each step's loss is the mean over the whole global batch (every rank's micro-batch
losses averaged over the data-parallel group), so it means the same thing on every mesh.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import zray
from tests.distributed._workloads import GAS, STEPS, data, ds_config, fresh_model, micro_batch

SPLIT = 2


def _run(engine: Any, tokens: torch.Tensor, steps: range) -> list[float]:
    ctx = engine.ctx
    losses = []
    for step in steps:
        total = torch.zeros((), dtype=torch.float32)
        for micro in range(GAS):
            batch = micro_batch(tokens, step, micro, ctx.dp_rank, ctx.dp_size, ctx.device)
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float().cpu()
        if ctx.dp_size > 1:
            dist.all_reduce(total, group=ctx.dp_group)
        # Every micro-batch holds the same number of tokens: the mean of means is the mean.
        losses.append(float(total) / (GAS * ctx.dp_size))
    return losses


def _config(stage: int, tp: int, world: int) -> dict[str, Any]:
    return ds_config(stage, world // tp, tensor_parallel={"tp_size": tp})


def resume_across_tp(
    save_tp: int, load_tp: int, save_stage: int, load_stage: int, save_dir: str
) -> dict[str, Any]:
    ctx = zray.init_distributed()
    world = ctx.world_size
    tokens = data()
    first, *_ = zray.initialize(model=fresh_model(), config=_config(save_stage, save_tp, world))
    before = _run(first, tokens, range(SPLIT))
    first.save_checkpoint(save_dir, client_state={"rank": ctx.rank})
    uninterrupted = _run(first, tokens, range(SPLIT, STEPS))
    uninterrupted_state = first.consolidated_state_dict()

    second, *_ = zray.initialize(
        model=fresh_model(seed=123), config=_config(load_stage, load_tp, world)
    )
    path, client = second.load_checkpoint(save_dir)
    steps_after_load = second.global_steps
    resumed = _run(second, tokens, range(SPLIT, STEPS))
    resumed_state = second.consolidated_state_dict()
    return {
        "meshes": (
            (first.ctx.dp_size, first.ctx.tp_size),
            (second.ctx.dp_size, second.ctx.tp_size),
        ),
        "before": before,
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "uninterrupted_state": uninterrupted_state if ctx.rank == 0 else None,
        "resumed_state": resumed_state if ctx.rank == 0 else None,
        "path": path,
        "client": client,
        "steps_after_load": steps_after_load,
    }


def resume_cases(cases: list[tuple[int, int, int, int]], root: str) -> list[dict[str, Any]]:
    """`resume_across_tp` for each (save tp, load tp, save stage, load stage), one checkpoint
    dir each, in one set of processes (spawning 4 ranks costs seconds: done once)."""
    return [resume_across_tp(*case, f"{root}/case{i}") for i, case in enumerate(cases)]

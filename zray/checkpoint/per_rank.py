"""Per-rank engine checkpoints: each rank saves and loads its own shard.

Layout of `save_dir/tag/`:
  rank_00000.pt ...   this rank's fp32 master shards, optimizer state, RNG states
  meta.json           written by rank 0 after every rank's file is in: the commit marker
`save_dir/latest` names the newest committed tag (updated last, atomically).

A tag without meta.json is an interrupted save and is never loaded. Loading needs the world
size and ZeRO stage it was saved with; loading at another size is the sharded format's job.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zray.checkpoint.atomic import save_torch_atomic, write_bytes_atomic, write_json_atomic
from zray.errors import ZrayError
from zray.zero import comm

if TYPE_CHECKING:
    from zray.engine import Engine

FORMAT = "zray-per-rank-v1"


class CheckpointError(ZrayError):
    pass


def _layout_signature(engine: Engine) -> list[list[Any]]:
    return [
        [u.name, u.layout.padded_numel, [[s.name, list(s.shape), s.offset] for s in u.layout.slots]]
        for u in engine.zero.units
    ]


def save_engine(engine: Engine, save_dir: str, tag: str, client_state: dict[str, Any]) -> str:
    ctx = engine.ctx
    folder = Path(save_dir) / tag
    if ctx.dp_rank == 0 and (folder / "meta.json").exists():
        # Saving over an existing tag: un-commit it first, so a crash while the shards are
        # rewritten leaves an incomplete tag (never loaded) rather than a mixed one.
        (folder / "meta.json").unlink()
    comm.barrier(ctx.dp_group)
    state = {
        "format": FORMAT,
        "master": [u.master.detach().cpu() for u in engine.zero.units],
        "optimizer": engine.zero.optimizer.state_dict(),
        "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None,
        "scaler": engine.scaler.state_dict(),
        "steps": {
            "global_steps": engine.global_steps,
            "micro_steps": engine.micro_steps,
            "skipped_steps": engine.skipped_steps,
        },
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if ctx.is_cuda else None,
            "python": random.getstate(),
        },
        "client_state": client_state,
    }
    save_torch_atomic(folder / f"rank_{ctx.dp_rank:05d}.pt", state)
    comm.barrier(ctx.dp_group)
    if ctx.dp_rank == 0:
        write_json_atomic(
            folder / "meta.json",
            {
                "format": FORMAT,
                "world_size": ctx.dp_size,
                "zero_stage": engine.plan.stage,
                "global_steps": engine.global_steps,
                "layout": _layout_signature(engine),
            },
        )
        write_bytes_atomic(Path(save_dir) / "latest", tag.encode())
    comm.barrier(ctx.dp_group)
    return str(folder)


def load_engine(
    engine: Engine, load_dir: str, tag: str | None
) -> tuple[str | None, dict[str, Any]]:
    ctx = engine.ctx
    root = Path(load_dir)
    if tag is None:
        latest = root / "latest"
        if not latest.exists():
            return None, {}
        tag = latest.read_text().strip()
    folder = root / tag
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(
            f"{folder}: no meta.json, so the save never completed; not loading it"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}; expected {FORMAT!r}")
    if meta["world_size"] != ctx.dp_size or meta["zero_stage"] != engine.plan.stage:
        raise CheckpointError(
            f"{folder}: saved at world size {meta['world_size']}, ZeRO stage {meta['zero_stage']}; "
            f"this engine runs world size {ctx.dp_size}, stage {engine.plan.stage}. Per-rank "
            "checkpoints load only at the same size and stage."
        )
    if meta["layout"] != json.loads(json.dumps(_layout_signature(engine))):
        raise CheckpointError(f"{folder}: the model's parameters differ from the saved ones")
    path = folder / f"rank_{ctx.dp_rank:05d}.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for unit, master in zip(engine.zero.units, state["master"], strict=True):
            unit.master.copy_(master)
    engine.zero.optimizer.load_state_dict(state["optimizer"])
    if engine.lr_scheduler is not None and state["scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
    engine.scaler.load_state_dict(state["scaler"])
    engine.global_steps = state["steps"]["global_steps"]
    engine.micro_steps = state["steps"]["micro_steps"]
    engine.skipped_steps = state["steps"]["skipped_steps"]
    torch.set_rng_state(state["rng"]["torch"])
    if ctx.is_cuda and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    engine.zero.zero_grad()
    engine.zero.publish_params()
    return str(folder), state["client_state"]

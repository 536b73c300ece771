"""DeepSpeed's `save_16bit_model`: the whole model's weights in the compute dtype, one file.

What Hugging Face's Trainer calls to save a model trained under DeepSpeed: rank 0 writes the
model's state dict (torch.save) with every parameter whole, in the 16-bit dtype it computes in.
At ZeRO stage 3 each rank holds a shard, and DeepSpeed gathers the whole weights only when
`zero_optimization.stage3_gather_16bit_weights_on_model_save` is true; otherwise it writes
nothing, says so and returns False. zray does the same. The values are the fp32 master weights
rounded to the compute dtype, which is what the 16-bit parameters hold after each step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from zray.checkpoint.atomic import save_torch_atomic

if TYPE_CHECKING:
    from zray.engine import Engine

log = logging.getLogger("zray")

__all__ = ["save_16bit_model"]


def save_16bit_model(
    engine: Engine,
    save_dir: str | Path,
    save_filename: str = "pytorch_model.bin",
    exclude_frozen_parameters: bool = False,
) -> bool:
    """Write `save_dir/save_filename` on rank 0; True when written. Collective at stage 3 (and
    with tensor slicing): every rank calls it."""
    path = Path(save_dir) / save_filename
    zero = engine.config.zero_optimization
    if engine.plan.partition_params and not zero.stage3_gather_16bit_weights_on_model_save:
        log.warning(
            "did not save the model %s: zero_optimization.stage3_gather_16bit_weights_on_model_"
            "save is false, and at stage 3 no rank holds the whole weights (set it to true, or "
            "save a checkpoint and run 'zray checkpoint consolidate')",
            path,
        )
        return False
    state = engine.consolidated_state_dict()  # collective: fp32, whole, on every rank
    if exclude_frozen_parameters:
        frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
        state = {k: v for k, v in state.items() if k not in frozen}
    dtype = engine.compute_dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if engine.ctx.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_torch_atomic(path, state)
    return True

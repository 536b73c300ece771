"""`GatheredParameters`: make stage-3 parameters whole inside a `with` block, as DeepSpeed's does.

With `modifier_rank=r`, changes rank r makes inside the block are kept: on exit the parameters
are broadcast from r, and every rank copies its range into its shard and fp32 master weights.
Without it, changes are discarded at stages 3 (the shard is unchanged) and left out of the
master weights at stages 0-2 (the next step overwrites them), as in DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType

import torch
from torch import nn

from zray.zero import comm
from zray.zero.unit import FlatUnit, ShardState, UnitKind


class GatheredParameters:
    def __init__(
        self,
        params: nn.Parameter | Iterable[nn.Parameter],
        modifier_rank: int | None = None,
        fwd_module: nn.Module | None = None,  # accepted for DeepSpeed compatibility; unused
        enabled: bool = True,
    ) -> None:
        if isinstance(params, torch.Tensor):
            params = [params]
        self.params = [p for p in params if getattr(p, "_zray_unit", None) is not None]
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self._units: list[FlatUnit] = []
        for p in self.params:
            unit = p._zray_unit
            if unit not in self._units:
                self._units.append(unit)
        self._was_sharded: list[FlatUnit] = []

    def __enter__(self) -> None:
        if not self.enabled:
            return
        for unit in self._units:
            unit.wait_published()  # overlap_param_gather: a step's all-gather may be in flight
        self._was_sharded = [u for u in self._units if u.state is not ShardState.GATHERED]
        for unit in self._was_sharded:
            unit.gather()
        for unit in self._was_sharded:
            unit.wait_gathered()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.enabled:
            return
        if self.modifier_rank is not None and exc_type is None:
            with torch.no_grad():
                for p in self.params:
                    self._persist(p)
        for unit in self._was_sharded:
            unit.release()

    def _persist(self, p: nn.Parameter) -> None:
        unit: FlatUnit = p._zray_unit
        slot = unit.layout.slots[unit.slot_of(p)]
        comm.broadcast(p.data, self.modifier_rank or 0, unit.ctx.dp_group)
        overlap = unit.layout.slot_overlap(slot, unit.ctx.dp_rank)
        if overlap is None:
            return
        lo, hi = overlap
        values = p.data.reshape(-1)[lo:hi]
        at = slot.offset + lo - unit.shard_lo  # position inside this rank's shard
        unit.master[at : at + hi - lo].copy_(values)
        if unit.kind is UnitKind.ON_DEMAND and unit.shard is not None:
            unit.shard[at : at + hi - lo].copy_(values)

"""This rank's share of the training state, as the ZeRO optimizer hands it out.

For every parameter slot that overlaps this rank's shard: which element range of the parameter
it owns, and where that range's fp32 master weights and the optimizer's element-wise state
(Adam's moments) sit, as (flat tensor, first element). Checkpoint code
(`zray.checkpoint.engine_state`) maps these onto its format without knowing units, segments or
the optimizer's state dict; loading writes through the same places.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from zray.zero.optimizer import ZeroOptimizer


@dataclass(frozen=True)
class Place:
    """A run of elements in a flat tensor: `tensor.reshape(-1)[offset : offset + n]`."""

    tensor: torch.Tensor
    offset: int

    def view(self, n: int) -> torch.Tensor:
        return self.tensor.reshape(-1)[self.offset : self.offset + n]


@dataclass(frozen=True)
class OwnedSlot:
    """Elements [lo, hi) of parameter `name` (as this rank holds it: a tensor slice's local
    shape), owned by this rank. `group` is the optimizer param group, -1 if not trained."""

    name: str
    shape: tuple[int, ...]
    lo: int
    hi: int
    group: int
    master: Place
    segment: torch.Tensor | None  # the optimizer's tensor holding this range; None: not trained
    segment_offset: int  # where the range starts in `segment`

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def owned_slots(zero: ZeroOptimizer, dp_rank: int) -> Iterator[OwnedSlot]:
    """The slots overlapping `dp_rank`'s shard, in unit and buffer order."""
    for ui, unit in enumerate(zero.units):
        for slot in unit.layout.slots:
            overlap = unit.layout.slot_overlap(slot, dp_rank)
            if overlap is None:
                continue
            lo, hi = overlap
            a = slot.offset + lo  # position in the unit's flat buffer
            segment, seg_offset = None, 0
            if slot.group >= 0:
                seg, segment = zero.segment_tensors[(ui, slot.group)]
                seg_offset = a - seg.lo
            master = Place(unit.master, a - unit.shard_lo)
            yield OwnedSlot(
                slot.name, tuple(slot.shape), lo, hi, slot.group, master, segment, seg_offset
            )


def elementwise_state(zero: ZeroOptimizer, slot: OwnedSlot) -> dict[str, Place]:
    """The optimizer's element-wise state of `slot`'s range, by key (empty before the first
    step)."""
    if slot.segment is None:
        return {}
    out = {}
    for key, value in zero.optimizer.state.get(slot.segment, {}).items():
        if isinstance(value, torch.Tensor) and value.shape == slot.segment.shape:
            out[key] = Place(value, slot.segment_offset)
    return out


def state_place(zero: ZeroOptimizer, slot: OwnedSlot, key: str) -> Place:
    """Where state `key` of `slot`'s range goes, created as zeros if the optimizer has none yet
    (a load before the first step)."""
    assert slot.segment is not None, f"{slot.name} is not trained"
    state = zero.optimizer.state.setdefault(slot.segment, {})
    if key not in state:
        state[key] = torch.zeros_like(slot.segment)
    return Place(state[key], slot.segment_offset)


def group_scalars(zero: ZeroOptimizer) -> dict[tuple[int, str], torch.Tensor | float]:
    """Per-group scalar optimizer state (Adam's "step"), by (group, key): a 0-dim tensor
    (reading it on the host would sync; copy it instead) or a number."""
    out: dict[tuple[int, str], torch.Tensor | float] = {}
    for gi, group in enumerate(zero.optimizer.param_groups):
        for t in group["params"]:
            for key, value in zero.optimizer.state.get(t, {}).items():
                scalar_tensor = isinstance(value, torch.Tensor) and value.dim() == 0
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if scalar_tensor or number:
                    out[(gi, key)] = value
    return out


def load_group_scalars(zero: ZeroOptimizer, scalars: list[dict[str, float]]) -> None:
    """Set each group's scalar state (as saved by `group_scalars`) on its tensors that have
    state."""
    for gi, group in enumerate(zero.optimizer.param_groups):
        values = scalars[gi] if gi < len(scalars) else {}
        for t in group["params"]:
            if t in zero.optimizer.state:
                for key, value in values.items():
                    # torch's Adam keeps "step" as a float32 CPU scalar tensor.
                    zero.optimizer.state[t][key] = torch.tensor(value, dtype=torch.float32)


def group_settings(zero: ZeroOptimizer) -> list[dict[str, Any]]:
    """Each param group's settings (lr, betas, ...), without its tensors."""
    return [{k: v for k, v in g.items() if k != "params"} for g in zero.optimizer.param_groups]


def load_group_settings(zero: ZeroOptimizer, saved: list[dict[str, Any]]) -> None:
    """Set the settings the groups already have from `saved` (extra keys are left out)."""
    for group, values in zip(zero.optimizer.param_groups, saved, strict=False):
        for k, v in values.items():
            if k in group:
                group[k] = tuple(v) if isinstance(group[k], tuple) else v

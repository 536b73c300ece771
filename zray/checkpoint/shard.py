"""The canonical, world-size-independent form of one rank's training state.

A rank holds contiguous element ranges of some parameters (at stage 0 every rank holds all of
them; at stages 1-3 each holds 1/N of each flat unit). Whatever the stage and world size, that
is a list of `ParamRange`s: (parameter name, flat range inside the parameter, fp32 tensors for
that range). Saving writes these ranges; loading asks for the ranges the new layout needs and
assembles them from whichever saved ranges overlap. That is all resharding is.

With tensor slicing a rank's parameter may be a slice of the full one: its ranges then index the
rank's local slice, and carry the `TPSlice` that places the slice in the full tensor, so a
loader at another tensor-parallel size can map them (tp_read.py). `rank` and `world_size` are
global (a rank of the data x tensor mesh), not data-parallel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from zray.parallel.tp_slice import TPSlice

# Keys of a ParamRange's tensors: the fp32 master weights, plus the optimizer's element-wise
# state under its own names (Adam: "exp_avg", "exp_avg_sq"; SGD: "momentum_buffer").
MASTER = "master"


@dataclass
class ParamRange:
    name: str  # the parameter's name in model.named_parameters() (first name of a tied one)
    shape: tuple[int, ...]  # the whole (full, unsliced) parameter's shape
    lo: int  # flat element range [lo, hi) inside the parameter (inside this rank's slice if tp)
    hi: int
    tensors: dict[str, torch.Tensor]  # key -> fp32 tensor of hi - lo elements (CPU)
    tp: TPSlice | None = None  # the tensor-parallel slice the range indexes; None: whole

    def __post_init__(self) -> None:
        if self.tp is not None:
            assert self.tp.full_shape == tuple(self.shape), (self.name, self.tp, self.shape)
        numel = 1
        for d in self.tp.local_shape if self.tp is not None else self.shape:
            numel *= d
        assert 0 <= self.lo < self.hi <= numel, (self.name, self.lo, self.hi, self.shape)
        for k, t in self.tensors.items():
            assert t.numel() == self.hi - self.lo, (self.name, k, t.numel(), self.hi - self.lo)


@dataclass
class RankShard:
    """Everything one rank saves. Global entries (`engine`, `sampler`) are taken from rank 0."""

    rank: int
    world_size: int
    zero_stage: int
    ranges: list[ParamRange]
    tp_size: int = 1  # the tensor-parallel size of the saving job (world = dp x tp)
    # Optimizer scalars shared by all elements (Adam's "step"), per param group.
    group_scalars: list[dict[str, float]] = field(default_factory=list)
    # Param group hyperparameters (lr, betas, weight_decay, ...), without the params.
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    # Engine counters, loss scaler and LR scheduler state: identical on every rank.
    engine: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] | None = None
    # Tied parameters: each further name of a parameter -> the name its ranges are saved under
    # (the first in named_parameters()), e.g. {"lm_head.weight": "tok_emb.weight"}.
    tied: dict[str, str] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)  # this rank's RNG states
    client_state: dict[str, Any] = field(default_factory=dict)


@dataclass
class PackedShard:
    """A RankShard in the form it crosses processes in: a few flat byte arrays and ranges into
    them, instead of one small tensor per range.

    Ray serialises numpy arrays out of band (one copy into the object store, none out of it);
    a torch tensor pickles its whole storage once per view, which for views of one buffer
    would send the buffer once per range. `unpack` rebuilds the ranges as views.
    """

    shard: RankShard  # everything but the ranges (ranges == [])
    arrays: list[Any]  # numpy uint8 arrays, the bytes of each flat source tensor
    dtypes: list[torch.dtype]
    # (name, whole shape, lo, hi, tp slice, {key: (array index, first element)})
    ranges: list[tuple[str, tuple[int, ...], int, int, TPSlice | None, dict[str, tuple[int, int]]]]

    @property
    def step(self) -> int:
        return int(self.shard.engine.get("global_steps", 0))

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)

    def unpack(self) -> RankShard:
        flats = []
        for a, dtype in zip(self.arrays, self.dtypes, strict=True):
            with warnings.catch_warnings():
                # Arrays deserialised from Ray's object store are read-only views; the ranges
                # are only read from (restore copies them into the engine's own tensors).
                warnings.simplefilter("ignore", UserWarning)
                flats.append(torch.from_numpy(a).view(dtype))
        ranges = []
        for name, shape, lo, hi, tp, parts in self.ranges:
            tensors = {}
            for key, (i, o) in parts.items():
                view = flats[i][o : o + hi - lo]
                tensors[key] = view if view.dtype == torch.float32 else view.float()
            ranges.append(ParamRange(name, shape, lo, hi, tensors, tp=tp))
        return RankShard(**{**self.shard.__dict__, "ranges": ranges})

    def copy(self) -> PackedShard:
        """The same shard in private (heap) arrays: a received one stops pinning the buffers
        it arrived in."""
        return PackedShard(self.shard, [a.copy() for a in self.arrays], self.dtypes, self.ranges)

"""DeepSpeed's fp16.auto_cast: the engine casts floating-point inputs to fp16 before forward."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import zray


class Pair(NamedTuple):
    x: torch.Tensor
    ids: torch.Tensor


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.seen: list[Any] = []

    def forward(self, x: torch.Tensor, extra: dict, pair: Pair) -> torch.Tensor:
        self.seen = [x.dtype, extra["y"].dtype, extra["mask"].dtype, pair.x.dtype, pair.ids.dtype]
        return (x.float() * self.w.float()).sum()


def _seen(auto_cast: bool) -> list[Any]:
    config = {
        "train_batch_size": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "fp16": {"enabled": True, "auto_cast": auto_cast},
    }
    engine, *_ = zray.initialize(model=Recorder(), config=config)
    x = torch.ones(4)
    extra = {"y": torch.ones(2, dtype=torch.float64), "mask": torch.ones(2, dtype=torch.bool)}
    engine(x, extra=extra, pair=Pair(torch.ones(3), torch.arange(3)))
    return engine.module.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_auto_cast_casts_floating_inputs_and_only_them() -> None:
    half, f32, f64, b, i64 = torch.float16, torch.float32, torch.float64, torch.bool, torch.int64
    assert _seen(True) == [half, half, b, half, i64]
    assert _seen(False) == [f32, f64, b, f32, i64]  # DeepSpeed's default: inputs as given

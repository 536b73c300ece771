"""Median seconds of a GPU callable, timed with CUDA events (shared by the GPU benchmarks)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], warmup: int, steps: int) -> float:
    """Median over `steps` event-timed calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)

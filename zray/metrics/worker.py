"""A worker's metric values: updated by the training loop, shipped as a plain dict.

The dict maps metric names from `zray.metrics.registry` to a number, or (for metrics with an
extra label such as `kind` or `part`) to {label value: number}. Counters hold running totals;
the exporter publishes them as they are. Nothing here talks to Prometheus.
"""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from zray.checkpoint.replica import ReplicaStats
    from zray.parallel.comm_stats import CommStats

Snapshot = dict[str, float | dict[str, float]]


def _rss_bytes() -> float:
    """Resident set size of this process (CPU runs report it as 'allocated')."""
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class WorkerMetrics:
    def __init__(self, flops_per_token: float, peak_tflops: float) -> None:
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.values: Snapshot = {
            "zray_steps_total": 0.0,
            "zray_tokens_total": 0.0,
            "zray_samples_total": 0.0,
            "zray_skipped_steps_total": 0.0,
            "zray_checkpoint_bytes_total": 0.0,
            "zray_data_seconds_total": 0.0,
            "zray_data_wait_seconds_total": 0.0,
        }
        self._peak_rss = 0.0

    def step(
        self,
        step: int,
        seconds: float,
        tokens: int,
        samples: int,
        *,
        loss_scale: float,
        skipped_steps: int,
        data_seconds_total: float,
        data_wait_seconds_total: float = 0.0,
    ) -> None:
        """After each optimizer step (no host sync: only Python numbers are read)."""
        v = self.values
        v["zray_step"] = float(step)
        v["zray_steps_total"] = float(v["zray_steps_total"]) + 1
        v["zray_step_seconds"] = seconds
        v["zray_tokens_total"] = float(v["zray_tokens_total"]) + tokens
        v["zray_samples_total"] = float(v["zray_samples_total"]) + samples
        rate = tokens / seconds if seconds > 0 else 0.0
        v["zray_tokens_per_second"] = rate
        v["zray_samples_per_second"] = samples / seconds if seconds > 0 else 0.0
        tflops = self.flops_per_token * rate / 1e12
        v["zray_device_tflops"] = tflops
        v["zray_mfu_ratio"] = tflops / self.peak_tflops if self.peak_tflops > 0 else float("nan")
        v["zray_loss_scale"] = float(loss_scale)
        v["zray_skipped_steps_total"] = float(skipped_steps)
        v["zray_data_seconds_total"] = data_seconds_total
        v["zray_data_wait_seconds_total"] = data_wait_seconds_total

    def mfu(self, tokens_per_s: float) -> float | None:
        """MFU of one device training `tokens_per_s` (None where the peak is unknown)."""
        if self.peak_tflops <= 0 or self.flops_per_token <= 0:
            return None
        return self.flops_per_token * tokens_per_s / 1e12 / self.peak_tflops

    def copies(self, stats: ReplicaStats) -> None:
        """The state copies' counters (zray.checkpoint.replica)."""
        v = self.values
        v["zray_replica_copies_total"] = float(stats.copies)
        v["zray_replica_interval_steps"] = stats.interval
        v["zray_replica_stall_seconds_total"] = stats.stall_seconds
        if stats.newest_step is not None:
            v["zray_replica_step"] = float(stats.newest_step)

    def logged(self, loss: float, grad_norm: float | None = None) -> None:
        """When a step's values are read (one step late, with no host sync of their own)."""
        self.values["zray_loss"] = loss
        if grad_norm is not None:
            self.values["zray_grad_norm"] = grad_norm

    def sample(
        self, comm: CommStats, state_bytes: dict[str, int], device: torch.device | None
    ) -> None:
        """The slower-moving values (collective counters, memory), when a report is made
        rather than every step: on a small model the step's host time is the budget.
        `device`: the CUDA device whose memory to read (None: this process's RSS)."""
        v = self.values
        v["zray_comm_calls_total"] = {k: float(n) for k, n in comm.calls.items()}
        v["zray_comm_bytes_total"] = {k: float(n) for k, n in comm.bytes.items()}
        v["zray_comm_seconds_total"] = dict(comm.seconds)
        v["zray_state_bytes"] = {k: float(b) for k, b in state_bytes.items()}
        if device is not None:
            dev = device
            v["zray_memory_allocated_bytes"] = float(torch.cuda.memory_allocated(dev))
            v["zray_memory_reserved_bytes"] = float(torch.cuda.memory_reserved(dev))
            v["zray_memory_peak_bytes"] = float(torch.cuda.max_memory_allocated(dev))
        else:
            rss = _rss_bytes()
            self._peak_rss = max(self._peak_rss, rss)
            v["zray_memory_allocated_bytes"] = rss
            v["zray_memory_reserved_bytes"] = rss
            v["zray_memory_peak_bytes"] = self._peak_rss

    def checkpoint_saved(self, seconds: float, nbytes: int) -> None:
        self.values["zray_checkpoint_save_seconds"] = seconds
        self.values["zray_checkpoint_bytes_total"] = (
            float(self.values["zray_checkpoint_bytes_total"]) + nbytes
        )

    def checkpoint_loaded(self, seconds: float) -> None:
        self.values["zray_checkpoint_load_seconds"] = seconds

    def snapshot(self) -> dict[str, Any]:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.values.items()}

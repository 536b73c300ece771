"""Every metric zray publishes, declared once, with its unit in its name.

Workers do not run HTTP servers: each worker keeps a plain dict of its latest values (see
`zray.metrics.worker`) and ships it with the report the controller already polls. The
controller turns those dicts into Prometheus samples labelled run / rank / node / stage and
serves them on ONE endpoint, so one Prometheus job scrapes a whole run however many workers
come and go. The same samples go to a JSONL file per run.

Labels: `run` (the run's name), `rank`, `node` (Ray node id or host), `stage` (ZeRO stage) on
worker metrics; `run` on controller metrics; `kind` on per-collective metrics; `state` on the
controller-state gauge.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    GAUGE = "gauge"
    COUNTER = "counter"  # monotonically increasing totals; names end in _total


class Source(enum.Enum):
    WORKER = "worker"
    CONTROLLER = "controller"


WORKER_LABELS = ("run", "rank", "node", "stage")
CONTROLLER_LABELS = ("run",)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    source: Source
    extra_labels: tuple[str, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        base = WORKER_LABELS if self.source is Source.WORKER else CONTROLLER_LABELS
        return base + self.extra_labels


def _w(name: str, kind: Kind, help: str, *extra: str) -> MetricSpec:
    return MetricSpec(name, kind, help, Source.WORKER, extra)


def _c(name: str, kind: Kind, help: str, *extra: str) -> MetricSpec:
    return MetricSpec(name, kind, help, Source.CONTROLLER, extra)


G, C = Kind.GAUGE, Kind.COUNTER

METRICS: tuple[MetricSpec, ...] = (
    # throughput
    _w("zray_step_seconds", G, "Wall time of the last optimizer step"),
    _w("zray_steps_total", C, "Optimizer steps completed (skipped fp16 steps included)"),
    _w("zray_tokens_total", C, "Input tokens this rank has trained on"),
    _w("zray_samples_total", C, "Samples this rank has trained on"),
    _w("zray_tokens_per_second", G, "This rank's tokens per second over the last step"),
    _w("zray_samples_per_second", G, "This rank's samples per second over the last step"),
    _w("zray_device_tflops", G, "Model TFLOP/s this device achieved over the last step"),
    _w("zray_mfu_ratio", G, "Model FLOPs utilisation: achieved / the device's dense peak"),
    # optimisation
    _w("zray_loss", G, "Loss of the last logged step (mean over all ranks)"),
    _w("zray_grad_norm", G, "Global gradient norm before clipping, last step"),
    _w("zray_loss_scale", G, "Current fp16 loss scale (1 without fp16)"),
    _w("zray_skipped_steps_total", C, "Steps skipped because of fp16 overflow"),
    # memory
    _w("zray_memory_allocated_bytes", G, "Device memory allocated by tensors (CPU: process RSS)"),
    _w("zray_memory_reserved_bytes", G, "Device memory reserved by the caching allocator"),
    _w("zray_memory_peak_bytes", G, "Peak device memory allocated since the run started"),
    _w("zray_state_bytes", G, "Bytes this rank holds for training state", "part"),
    # communication, data, checkpoints
    _w("zray_comm_seconds_total", C, "Seconds the step waited on collectives", "kind"),
    _w("zray_comm_bytes_total", C, "Bytes this rank sent into collectives", "kind"),
    _w("zray_comm_calls_total", C, "Collectives launched", "kind"),
    _w("zray_data_seconds_total", C, "Seconds spent building batches (ahead, off the step)"),
    _w("zray_data_wait_seconds_total", C, "Seconds steps waited for a batch not yet built"),
    _w("zray_replica_copies_total", C, "In-memory state copies a peer has acknowledged"),
    _w("zray_replica_interval_steps", G, "Steps between the last two acknowledged state copies"),
    _w("zray_replica_step", G, "Step of the newest acknowledged in-memory state copy"),
    _w("zray_replica_stall_seconds_total", C, "Seconds steps waited for state copies"),
    _w("zray_checkpoint_save_seconds", G, "Duration of the last checkpoint save"),
    _w("zray_checkpoint_load_seconds", G, "Duration of the last checkpoint load"),
    _w("zray_checkpoint_bytes_total", C, "Bytes of checkpoint shards written"),
    _w("zray_step", G, "Global step this rank has completed"),
    # the controller
    _c("zray_world_size", G, "Workers in the current group"),
    _c("zray_restarts_total", C, "Times the group was restarted after a failure"),
    _c("zray_resizes_total", C, "Times the group changed size"),
    _c("zray_lost_steps_total", C, "Steps redone after failures (replayed from checkpoints)"),
    _c(
        "zray_resize_seconds_total", C, "Seconds from a resize or failure to the new group starting"
    ),
    _c("zray_controller_state", G, "1 for the controller's current state, 0 otherwise", "state"),
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}
assert len(BY_NAME) == len(METRICS), "a metric is declared twice"

"""What a run's parts hand each other: the spec every worker trains from, the report the
controller polls, and the outcome a worker's run returns (zray.trainer makes the reports and
outcomes; zray.cluster reads them)."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zray.checkpoint.shard import RankShard


@dataclass
class RunSpec:
    """Everything a worker needs to train; pickled to every worker."""

    config: dict[str, Any]  # Config.to_dict(): DeepSpeed keys plus the "zray" run section
    model: Callable[..., nn.Module] | str  # a factory, or "package.module:callable"
    data: Any  # anything zray.data.as_source accepts
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Unique to this zray.fit call (the spec is made once and pickled to every worker): checkpoint
    # pieces carry it, so a piece an earlier, killed run left in the same directory is never
    # committed beside this run's.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class WorkerPhase(enum.StrEnum):
    STARTING = "starting"  # building the model and engine, restoring, loading data
    TRAINING = "training"
    CHECKPOINTING = "checkpointing"  # writing a checkpoint
    PAUSED = "paused"  # stopped at an agreed step for a resize; state handed over
    DONE = "done"  # max_steps reached


@dataclass(frozen=True)
class Report:
    """A worker's progress, as polled by the controller."""

    rank: int
    pid: int
    node: str
    step: int = 0
    loss: float | None = None  # the global mean loss of the newest step read (one step late)
    tokens_per_s: float = 0.0  # all ranks, over the last ~20 s
    mfu: float | None = None  # model FLOPs utilisation over the same window (None: unknown)
    checkpoint_step: int | None = None
    phase: WorkerPhase = WorkerPhase.STARTING
    stage: int = 0
    copy_interval: float = 0.0  # steps between this rank's last two state copies (0: none yet)
    copy_step: int | None = None  # the step of this rank's newest acknowledged state copy
    steps_done: int = 0  # steps this process completed (exact: read when the report is asked)
    # Wall-clock times (time.time()) of this rank's start-up: "process" (its actor made), "run"
    # (training asked for), "rendezvous" (process group up), "built" (model and engine made),
    # "restored" (state loaded), "first_step" (its first step done). Recovery benchmarks split a restart with them.
    milestones: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # see zray.metrics.worker


@dataclass
class RunOutcome:
    """Rank 0's return value when training completes."""

    steps: int
    losses: list[tuple[int, float]]
    tokens_per_s: float
    checkpoint: str | None
    world_size: int
    # (step, seconds since this group started training) when the step's values were read back
    # from the device, i.e. when the device had finished it (to within the host's own step).
    step_times: list[tuple[int, float]] = field(default_factory=list)
    copy_stats: dict[str, Any] = field(default_factory=dict)  # ReplicaStats.as_dict()
    # A planned pause (a resize): every rank stopped after the same step and hands over its
    # state, which the next group restores from memory instead of disk.
    paused: bool = False
    handover: RankShard | None = None
    preempted: bool = False  # this rank's process got SIGTERM (zray.cluster.worker): it paused

"""zray's run-time sections: DeepSpeed's "elasticity" block and zray's own "zray" run section.

Split from `config.sections` (the training-step sections); same conventions: field names and
defaults beside their constraints, cross-field rules in each section's `_check`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from zray.config.fields import (
    Section,
    meta,
)
from zray.errors import NOT_GIVEN, ConfigError

# DeepSpeed's elasticity versions: 0.1 plans single GPUs, 0.2 whole nodes of num_gpus_per_node.
_ELASTICITY_VERSIONS = (0.1, 0.2)


@dataclass(frozen=True)
class ElasticityConfig(Section):
    """DeepSpeed's "elasticity" section: one global batch that suits many world sizes.

    When enabled, the global batch is chosen from `micro_batch_sizes` and `max_train_batch_size`
    by DeepSpeed's rule (the candidate valid for the most world sizes in min_gpus..max_gpus,
    intersected in zray with zray.num_workers), and each world size gets the largest micro-batch
    that divides its share; `zray.config.batch` does the planning. Names, defaults and checks
    are DeepSpeed's, except that max_train_batch_size and micro_batch_sizes have no defaults
    (DeepSpeed's 2000 and [2, 4, 6] are never used: enabling requires both).
    """

    _path: ClassVar[str] = "elasticity"

    enabled: bool = False
    max_train_batch_size: int | None = field(default=None, metadata=meta(gt=0))
    micro_batch_sizes: tuple[int, ...] | None = None
    min_gpus: int = field(default=1, metadata=meta(ge=1))
    max_gpus: int = field(default=10_000, metadata=meta(ge=1))
    # Minutes a run should train before a scheduler rescales it (DeepSpeed: 0 = unknown).
    min_time: float = field(default=0.0, metadata=meta(ge=0))
    version: float = field(default=0.2, metadata=meta(choices=_ELASTICITY_VERSIONS))
    prefer_larger_batch: bool = True
    # False: train_batch_size / micro / gas next to an enabled block are an error, as in
    # DeepSpeed; True: they are overridden by the plan.
    ignore_non_elastic_batch_info: bool = False
    num_gpus_per_node: int = field(default=1, metadata=meta(ge=1))
    model_parallel_size: int = field(default=1, metadata=meta(ge=1))

    @classmethod
    def _prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        # DeepSpeed reads the version with float(), so "0.2" in a JSON file is accepted there.
        version = raw.get("version")
        if isinstance(version, str) and re.fullmatch(r"\d+(\.\d+)?", version.strip()):
            raw["version"] = float(version)
        # Anything else stays as written: the field check names it and the versions allowed.
        return raw

    @property
    def dp_per_node(self) -> int:
        """Data-parallel ranks per planning unit: a node in version 0.2, one GPU in 0.1."""
        if self.version == 0.1:
            return 1
        return self.num_gpus_per_node // self.model_parallel_size

    def _check(self) -> None:
        micros = self.micro_batch_sizes
        if micros is not None:
            key = "elasticity.micro_batch_sizes"
            allowed = "a non-empty list of integers > 0"
            if not micros:
                raise ConfigError(key, [], allowed, "no micro-batch size to choose from")
            bad = [m for m in micros if m <= 0]
            if bad:
                raise ConfigError(key, list(micros), allowed, f"{bad[0]} is not > 0")
        if not self.enabled:
            return  # DeepSpeed reads the rest only once elasticity is on
        for name in ("max_train_batch_size", "micro_batch_sizes"):
            if getattr(self, name) is None:
                reason = "required when elasticity.enabled is true"
                raise ConfigError(f"elasticity.{name}", NOT_GIVEN, self._allowed(name), reason)
        assert micros is not None and self.max_train_batch_size is not None  # checked just above
        if self.min_gpus > self.max_gpus:
            reason = f"min_gpus ({self.min_gpus}) is greater than max_gpus ({self.max_gpus})"
            raise ConfigError(
                "elasticity.min_gpus", self.min_gpus, "<= elasticity.max_gpus", reason
            )
        mp = self.model_parallel_size
        if mp > 1 and self.version != 0.2:
            reason = f"model_parallel_size {mp} needs elasticity version 0.2"
            raise ConfigError(
                "elasticity.version", self.version, "0.2 when model_parallel_size > 1", reason
            )
        if self.version == 0.2 and self.num_gpus_per_node % mp:
            reason = (
                f"num_gpus_per_node ({self.num_gpus_per_node}) is not divisible by "
                f"model_parallel_size ({mp}): a node must hold whole model replicas"
            )
            raise ConfigError(
                "elasticity.num_gpus_per_node",
                self.num_gpus_per_node,
                f"a multiple of {mp}",
                reason,
            )
        # Every micro-batch must fit under the batch cap (DeepSpeed checks all of them, not just
        # one); in version 0.2 the cap applies per node, to max_train_batch_size // dp_per_node.
        cap = self.max_train_batch_size // self.dp_per_node
        if max(micros) > cap:
            where = (
                "" if self.dp_per_node == 1 else f" // {self.dp_per_node} ranks per node = {cap}"
            )
            reason = (
                f"micro-batch size {max(micros)} is larger than max_train_batch_size"
                f"{where}, so no global batch can hold it"
            )
            allowed = (
                f"an integer >= {max(micros) * self.dp_per_node}, the largest micro-batch size"
            )
            if self.dp_per_node > 1:
                allowed += f" x {self.dp_per_node} ranks per node"
            raise ConfigError(
                "elasticity.max_train_batch_size", self.max_train_batch_size, allowed, reason
            )


_MODEL_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_NUM_WORKERS_ALLOWED = "an integer >= 1, or a list [min, max] of integers with 1 <= min <= max"


@dataclass(frozen=True)
class RunConfig(Section):
    """zray's own "zray" section: what to train and how many workers (not a DeepSpeed key)."""

    _path: ClassVar[str] = "zray"

    model: str | None = None  # "package.module:callable" returning an nn.Module
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str | tuple[str, ...] | dict[str, Any] | None = None  # path(s) or a reader spec
    # A fixed int, or [min, max]: an elastic run that grows and shrinks between the two (see
    # min_workers / max_workers / elastic, and zray.config.batch for the batch at each size).
    num_workers: int | tuple[int, int] = 1
    max_steps: int | None = field(default=None, metadata=meta(gt=0))
    seed: int = field(default=0, metadata=meta(ge=0))
    checkpoint_dir: str | None = None
    # The steps whose loss enters the run's history (FitResult.losses, checkpoints): every
    # log_interval-th and the last. The live line and the metrics get every step's loss (read
    # one step late, without a host sync).
    log_interval: int = field(default=1, metadata=meta(ge=1))
    # Fault tolerance: a checkpoint every `checkpoint_interval` steps bounds the work a failure
    # loses; the last `keep_last` committed ones are kept; `max_failures` restarts are allowed.
    checkpoint_interval: int | None = field(default=None, metadata=meta(gt=0))
    keep_last: int = field(default=2, metadata=meta(ge=1))
    async_checkpoint: bool = False
    max_failures: int = field(default=3, metadata=meta(ge=0))
    use_gpu: bool = False
    # How often the controller polls its workers, and how long a collective may block before a
    # worker declares the group broken (then the controller restarts it).
    poll_interval_s: float = field(default=0.5, metadata=meta(gt=0))
    collective_timeout_s: float = field(default=300.0, metadata=meta(gt=0))
    # Seconds the whole group may take to start (actors placed, process group formed).
    start_timeout_s: float = field(default=120.0, metadata=meta(gt=0))
    # Metrics: the controller serves every rank's metrics on one endpoint, loopback unless a
    # cluster config says otherwise (e.g. "0.0.0.0" inside a pod); port None turns it off.
    run_name: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = field(default=9464, metadata=meta(ge=0, le=65535))
    metrics_dir: str | None = None  # JSONL log per run (default: checkpoint_dir, else none)
    # A step whose loss or gradient norm is inf or NaN stops the run (bf16 and fp32; fp16's loss
    # scaling skips such steps itself). True skips the update instead, in any precision, the
    # way bf16.check_grad_overflow does in DeepSpeed (one host sync per step), and the run
    # goes on from the weights before that batch.
    skip_nonfinite_steps: bool = False
    # Elastic runs. The controller looks for capacity to grow into every `scale_interval_s`
    # (Ray Train looks once a minute; a few seconds keeps a new node from idling). Every
    # `replica_interval` steps (or as soon after as the last copy is done: the interval
    # stretches rather than the step waiting) each rank copies its state into host memory off
    # the step's path and sends it to a peer (the controller for a single worker), so losing
    # one worker loses only the steps since the newest complete copy, without reading disk.
    # 0 turns the copies off and frees their host memory (about 4 copies of the rank's state;
    # see zray.checkpoint.replica). A run below min workers waits `min_wait_s`, then gives up.
    scale_interval_s: float = field(default=5.0, metadata=meta(gt=0))
    replica_interval: int = field(default=1, metadata=meta(ge=0))
    min_wait_s: float = field(default=600.0, metadata=meta(gt=0))

    def __post_init__(self) -> None:
        given = self.num_workers
        try:
            super().__post_init__()
        except ConfigError as e:
            # A bad element of [min, max] would be reported as zray.num_workers[0]; name the key
            # the user wrote, with the whole value, and both forms it accepts.
            if not e.key.startswith("zray.num_workers"):
                raise
            raise ConfigError("zray.num_workers", given, _NUM_WORKERS_ALLOWED, e.reason) from None

    @classmethod
    def _allowed(cls, name: str) -> str:
        return _NUM_WORKERS_ALLOWED if name == "num_workers" else super()._allowed(name)

    def _check(self) -> None:
        if self.model is not None and not _MODEL_SPEC.match(self.model):
            raise ConfigError("zray.model", self.model, "'package.module:callable'")
        n = self.num_workers
        if isinstance(n, int) and n < 1:
            raise ConfigError("zray.num_workers", n, _NUM_WORKERS_ALLOWED)
        if isinstance(n, tuple):
            lo, hi = n
            if lo < 1:
                reason = f"min ({lo}) is below 1"
                raise ConfigError("zray.num_workers", list(n), _NUM_WORKERS_ALLOWED, reason)
            if lo > hi:
                reason = f"min ({lo}) is greater than max ({hi})"
                raise ConfigError("zray.num_workers", list(n), _NUM_WORKERS_ALLOWED, reason)

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with (num_workers itself when it is an int)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most workers the run grows to (num_workers itself when it is an int)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        """Whether the run may change size: num_workers is [min, max] with min < max."""
        return self.min_workers < self.max_workers

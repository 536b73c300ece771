"""The Controller as a Ray actor: `run()` drives the loop; `status()` answers while it runs."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import ray

from zray.checkpoint.replica import ReplicaStore
from zray.checkpoint.shard import PackedShard
from zray.cluster.controller import Controller, RunStatus
from zray.cluster.group import RayWorkerGroup
from zray.cluster.policy import FailurePolicy
from zray.config import Config
from zray.metrics.exporter import Exporter, RunMetrics
from zray.run_records import RunOutcome, RunSpec

log = logging.getLogger("zray.controller")


def latest_committed(checkpoint_dir: str | None) -> str | None:
    if not checkpoint_dir:
        return None
    from zray.checkpoint.reader import latest_valid

    found = latest_valid(checkpoint_dir)
    return None if found is None else str(found)


def free_worker_slots(use_gpu: bool) -> int:
    """Worker bundles the cluster could place now ({"CPU": 1} or {"GPU": 1} each)."""
    free = ray.available_resources().get("GPU" if use_gpu else "CPU", 0.0)
    return int(free + 1e-9)


@ray.remote(num_cpus=0, max_concurrency=4)
class ControllerActor:
    def __init__(
        self,
        spec: RunSpec,
        run_name: str,
        metrics_dir: str | None,
    ) -> None:
        from zray.config.batch import config_for_world, plan_run

        cfg = Config.reread(spec.config)  # the driver showed its warnings
        run = cfg.zray
        plans, skipped = plan_run(cfg)
        for world, why in sorted(skipped.items()):
            log.warning("world size %d skipped: %s", world, why)
        # A single worker's state copies are kept here: this actor outlives the worker.
        self.replicas = ReplicaStore()
        me = ray.get_runtime_context().current_actor

        def make_group(n: int) -> RayWorkerGroup:
            sized = dataclasses.replace(spec, config=config_for_world(cfg, plans[n]).to_dict())
            return RayWorkerGroup(
                sized,
                n,
                run.use_gpu,
                run.start_timeout_s,
                replicas=run.replica_interval > 0,
                solo_holder=me,
                tp=cfg.tensor_parallel.tp_size,
            )

        jsonl = Path(metrics_dir) / f"{run_name}.metrics.jsonl" if metrics_dir else None
        self.metrics = RunMetrics(run_name, jsonl)
        self.exporter = None
        if run.metrics_port is not None:
            self.exporter = Exporter(self.metrics, run.metrics_host, run.metrics_port)
        self.controller = Controller(
            make_group,
            (run.min_workers, run.max_workers),
            FailurePolicy(run.max_failures),
            lambda: latest_committed(run.checkpoint_dir),
            self.metrics,
            valid_sizes=sorted(plans),
            capacity=lambda current: current + free_worker_slots(run.use_gpu),
            scale_interval_s=run.scale_interval_s,
            min_wait_s=run.min_wait_s,
            held=self.replicas.held,
        )
        for world, why in sorted(skipped.items()):
            self.controller.status.decisions.append(f"skip world size {world}: {why}")
        if self.exporter is not None:
            self.controller.status.metrics_url = (
                f"http://{self.exporter.host}:{self.exporter.port}/metrics"
            )

    def run(self, poll_interval_s: float) -> RunOutcome:
        return self.controller.run(poll_interval_s)

    def status(self) -> RunStatus:
        return self.controller.status

    def keep_replica(self, rank: int, step: int, packed: PackedShard) -> None:
        """A single worker's state copy (see zray.checkpoint.replica)."""
        self.replicas.keep(rank, step, packed)

    def close(self) -> None:
        """Stop serving metrics (the run is over and its last values were scraped or not)."""
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

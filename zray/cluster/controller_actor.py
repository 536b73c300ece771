"""The Controller as a Ray actor: `run()` drives the loop; `status()` answers while it runs."""

from __future__ import annotations

from pathlib import Path

import ray

from zray.cluster.controller import Controller, RunStatus
from zray.cluster.group import RayWorkerGroup
from zray.cluster.policy import FailurePolicy
from zray.cluster.train_loop import RunOutcome, RunSpec
from zray.metrics.exporter import Exporter, RunMetrics


def latest_committed(checkpoint_dir: str | None) -> str | None:
    if not checkpoint_dir:
        return None
    from zray.checkpoint.reader import latest_valid

    found = latest_valid(checkpoint_dir)
    return None if found is None else str(found)


@ray.remote(num_cpus=0, max_concurrency=2)
class ControllerActor:
    def __init__(
        self,
        spec: RunSpec,
        num_workers: int,
        use_gpu: bool,
        max_failures: int,
        checkpoint_dir: str | None,
        start_timeout_s: float,
        run_name: str,
        metrics_host: str,
        metrics_port: int | None,
        metrics_dir: str | None,
    ) -> None:
        jsonl = Path(metrics_dir) / f"{run_name}.metrics.jsonl" if metrics_dir else None
        self.metrics = RunMetrics(run_name, jsonl)
        self.exporter = None
        if metrics_port is not None:
            self.exporter = Exporter(self.metrics, metrics_host, metrics_port)
        self.controller = Controller(
            lambda n: RayWorkerGroup(spec, n, use_gpu, start_timeout_s),
            num_workers,
            FailurePolicy(max_failures),
            lambda: latest_committed(checkpoint_dir),
            self.metrics,
        )
        if self.exporter is not None:
            self.controller.status.metrics_url = (
                f"http://{self.exporter.host}:{self.exporter.port}/metrics"
            )

    def run(self, poll_interval_s: float) -> RunOutcome:
        return self.controller.run(poll_interval_s)

    def status(self) -> RunStatus:
        return self.controller.status

    def close(self) -> None:
        """Stop serving metrics (the run is over and its last values were scraped or not)."""
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

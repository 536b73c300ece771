"""The Controller as a Ray actor: `run()` drives the loop; `status()` answers while it runs."""

from __future__ import annotations

import ray

from zray.cluster.controller import Controller, RunStatus
from zray.cluster.group import RayWorkerGroup
from zray.cluster.policy import FailurePolicy
from zray.cluster.train_loop import RunOutcome, RunSpec


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
    ) -> None:
        self.controller = Controller(
            lambda n: RayWorkerGroup(spec, n, use_gpu, start_timeout_s),
            num_workers,
            FailurePolicy(max_failures),
            lambda: latest_committed(checkpoint_dir),
        )

    def run(self, poll_interval_s: float) -> RunOutcome:
        return self.controller.run(poll_interval_s)

    def status(self) -> RunStatus:
        return self.controller.status

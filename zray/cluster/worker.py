"""The Worker actor: one per GPU (or CPU slot), hosting one TrainLoop.

max_concurrency=2 lets `report()` answer while `run()` trains in the other thread.
"""

from __future__ import annotations

from dataclasses import replace

import ray

from zray.cluster.train_loop import Report, RunOutcome, RunSpec, TrainLoop
from zray.launch import free_port


@ray.remote(max_concurrency=2)
class Worker:
    def __init__(self) -> None:
        self.loop: TrainLoop | None = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it: rank 0's process group store."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def run(
        self,
        spec: RunSpec,
        rank: int,
        world: int,
        master_addr: str,
        master_port: int,
        resume: str | None,
        attempt: int,
    ) -> RunOutcome:
        self.loop = TrainLoop(spec, rank, world, master_addr, master_port, resume, attempt)
        return self.loop.run()

    def report(self) -> Report | None:
        if self.loop is None:
            return None
        # The Ray node id, so that the controller (and tests) know where each rank runs.
        return replace(self.loop.report(), node=ray.get_runtime_context().get_node_id())

"""The Worker actor: one per GPU (or CPU slot), hosting one TrainLoop.

Several threads (max_concurrency): `run()` trains in one; `report()`, `request_pause()`,
`keep_replica()` and `snapshots()` answer in the others, also while training is blocked in a
collective whose peer has died.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import replace
from typing import Any

import ray

from zray.checkpoint.shard import RankShard
from zray.cluster.train_loop import Report, Resume, RunOutcome, RunSpec, TrainLoop
from zray.launch import free_port


@ray.remote(max_concurrency=4)
class Worker:
    def __init__(self) -> None:
        self.loop: TrainLoop | None = None
        self._lock = threading.Lock()
        # A peer's last two snapshots, (step, shard), by the peer's rank: this worker's copy
        # survives the peer's death (Ray deserialised it into this process's memory).
        self.replicas: dict[int, deque[tuple[int, RankShard]]] = {}

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
        resume: Resume,
        attempt: int,
        peers: list[Any] | None = None,
    ) -> RunOutcome:
        on_snapshot = None
        if peers is not None and len(peers) > 1:
            peer = peers[(rank + 1) % len(peers)]

            def on_snapshot(step: int, shard: RankShard) -> None:
                peer.keep_replica.remote(rank, step, shard)  # fire and forget

        self.loop = TrainLoop(
            spec, rank, world, master_addr, master_port, resume, attempt, on_snapshot
        )
        return self.loop.run()

    def report(self) -> Report | None:
        if self.loop is None:
            return None
        # The Ray node id, so that the controller (and tests) know where each rank runs.
        return replace(self.loop.report(), node=ray.get_runtime_context().get_node_id())

    def request_pause(self) -> None:
        if self.loop is not None:
            self.loop.request_pause()

    def keep_replica(self, rank: int, step: int, shard: RankShard) -> None:
        with self._lock:
            self.replicas.setdefault(rank, deque(maxlen=2)).append((step, shard))

    def snapshots(self) -> dict[int, list[tuple[int, RankShard]]]:
        """Every snapshot this process holds: its own rank's and its peer's, by rank."""
        with self._lock:
            out = {r: list(d) for r, d in self.replicas.items()}
        if self.loop is not None:
            out.setdefault(self.loop.rank, []).extend(self.loop.snapshots)
        return out

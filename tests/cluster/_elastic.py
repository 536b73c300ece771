"""Run in a subprocess by test_elastic.py: a ray.cluster_utils.Cluster whose nodes come and go.

Head (0 CPUs: hosts the controller) + two 1-CPU worker nodes. First a fixed 2-worker run (the
reference), then an elastic [2, 3] run of the same global batch: once step 6 has passed a third
node joins (the run grows 2 -> 3 by an in-memory handover); once the grown run has made
10 more steps after it grew, the node of rank 2 is removed (it shrinks 3 -> 2, rebuilt from the peers' in-memory copies). No
checkpoint directory at all: nothing can come from disk. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

import zray
from tests.cluster import _runs
from zray.cluster.controller import RunStatus


def main(parquet: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    steps = 200
    fixed = zray.fit(
        config=_runs.config(1, steps=steps, num_workers=2), data=parquet, progress=False
    )
    events: dict[str, int] = {}
    seen: list[tuple[int, int, str, str, int]] = []
    copied: list[int | None] = []  # the newest step every rank had a copy of, at the removal

    def drive(st: RunStatus) -> None:
        seen.append((st.step, st.world_size, st.state.value, st.phase, len(st.worker_nodes)))
        if "added" not in events and st.step >= 6:
            nodes.append(cluster.add_node(num_cpus=1))
            events["added"] = st.step
        grown = st.resizes == 1 and st.phase == "training" and len(st.worker_nodes) == 3
        if "grown" not in events and grown:
            events["grown"] = st.step
        if "removed" not in events and grown and st.step >= events["grown"] + 10:
            victim = next(n for n in nodes if n.node_id == st.worker_nodes[2])
            cluster.remove_node(victim)
            events["removed"] = st.step
            copied.append(st.copy_step)

    cfg = _runs.config(
        1, steps=steps, num_workers=[2, 3], scale_interval_s=1.0, replica_interval=1, max_failures=3
    )
    elastic = zray.fit(config=cfg, data=parquet, progress=drive)
    print(
        json.dumps(
            {
                "fixed": fixed.losses,
                "elastic": elastic.losses,
                "events": events,
                "resizes": elastic.resizes,
                "restarts": elastic.restarts,
                "lost_steps": elastic.lost_steps,
                "copy_step_at_removal": copied[0] if copied else None,
                "decisions": elastic.decisions,
                "seen": seen,
                "world_sizes": sorted({w for _, w, s, _, _ in seen if s == "running"}),
            }
        )
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])

"""Run in a subprocess by test_tensor_parallel_fit.py: an elastic run with tensor slicing.

Head (0 CPUs: hosts the controller) + two 2-CPU nodes. First the fixed reference: 4 workers,
dp 2 x tp 2, one tensor group per node. Then one node is removed and an elastic [2, 4] run of
the same global batch starts at dp 1 x tp 2; once step 6 has passed a 2-CPU node joins and
the run grows to dp 2 x tp 2 (the data-parallel size changes, the tensor size never does).
Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

import zray
from tests.cluster import _runs
from zray.cluster.controller import RunStatus

STEPS = 100


def config(**run: object) -> dict:
    cfg = _runs.config(2, steps=STEPS, **run)
    cfg["tensor_parallel"] = {"tp_size": 2}
    return cfg


def main(parquet: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    fixed = zray.fit(config=config(num_workers=4), data=parquet, progress=False)
    cluster.remove_node(nodes.pop())
    events: dict[str, int] = {}
    seen: list[tuple[int, int, str]] = []

    def drive(st: RunStatus) -> None:
        seen.append((st.step, st.world_size, st.state.value))
        if "added" not in events and st.step >= 6 and st.world_size == 2:
            nodes.append(cluster.add_node(num_cpus=2))
            events["added"] = st.step

    cfg = config(num_workers=[2, 4], scale_interval_s=1.0, replica_interval=1, max_failures=2)
    elastic = zray.fit(config=cfg, data=parquet, progress=drive)
    print(
        json.dumps(
            {
                "fixed": fixed.losses,
                "fixed_world": fixed.world_size,
                "elastic": elastic.losses,
                "elastic_world": elastic.world_size,
                "events": events,
                "resizes": elastic.resizes,
                "restarts": elastic.restarts,
                "decisions": elastic.decisions,
                "world_sizes": sorted({w for _, w, s in seen if s == "running"}),
            }
        )
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])

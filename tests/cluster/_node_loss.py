"""Run in a subprocess by test_node_loss.py: a multi-node ray.cluster_utils.Cluster of its own.

Head (1 CPU, hosts the controller) + two 2-CPU worker nodes. Two workers train 40 steps; once
step 3 has passed, the node hosting rank 0 is removed. Prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import sys
import tempfile

import ray
from ray.cluster_utils import Cluster

import zray
from tests.cluster import _runs
from zray.cluster.controller import RunStatus

STEPS = 40


def main(parquet: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    removed: list[str] = []

    def remove_node_of_rank0(st: RunStatus) -> None:
        if removed or st.step < 3 or not st.worker_nodes:
            return
        for node in workers:
            if node.node_id == st.worker_nodes[0]:
                removed.append(node.node_id)
                cluster.remove_node(node)
                return

    with tempfile.TemporaryDirectory() as ckpt:
        # 40 steps polled every 50 ms: the removal at step 3 comes with most of the run left
        # (with 8 steps a run whose steps no longer wait on the host finished before the
        # controller had seen step 3).
        cfg = _runs.config(
            2,
            steps=STEPS,
            num_workers=2,
            checkpoint_interval=2,
            max_failures=2,
            start_timeout_s=60.0,
            poll_interval_s=0.05,
        )
        result = zray.fit(
            config=cfg, data=parquet, checkpoint_dir=ckpt, progress=remove_node_of_rank0
        )
    print(
        json.dumps(
            {
                "removed": removed,
                "steps": result.steps,
                "restarts": result.restarts,
                "decisions": result.decisions,
            }
        )
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])

"""Run in a subprocess by test_elastic.py: faults in the middle of elastic events.

Head (0 CPUs) + two 1-CPU nodes, an elastic [2, 3] run with checkpoints on disk:
1. a third node joins; while the run is RESIZING (workers pausing to hand over), one worker
   process is SIGKILLed — the resize becomes a recovery;
2. later two of the three worker nodes are removed, leaving room for one worker, below the
   minimum of 2 — the controller WAITS (bounded by min_wait_s) ...
3. ... until a node is added back; the run resumes and completes.
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile

import ray
from ray.cluster_utils import Cluster

import zray
from tests.cluster import _runs
from zray.checkpoint.reader import latest_valid
from zray.cluster.controller import RunStatus
from zray.cluster.state import RunState


def main(parquet: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    events: dict[str, int] = {}
    states: list[str] = []

    grows = {"tries": 0, "armed": False}  # armed: the group was below 3 since the last try

    def drive(st: RunStatus) -> None:
        states.append(st.state.value)
        if "added" not in events and st.step >= 6:
            nodes.append(cluster.add_node(num_cpus=1))
            events["added"] = st.step
            grows.update(tries=1, armed=True)
        if "killed" not in events and st.state is RunState.RESIZING and st.worker_pids:
            os.kill(st.worker_pids[-1], signal.SIGKILL)
            events["killed"] = st.step
        # The pause for a grow can begin and end between two polls (a step of this tiny model
        # takes milliseconds): then the grown group loses the added node again (a failure, which
        # it recovers from) and the node comes back for another grow, up to 4 tries.
        if 0 < len(st.worker_nodes) < 3:
            grows["armed"] = True
        regrow = (
            "added" in events
            and "killed" not in events
            and grows["armed"]
            and st.state is RunState.RUNNING
            and len(st.worker_nodes) == 3
            and grows["tries"] < 4
        )
        if regrow:
            cluster.remove_node(nodes.pop())
            nodes.append(cluster.add_node(num_cpus=1))
            grows.update(tries=grows["tries"] + 1, armed=False)
        running = st.state is RunState.RUNNING and st.phase == "training"
        if (
            "killed" in events
            and "shrunk" not in events
            and running
            and st.restarts >= 1
            and st.step >= events["killed"] + 10
        ):
            for node in [n for n in nodes if n.node_id in st.worker_nodes][:2]:
                cluster.remove_node(node)
                nodes.remove(node)
            events["shrunk"] = st.step
        if "shrunk" in events and "readded" not in events and st.state is RunState.WAITING:
            nodes.append(cluster.add_node(num_cpus=1))
            events["readded"] = st.step

    with tempfile.TemporaryDirectory() as ckpt:
        cfg = _runs.config(
            1,
            steps=200,
            num_workers=[2, 3],
            scale_interval_s=1.0,
            replica_interval=1,
            checkpoint_interval=10,
            keep_last=3,
            max_failures=8,  # the kill, the lost nodes and up to 3 re-grows
            min_wait_s=120.0,
            poll_interval_s=0.05,  # more looks at the short pause of a grow
            start_timeout_s=60.0,
        )
        result = zray.fit(config=cfg, data=parquet, checkpoint_dir=ckpt, progress=drive)
        committed = latest_valid(ckpt)
    print(
        json.dumps(
            {
                "steps": result.steps,
                "events": events,
                "grow_tries": grows["tries"],
                "restarts": result.restarts,
                "resizes": result.resizes,
                "decisions": result.decisions,
                "committed": committed is not None,
                "waited": "waiting" in states,
                "losses": result.losses,
            }
        )
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])

"""Seconds from a node joining to training at the new size, and from a worker lost to training
resumed, for an elastic zray run on a multi-node ray.cluster_utils.Cluster on this machine.

    python benchmarks/elastic.py --out benchmarks/results/elastic_cpu_<date>.json

Head (0 CPUs, the controller) + two 1-CPU worker nodes; a tiny GPT at ZeRO-1 with
num_workers [2, 3], scale_interval_s 1, replica_interval 1 (in-memory copies every step), no
checkpoint directory. A third node joins once step 6 has passed (the clock starts when
`add_node` returns); later the node of rank 2 is removed (the clock starts at `remove_node`).
"Training at the new size" = the first status whose rank 0 reports a completed step at that
size. Prints a table and writes JSON.

Then each event split into its phases from the run's timeline (`RunStatus.timeline`, wall-clock
times the controller and the new group's slowest rank recorded). Grow: scale check (node added ->
the controller asks the group to pause), pause (-> every rank's state handed over), tear down,
wait slots, start, rendezvous, build, restore, first step. Loss: detect (node removed -> failure
seen), then the same from tear down on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

import ray
from ray.cluster_utils import Cluster

import zray
from zray.cluster.controller import RunStatus
from zray.data.sources import lm_tokens_table, write_parquet
from zray.models.data import synthetic_tokens

_REST = ["torn_down", "slots_free", "process", "rendezvous", "built", "restored", "first_step"]
GROW = ["added", "pause_asked", "handed_over", *_REST]
LOSS = ["removed", "failure_seen", *_REST]


def phases(timeline: dict[str, float], order: list[str]) -> dict[str, float]:
    """Seconds from each entry of `order` to the next (0 where a later entry came first: a kept
    process was made before the event)."""
    out, reached = {}, timeline[order[0]]
    for start, end in itertools.pairwise(order):
        out[f"{start}->{end}"] = max(0.0, timeline[end] - reached)
        reached = max(reached, timeline[end])
    return out


def one_run(parquet: str, steps: int) -> dict[str, Any]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    t: dict[str, float] = {}
    at: dict[str, int] = {}
    wall: dict[str, float] = {}  # time.time() of the node added / removed
    lines: dict[str, dict[str, float]] = {}  # each event's timeline, once its first step is in

    def drive(st: RunStatus) -> None:
        now = time.perf_counter()
        training = st.phase == "training"
        line = st.timeline
        if line.get("first_step", 0.0) > line.get("torn_down", float("inf")):
            if "pause_asked" in line and "grow" not in lines:
                lines["grow"] = {"added": wall["added"], **line}
            if "failure_seen" in line and "removed" in wall and "loss" not in lines:
                lines["loss"] = {"removed": wall["removed"], **line}
        if "added" not in t and st.step >= 6:
            # Before add_node: the controller can see the node, pause and hand over before
            # add_node returns (the phases start at the call; the table's clock after the wait).
            wall["added"] = time.time()
            nodes.append(cluster.add_node(num_cpus=1))
            cluster.wait_for_nodes()
            t["added"] = time.perf_counter()
            return
        if (
            "added" in t
            and "grown" not in t
            and training
            and st.resizes == 1
            and len(st.worker_pids) == 3
        ):
            at.setdefault("grown_from", st.step)
            if st.step > at["grown_from"]:
                t["grown"], at["grown"] = now, st.step
        if "grown" in t and "lost" not in t and st.step >= at["grown"] + 10:
            victim = next(n for n in nodes if n.node_id == st.worker_nodes[2])
            t["lost"], wall["removed"] = time.perf_counter(), time.time()
            cluster.remove_node(victim)
            at["lost"] = st.step
            return
        if "lost" in t and "resumed" not in t and training and st.restarts == 1:
            at.setdefault("resumed_from", st.step)
            if st.step > at["resumed_from"]:
                t["resumed"] = now

    config = {
        "train_batch_size": 12,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        "zero_optimization": {"stage": 1},
        "zray": {
            "model": "zray.models.gpt:build",
            "model_kwargs": {
                "size": "tiny",
                "vocab_size": 64,
                "seq_len": 16,
                "n_layer": 2,
                "n_head": 2,
                "d_model": 32,
            },
            "num_workers": [2, 3],
            "max_steps": steps,
            "log_interval": 1,
            "scale_interval_s": 1.0,
            "replica_interval": 1,
            "poll_interval_s": 0.1,
            "max_failures": 3,
        },
    }
    result = zray.fit(config=config, data=parquet, progress=drive)
    ray.shutdown()
    cluster.shutdown()
    return {
        "node_added_to_training_s": t["grown"] - t["added"],
        "worker_lost_to_training_s": t["resumed"] - t["lost"],
        "steps_at": at,
        "grow_phases": phases(lines["grow"], GROW) if "grow" in lines else None,
        "timelines": lines,
        "loss_phases": phases(lines["loss"], LOSS) if "loss" in lines else None,
        "lost_steps": result.lost_steps,
        "resizes": result.resizes,
        "restarts": result.restarts,
        "decisions": result.decisions,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--parquet", default="/tmp/zray_elastic_bench.parquet")
    p.add_argument("--out", default="")
    args = p.parse_args()
    write_parquet(lm_tokens_table(synthetic_tokens(2048, 16, 64, seed=1)), args.parquet)
    rows = [one_run(args.parquet, args.steps) for _ in range(args.repeats)]
    print(
        f"{'node added -> training at 3 s':>30} {'worker lost -> training at 2 s':>31} "
        f"{'lost steps':>11}"
    )
    for r in rows:
        print(
            f"{r['node_added_to_training_s']:>30.2f} {r['worker_lost_to_training_s']:>31.2f} "
            f"{r['lost_steps']:>11}"
        )
    for event in ("grow", "loss"):
        runs = [r[f"{event}_phases"] for r in rows if r[f"{event}_phases"]]
        if runs:
            print(f"\n{event}, s:")
            for name in runs[0]:
                print(f"  {name:<28} " + " ".join(f"{r[name]:>6.2f}" for r in runs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()

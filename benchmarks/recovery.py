"""Seconds from a worker kill to the next completed step, and the steps lost.

    python benchmarks/recovery.py --workers 4 --kill-at 12 --checkpoint-interval 5

Runs zray.fit on an embedded local Ray cluster (CPU workers, gloo, tiny GPT), SIGKILLs one
worker process once the run passes step --kill-at, and times the recovery from the driver's
status stream: kill -> failure seen (controller RECOVERING) -> group running again -> first
step completed after the restart. Steps lost = step at the kill - step resumed from.

The same recovery split into its phases, from the run's timeline (`RunStatus.timeline`:
wall-clock times the controller and every new rank recorded, each rank phase ending when the
slowest rank got there): detect (kill -> the controller saw the failure), tear down (the failed
group's actors ended), wait slots (until Ray shows room for the new group), start (new actors
created: placement and process start), rendezvous
(the process group up), build (model and engine made), restore (state loaded: in-memory copies
or a checkpoint), first step.
Prints two tables and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import tempfile
import time
from typing import Any

import zray
from zray.cluster.controller import RunStatus
from zray.cluster.state import RunState


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--kill-at", type=int, default=12)
    p.add_argument("--checkpoint-interval", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = [one_run(args) for _ in range(args.repeats)]
    print(
        f"{'kill->detected s':>17} {'detected->running s':>20} {'running->next step s':>21} "
        f"{'kill->next step s':>18} {'steps lost':>11}"
    )
    for r in rows:
        print(
            f"{r['detect_s']:>17.2f} {r['restart_s']:>20.2f} {r['first_step_s']:>21.2f} "
            f"{r['kill_to_next_step_s']:>18.2f} {r['steps_lost']:>11}"
        )
    print("\nphases, s: " + " ".join(f"{name:>10}" for name in PHASES))
    for r in rows:
        print("           " + " ".join(f"{r['phases'][name]:>10.2f}" for name in PHASES))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": rows, "cpus": os.cpu_count()}, f, indent=1)


# Each phase of a recovery: (name, the timeline entry it starts at, the one it ends at).
_PHASES = (
    ("detect", "kill", "failure_seen"),
    ("tear down", "failure_seen", "torn_down"),
    ("wait slots", "torn_down", "slots_free"),
    ("start", "slots_free", "process"),
    ("rendezvous", "process", "rendezvous"),
    ("build", "rendezvous", "built"),
    ("restore", "built", "restored"),
    ("first step", "restored", "first_step"),
)
PHASES = [name for name, _, _ in _PHASES]


def phases(timeline: dict[str, float]) -> dict[str, float]:
    """Each phase's seconds; a phase another one already covered counts 0 (a kept worker's
    process was made before the failure)."""
    out, reached = {}, timeline["kill"]
    for name, _, end in _PHASES:
        out[name] = max(0.0, timeline[end] - reached)
        reached = max(reached, timeline[end])
    return out


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    t: dict[str, float] = {}
    info: dict[str, Any] = {}

    def watch(st: RunStatus) -> None:
        now = time.perf_counter()
        if "kill" not in t:
            if st.step >= args.kill_at and len(st.worker_pids) == args.workers:
                info["step_at_kill"] = st.step
                t["kill"] = time.perf_counter()
                info["kill_wall"] = time.time()
                os.kill(st.worker_pids[-1], signal.SIGKILL)
            return
        if st.state is RunState.RECOVERING or st.restarts >= 1:
            t.setdefault("detected", now)
        line = st.timeline
        if "torn_down" in line and line.get("first_step", 0.0) > line["torn_down"]:
            info.setdefault("timeline", dict(line))
        if st.restarts >= 1 and st.state is RunState.RUNNING:
            t.setdefault("running", now)
            # From a checkpoint ("started N workers from .../step_00000010") or from the
            # in-memory state copies ("recover from in-memory snapshots of step 12").
            resumed = [
                int(m.group(1) or m.group(2))
                for d in st.decisions
                for m in [re.search(r"step_(\d+)|in-memory snapshots of step (\d+)", d)]
                if m
            ]
            if resumed:
                info["resumed_from"] = resumed[-1]
                if st.phase == "training" and st.step > resumed[-1]:
                    t.setdefault("next_step", now)

    with tempfile.TemporaryDirectory() as ckpt:
        cfg = {
            "train_batch_size": 4 * args.workers,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 2},
            "zray": {
                "model": "zray.models.gpt:build",
                "model_kwargs": {"size": "tiny"},
                "data": {"synthetic": {"seq_len": 64, "vocab_size": 256, "n_samples": 2048}},
                "num_workers": args.workers,
                "max_steps": args.steps,
                "checkpoint_interval": args.checkpoint_interval,
                "log_interval": 1,
                "poll_interval_s": 0.1,
                "max_failures": 2,
            },
        }
        result = zray.fit(config=cfg, checkpoint_dir=ckpt, progress=watch)
    assert result.restarts == 1, result.decisions
    return {
        "detect_s": t["detected"] - t["kill"],
        "restart_s": t["running"] - t["detected"],
        "first_step_s": t["next_step"] - t["running"],
        "kill_to_next_step_s": t["next_step"] - t["kill"],
        "step_at_kill": info["step_at_kill"],
        "resumed_from": info["resumed_from"],
        "steps_lost": info["step_at_kill"] - info["resumed_from"],
        "phases": phases({"kill": info["kill_wall"], **info["timeline"]}),
        "decisions": result.decisions,
    }


if __name__ == "__main__":
    main()

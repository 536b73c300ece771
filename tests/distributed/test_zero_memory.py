"""Per-rank bytes for parameters, gradients and optimizer states follow the ZeRO formula.

With Psi parameters, N ranks, bf16 compute (2 bytes) and Adam (fp32 master 4 + two moments 8):
    stage 0: 2 Psi params, 2 Psi grads, (4 + 8) Psi optimizer
    stage 1: 2 Psi params, 2 Psi grads, (4 + 8) Psi / N optimizer
    stage 2: 2 Psi params, 2 Psi / N grads, 12 Psi / N optimizer
    stage 3: 0 params, 2 Psi / N grads, 12 Psi / N optimizer
At stages 2-3 the gradient shard exists only from the first reduction of an accumulation cycle
to the step (checked just before the step; zero after it). At stage 3 the fp32 master is the
only copy of a released parameter: each gather casts it into the 16-bit buffer, so there is no
2 Psi / N 16-bit shard (the paper's formula counts one).
"Buffers accounted for": each flat unit is padded to a multiple of 16 * N elements (16 at
stage 0), master weights cover the padding but Adam moments do not (they live on the real
parameter ranges only), Adam keeps one 4-byte step counter per tensor, and stage-3 parameters at
or below the persistence threshold (100 elements here) are held whole. The expected numbers are
computed here from the model's structure, not read from the engine.
"""

from __future__ import annotations

import pytest

from tests.distributed import _workloads as w
from zray.launch import launch_local

pytestmark = pytest.mark.distributed


def pad(n: int, quantum: int) -> int:
    return max(quantum, -(-n // quantum) * quantum)


def owned(total: int, padded: int, world: int, rank: int) -> int:
    """Real (unpadded) elements of a unit of `total` elements inside rank's shard."""
    s = padded // world
    return max(0, min(total, (rank + 1) * s) - min(total, rank * s))


def expected(stage: int, world: int, rank: int, n_opt_tensors: int) -> dict[str, int]:
    model = w.fresh_model()
    numels = [p.numel() for p in model.parameters()]
    psi = sum(numels)
    step_counters = 4 * n_opt_tensors
    if stage in (0, 1, 2):
        quantum = 16 if stage == 0 else 16 * world
        p = pad(psi, quantum)
        shard = p if stage == 0 else p // world
        mine = psi if stage == 0 else owned(psi, p, world, rank)
        return {
            "params": 2 * p,
            "grads": 2 * p if stage < 2 else 2 * shard,  # (stage 2: just before the step)
            "optimizer": 4 * shard + 8 * mine + step_counters,
            "comm": 0,  # peer-copy staging: CUDA only
        }
    # Stage 3: one unit per block, one for the root's large parameters, one persistent unit.
    blocks = [sum(q.numel() for q in b.parameters() if q.numel() > 100) for b in model.blocks]
    in_blocks = {id(q) for b in model.blocks for q in b.parameters()}
    root = sum(q.numel() for q in model.parameters() if id(q) not in in_blocks and q.numel() > 100)
    persistent = sum(n for n in numels if n <= 100)
    sharded = [pad(n, 16 * world) for n in [root, *blocks]]
    pers = pad(persistent, 16 * world)
    units = [(n, p) for n, p in zip([root, *blocks], sharded, strict=True)] + [(persistent, pers)]
    return {
        "params": 2 * pers,  # only the persistent unit is held whole; no 16-bit shards
        "grads": sum(2 * p // world for _, p in units),  # just before the step
        "optimizer": sum(4 * p // world + 8 * owned(n, p, world, rank) for n, p in units)
        + step_counters,
        "comm": 0,  # peer-copy staging: CUDA only
    }


@pytest.mark.parametrize("world", [2, 4], ids=lambda n: f"world{n}")
def test_bytes_follow_zero_formula(world: int) -> None:
    results = launch_local(w.memory_per_stage, world)
    for rank, per_stage in enumerate(results):
        for stage, got in per_stage.items():
            want = expected(stage, world, rank, got["optimizer_tensors"])
            assert got["grads_before_step"] == want["grads"], f"world {world} rank {rank}"
            if stage >= 2:
                want["grads"] = 0  # the shard is dropped with the step
            assert got["memory"] == want, f"world {world} rank {rank} stage {stage}"
    # And the point of ZeRO, in one line per stage (rank 0): each stage holds less.
    total = [sum(results[0][s]["memory"].values()) for s in range(4)]
    assert total[0] > total[1] > total[2] > total[3]

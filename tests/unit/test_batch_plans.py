"""Tests for zray.config.batch: the batch plan at every world size of an elastic run."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest

from zray.config import BatchSizes, Config, ConfigError, ZrayConfigWarning
from zray.config.batch import (
    HIGHLY_COMPOSITE,
    SizePlan,
    best_world,
    config_for_world,
    plan_run,
    plan_sizes,
    valid_worlds,
)

B, M, G = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


def _plans(raw: dict[str, Any], lo: int, hi: int) -> tuple[dict[int, SizePlan], dict[int, str]]:
    return plan_sizes(Config.from_dict(raw), lo, hi)


def _table(plans: dict[int, SizePlan]) -> dict[int, tuple[int, int]]:
    """world -> (micro, gas): the part of each plan that changes with the world size."""
    return {w: (p.micro_batch, p.gas) for w, p in plans.items()}


def _elastic(**kw: Any) -> dict[str, Any]:
    return {"elasticity": {"enabled": True, **kw}}


# ---- (a) the batch keys fix the global batch -------------------------------------------------

# (id, config, min, max, global batch, {world: (micro, gas)}, {skipped world: reason fragment})
# fmt: off
FIXED_CASES: list[tuple[str, dict[str, Any], int, int, int, dict[int, tuple[int, int]], dict[int, str]]] = [
    ("batch-only", {B: 12}, 1, 6, 12,
     {1: (12, 1), 2: (6, 1), 3: (4, 1), 4: (3, 1), 6: (2, 1)},
     {5: "global batch 12 is not divisible by 5 workers"}),
    ("batch-and-micro", {B: 48, M: 4}, 2, 6, 48,
     {2: (4, 6), 3: (4, 4), 4: (4, 3), 6: (4, 2)},
     {5: "global batch 48 is not divisible by 5 workers x micro-batch 4 = 20"}),
    ("batch-and-gas", {B: 24, G: 2}, 1, 5, 24,
     {1: (12, 2), 2: (6, 2), 3: (4, 2), 4: (3, 2)},
     {5: "global batch 24 is not divisible by 5 workers x 2 accumulation steps = 10"}),
    # No train_batch_size: the batch of a fixed run at min workers, 4 x 8 x 2 = 64.
    ("micro-and-gas", {M: 4, G: 8}, 2, 8, 64,
     {2: (4, 8), 4: (4, 4), 8: (4, 2)},
     {3: "global batch 64 is not divisible by 3 workers x micro-batch 4 = 12",
      5: "= 20", 6: "= 24", 7: "= 28"}),
    ("micro-only", {M: 4}, 1, 3, 4,
     {1: (4, 1)},
     {2: "global batch 4 is smaller than 2 workers x micro-batch 4 = 8",
      3: "global batch 4 is smaller than 3 workers x micro-batch 4 = 12"}),
    # All three (consistent at 4 workers): micro stays 4, accumulation follows the world size.
    ("all-three", {B: 32, M: 4, G: 2}, 2, 8, 32,
     {2: (4, 4), 4: (4, 2), 8: (4, 1)},
     {3: "not divisible", 5: "not divisible", 6: "not divisible", 7: "not divisible"}),
    ("nothing", {}, 2, 4, 2,
     {2: (1, 1)},
     {3: "global batch 2 is smaller than 3 workers", 4: "smaller than 4 workers"}),
    ("fixed-size", {B: 8, M: 2}, 2, 2, 8, {2: (2, 2)}, {}),
    ("one-worker", {}, 1, 1, 1, {1: (1, 1)}, {}),
]
# fmt: on


@pytest.mark.parametrize(
    ("raw", "lo", "hi", "batch", "table", "reasons"),
    [pytest.param(*case[1:], id=case[0]) for case in FIXED_CASES],
)
def test_fixed_batch_plans(
    raw: dict[str, Any],
    lo: int,
    hi: int,
    batch: int,
    table: dict[int, tuple[int, int]],
    reasons: dict[int, str],
) -> None:
    plans, skipped = _plans(raw, lo, hi)
    assert _table(plans) == table
    assert {p.global_batch for p in plans.values()} == {batch}  # one global batch at every size
    assert set(plans) | set(skipped) == set(range(lo, hi + 1))
    assert not set(plans) & set(skipped)
    assert set(skipped) == set(reasons)
    for w, fragment in reasons.items():
        assert fragment in skipped[w], skipped[w]


@pytest.mark.parametrize("case", FIXED_CASES, ids=[c[0] for c in FIXED_CASES])
def test_config_for_world_round_trips_through_resolve_batch(case: tuple[Any, ...]) -> None:
    _, raw, lo, hi, *_ = case
    cfg = Config.from_dict(raw)
    plans, _ = plan_sizes(cfg, lo, hi)
    for w, plan in plans.items():
        fixed = config_for_world(cfg, plan)
        assert (
            fixed.resolve_batch(w)
            == plan.batch_sizes
            == BatchSizes(plan.global_batch, plan.micro_batch, plan.gas)
        )
        assert fixed.zray.num_workers == w and not fixed.zray.elastic
        # Only the batch keys and the worker count change.
        assert (
            dataclasses.replace(
                fixed,
                train_batch_size=cfg.train_batch_size,
                train_micro_batch_size_per_gpu=cfg.train_micro_batch_size_per_gpu,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                zray=cfg.zray,
            )
            == cfg
        )
        # It survives the trip to a worker (RunSpec carries Config.to_dict()).
        assert Config.from_dict(fixed.to_dict()).resolve_batch(w) == plan.batch_sizes


def test_plan_run_uses_the_runs_own_worker_range() -> None:
    cfg = Config.from_dict({B: 12, "zray": {"num_workers": [2, 5]}})
    plans, skipped = plan_run(cfg)
    assert valid_worlds(plans) == [2, 3, 4] and list(skipped) == [5]
    assert (plans, skipped) == plan_sizes(cfg, 2, 5)


def test_plan_run_refuses_a_range_where_nothing_keeps_the_batch() -> None:
    cfg = Config.from_dict({B: 7, "zray": {"num_workers": [2, 6]}})
    with pytest.raises(ConfigError) as err:
        plan_run(cfg)
    msg = str(err.value)
    assert err.value.key == "zray.num_workers" and err.value.value == (2, 6)
    assert "2: global batch 7 is not divisible by 2 workers" in msg
    assert "(1 more)" in msg  # five skipped sizes, four shown


def test_valid_and_best_world() -> None:
    plans, _ = _plans({B: 12}, 1, 8)
    assert valid_worlds(plans) == [1, 2, 3, 4, 6]
    assert best_world(plans, 8) == 6
    assert best_world(plans, 5) == 4
    assert best_world(plans, 1) == 1
    assert best_world(plans, 0) is None
    grow_only, _ = _plans({B: 12}, 3, 8)
    assert best_world(grow_only, 2) is None  # below the smallest valid size: wait
    assert best_world({}, 100) is None


# ---- (b) DeepSpeed's elasticity ------------------------------------------------------------------
#
# Expected numbers worked by hand from DeepSpeed's algorithm (deepspeed/elasticity/elasticity.py):
# candidates = each micro-batch size and their LCM, times the largest highly composite number that
# keeps it <= max_train_batch_size; the one valid for the most world sizes wins.


def test_deepspeed_tie_prefers_the_larger_batch() -> None:
    # micro [2, 4], cap 16: candidates 2 x 6 = 12 and 4 x 4 = 16 (the LCM 4 gives 16 again).
    # In 1..4: 12 splits over 1, 2, 3 (12/3 = 4 = micro 4) and 16 over 1, 2, 4: a tie, 3 each.
    raw = _elastic(max_train_batch_size=16, micro_batch_sizes=[2, 4])
    plans, skipped = _plans(raw, 1, 4)
    assert {p.global_batch for p in plans.values()} == {16}
    assert _table(plans) == {1: (4, 4), 2: (4, 2), 4: (4, 1)}
    assert skipped == {3: "global batch 16 is not divisible by 3 workers"}
    raw["elasticity"]["prefer_larger_batch"] = False
    plans, skipped = _plans(raw, 1, 4)
    assert {p.global_batch for p in plans.values()} == {12}
    # The largest micro-batch size that divides each worker's share: 12, 6 and 4 samples.
    assert _table(plans) == {1: (4, 3), 2: (2, 3), 3: (4, 1)}
    assert skipped == {
        4: "global batch 12 / 4 workers = 3 per worker, a multiple of no micro-batch size in "
        "elasticity.micro_batch_sizes [2, 4]"
    }


def test_deepspeed_counts_only_the_sizes_the_run_can_take() -> None:
    # Same block, workers 1..3: 16 splits over 1, 2 only, 12 over 1, 2, 3, so 12 wins.
    plans, skipped = _plans(_elastic(max_train_batch_size=16, micro_batch_sizes=[2, 4]), 1, 3)
    assert {p.global_batch for p in plans.values()} == {12}
    assert _table(plans) == {1: (4, 3), 2: (2, 3), 3: (4, 1)} and skipped == {}


def test_deepspeed_lcm_above_the_cap_is_not_a_candidate() -> None:
    # DeepSpeed's test_proper_mbsz: micro [1, 2, 3, 7], cap 32. Candidates 1 x 24, 2 x 12,
    # 3 x 6 = 18, 7 x 4 = 28; the LCM 42 is over the cap and dropped. In 1..8, 24 splits over
    # 1, 2, 3, 4, 6, 8 (six sizes), 18 and 28 over four each: 24. DeepSpeed: micro 3 at 4 GPUs.
    raw = _elastic(max_train_batch_size=32, micro_batch_sizes=[1, 2, 3, 7])
    plans, skipped = _plans(raw, 1, 8)
    assert {p.global_batch for p in plans.values()} == {24}
    assert _table(plans) == {1: (3, 8), 2: (3, 4), 3: (2, 4), 4: (3, 2), 6: (2, 2), 8: (3, 1)}
    assert set(skipped) == {5, 7}


def test_deepspeed_10k_example() -> None:
    # DeepSpeed's own test_basic_10k: LCM(8, 12, 16, 17) = 816, x 12 = 9792 <= 10000, valid for
    # 23 GPU counts in 32..1500; at 64 GPUs each gets 153 = 9 x 17 samples: micro-batch 17.
    raw = _elastic(
        max_train_batch_size=10000,
        micro_batch_sizes=[8, 12, 16, 17],
        min_gpus=32,
        max_gpus=1500,
        min_time=20,
        version=0.1,
    )
    plans, skipped = _plans(raw, 1, 1500)
    assert {p.global_batch for p in plans.values()} == {9792}
    assert len(plans) == 23 and min(plans) == 32 and max(plans) == 1224
    assert (plans[64].micro_batch, plans[64].gas) == (17, 9)
    assert 128 in skipped  # DeepSpeed's test_invalid_world_size
    assert skipped[31] == "outside elasticity.min_gpus..max_gpus (32..1500)"


def test_deepspeed_v02_plans_whole_nodes() -> None:
    # Version 0.2, 2 GPUs per node, cap 32: per node the cap is 16, so node batches 12 and 16 as
    # above; nodes 1..4 (2..8 GPUs): 12 splits over 1, 2, 3 nodes and 16 over 1, 2, 4, a tie
    # that goes to 16 x 2 = 32. Odd sizes are not whole nodes; 6 GPUs (3 nodes) do not split 32.
    raw = _elastic(max_train_batch_size=32, micro_batch_sizes=[2, 4], num_gpus_per_node=2)
    plans, skipped = _plans(raw, 1, 8)
    assert {p.global_batch for p in plans.values()} == {32}
    assert _table(plans) == {2: (4, 4), 4: (4, 2), 8: (4, 1)}
    assert skipped[1] == "not a whole number of nodes of 2 (elasticity.num_gpus_per_node)"
    assert skipped[6] == "global batch 32 is not divisible by 6 workers"
    # Version 0.1 ignores num_gpus_per_node and caps the whole batch at 32: 2 x 12 and 4 x 6
    # are both 24, the only candidate, and every size that splits it counts.
    raw["elasticity"]["version"] = 0.1
    plans, _ = _plans(raw, 1, 4)
    assert {p.global_batch for p in plans.values()} == {24}
    assert _table(plans) == {1: (4, 6), 2: (4, 3), 3: (4, 2), 4: (2, 3)}


def test_deepspeed_plan_is_what_resolve_batch_gives() -> None:
    cfg = Config.from_dict(
        {
            **_elastic(max_train_batch_size=32, micro_batch_sizes=[1, 2, 3, 7]),
            "zray": {"num_workers": [1, 8]},
        }
    )
    plans, skipped = plan_run(cfg)
    for w, plan in plans.items():
        assert cfg.resolve_batch(w) == plan.batch_sizes
        fixed = config_for_world(cfg, plan)
        assert not fixed.elasticity.enabled and fixed.resolve_batch(w) == plan.batch_sizes
    with pytest.raises(ConfigError) as err:
        cfg.resolve_batch(5)
    assert err.value.key == "dp_world_size" and err.value.value == 5
    assert skipped[5] in str(err.value) and "[1, 2, 3, 4, 6, 8]" in str(err.value)
    with pytest.raises(ConfigError, match=r"outside zray.num_workers 1..8"):
        cfg.resolve_batch(9)


def test_ignored_batch_keys_are_overridden_by_the_plan() -> None:
    raw = _elastic(
        max_train_batch_size=16, micro_batch_sizes=[2, 4], ignore_non_elastic_batch_info=True
    )
    raw[B] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZrayConfigWarning)
        cfg = Config.from_dict({**raw, "zray": {"num_workers": [1, 4]}})
    assert cfg.resolve_batch(2) == BatchSizes(16, 4, 2)
    plan = plan_run(cfg)[0][2]
    assert config_for_world(cfg, plan).resolve_batch(2) == BatchSizes(16, 4, 2)


def test_no_overlap_with_min_max_gpus_skips_every_size() -> None:
    raw = _elastic(max_train_batch_size=64, micro_batch_sizes=[2], min_gpus=8)
    plans, skipped = _plans(raw, 1, 4)
    assert plans == {} and set(skipped) == {1, 2, 3, 4}
    assert all(r == "outside elasticity.min_gpus..max_gpus (8..10000)" for r in skipped.values())
    with pytest.raises(ConfigError, match=r"zray\.num_workers: no world size keeps"):
        plan_run(Config.from_dict({**raw, "zray": {"num_workers": [1, 4]}}))


def test_model_parallel_elasticity_is_refused_when_planning() -> None:
    raw = _elastic(
        max_train_batch_size=64, micro_batch_sizes=[2], num_gpus_per_node=4, model_parallel_size=2
    )
    cfg = Config.from_dict(raw)  # DeepSpeed's config is accepted as written...
    with pytest.raises(ConfigError) as err:  # ...but zray cannot plan it yet
        plan_sizes(cfg, 1, 4)
    assert err.value.key == "elasticity.model_parallel_size" and err.value.value == 2


def test_highly_composite_table() -> None:
    # Each entry has more divisors than every smaller number (checked up to 27720 by brute
    # force: the first 25 entries), and the table is increasing.
    def divisors(n: int) -> int:
        return sum(2 if i * i != n else 1 for i in range(1, int(n**0.5) + 1) if n % i == 0)

    record, found = 0, []
    for n in range(1, 27721):
        d = divisors(n)
        if d > record:
            record, found = d, [*found, n]
    assert list(HIGHLY_COMPOSITE[:25]) == found
    assert list(HIGHLY_COMPOSITE) == sorted(set(HIGHLY_COMPOSITE)) and len(HIGHLY_COMPOSITE) == 38


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lo", "hi"), [(0, 2), (3, 2), (-1, 1), (True, 2), (1.0, 2)], ids=str)
def test_plan_sizes_rejects_a_bad_range(lo: Any, hi: Any) -> None:
    with pytest.raises(ConfigError) as err:
        plan_sizes(Config(), lo, hi)
    assert err.value.key == "zray.num_workers" and err.value.value == [lo, hi]
    assert "1 <= min_workers <= max_workers" in str(err.value)


@pytest.mark.parametrize(
    "kw",
    [
        {"world": 2, "micro_batch": 2, "gas": 2, "global_batch": 9},
        {"world": 0, "micro_batch": 2, "gas": 2, "global_batch": 0},
        {"world": 2, "micro_batch": 2.0, "gas": 1, "global_batch": 4},
    ],
)
def test_size_plan_keeps_its_invariant(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="SizePlan"):
        SizePlan(**kw)


# ---- tensor slicing: the batch splits over data-parallel ranks, worker counts step by tp ---------


def test_tensor_parallel_plans_count_data_parallel_ranks() -> None:
    raw = {B: 12, "tensor_parallel": {"tp_size": 2}}
    plans, skipped = _plans(raw, 2, 6)
    assert {w: (p.dp, p.micro_batch, p.gas) for w, p in plans.items()} == {
        2: (1, 12, 1),
        4: (2, 6, 1),
        6: (3, 4, 1),
    }
    assert skipped == {
        3: "3 workers is not a multiple of tensor_parallel.tp_size 2",
        5: "5 workers is not a multiple of tensor_parallel.tp_size 2",
    }
    cfg = Config.from_dict(raw)
    for plan in plans.values():
        fixed = config_for_world(cfg, plan)
        assert fixed.zray.num_workers == plan.world
        assert fixed.resolve_batch(plan.dp) == plan.batch_sizes


def test_tensor_parallel_batch_from_micro_counts_the_smallest_dp() -> None:
    # No train_batch_size: the batch a fixed run at the smallest size would use (dp 2 at 4).
    plans, _ = _plans({M: 3, "tensor_parallel": {"tp_size": 2}}, 3, 8)
    assert {w: (p.micro_batch, p.gas) for w, p in plans.items()} == {4: (3, 1)}
    assert plans[4].global_batch == 6


def test_tensor_parallel_with_elasticity_is_refused() -> None:
    raw = {
        **_elastic(micro_batch_sizes=[2], max_train_batch_size=16),
        "tensor_parallel": {"tp_size": 2},
    }
    with pytest.raises(ConfigError, match=r"tensor_parallel\.tp_size.*1 while elasticity\.enabled"):
        _plans(raw, 2, 4)


def test_size_plan_refuses_a_world_that_tp_does_not_divide() -> None:
    with pytest.raises(ValueError, match="not a multiple of tp"):
        SizePlan(3, 2, 1, 2, tp=2)

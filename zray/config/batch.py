"""Batch planning for elastic runs: per world size, the micro-batch and accumulation steps that
keep the global batch, or the reason that size is skipped. Pure functions of the config; no Ray.

    plans, skipped = plan_sizes(cfg, min_workers=2, max_workers=8)
    world = best_world(plans, capacity=free_gpus)       # None: no valid size fits yet
    worker_cfg = config_for_world(cfg, plans[world])    # what each rank of that group reads

A run is the same run at every size only if every optimizer step sees the same number of
samples, so the global batch B is fixed once and each world size w must split it exactly:
B = micro x gas x w with whole micro, gas >= 1. Two ways to fix B:

(a) No enabled `elasticity` block (zray's own rule):
    B = train_batch_size when given; otherwise the batch a fixed run at min_workers would use,
    micro x gas x min_workers (a missing micro or gas counts as 1). Then for each w, whichever
    of micro / gas the config pins stays, and the other is derived:
      micro given          -> gas   = B / (micro x w)
      else gas given       -> micro = B / (gas x w)
      else                 -> micro = B / w, gas = 1   (DeepSpeed's rule for a lone batch size)
    A w for which that is not a whole number >= 1 is skipped.

(b) `elasticity.enabled` (DeepSpeed's algorithm, versions 0.1 and 0.2): candidates are each
    micro-batch size and their LCM, each scaled by the largest highly composite number that
    keeps it <= max_train_batch_size. The candidate valid for the most world sizes wins (ties:
    the larger batch if prefer_larger_batch, else the smaller); a world size w is valid when
    B / w is a whole multiple of some micro-batch size, and it gets the largest such one.
    Version 0.2 counts whole nodes of num_gpus_per_node ranks (the batch cap is per node).
    Differences from DeepSpeed, all on purpose:
      - the sizes counted are elasticity.min_gpus..max_gpus intersected with
        min_workers..max_workers: the batch is chosen for the sizes this run can take;
      - in 0.2 a size is a whole number of nodes inside that range (DeepSpeed rounds
        min_gpus / num_gpus_per_node down, counting a node count below min_gpus);
      - DeepSpeed 0.2, asked for a size outside its list, invents a different batch for
        that size alone; zray skips the size instead, because the batch must not change;
      - model_parallel_size > 1 is refused, and so is `tensor_parallel.tp_size` > 1 with an
        enabled block: the algorithm counts every worker as a data-parallel rank.

Tensor slicing (rule (a) only): plans stay keyed by worker count w, but only multiples of
tp_size are sizes at all, and the batch splits over the w / tp_size data-parallel ranks (a
tensor group reads one micro-batch together): B = micro x gas x (w / tp).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zray.config.run import ElasticityConfig
from zray.errors import ConfigError

if TYPE_CHECKING:
    from zray.config.root import Config

__all__ = [
    "HIGHLY_COMPOSITE",
    "BatchSizes",
    "SizePlan",
    "best_world",
    "config_for_world",
    "plan_run",
    "plan_sizes",
    "valid_worlds",
]

# The first 38 highly composite numbers (OEIS A002182: each has more divisors than any smaller
# number), DeepSpeed's multipliers for candidate batches: a batch with many divisors splits
# evenly over many world sizes. Enough for batches up to 720720 x the micro-batch size.
HIGHLY_COMPOSITE: tuple[int, ...] = (
    1, 2, 4, 6, 12, 24, 36, 48, 60, 120, 180, 240, 360, 720, 840, 1260, 1680, 2520, 5040,
    7560, 10080, 15120, 20160, 25200, 27720, 45360, 50400, 55440, 83160, 110880, 166320,
    221760, 277200, 332640, 498960, 554400, 665280, 720720,
)  # fmt: skip

# How many skipped sizes an error message lists before eliding the rest.
_MAX_REASONS_SHOWN = 4


@dataclass(frozen=True)
class BatchSizes:
    """Resolved batch sizes: train_batch_size = micro_batch_per_gpu * gas * dp world size."""

    train_batch_size: int
    micro_batch_per_gpu: int
    gradient_accumulation_steps: int


@dataclass(frozen=True)
class SizePlan:
    """How a group of `world` workers splits the global batch. With tensor slicing the workers
    form `world / tp` data-parallel ranks of `tp` workers each (the tensor group sees one
    micro-batch): global_batch = micro_batch x gas x dp, every term a positive integer."""

    world: int  # workers (dp x tp)
    micro_batch: int
    gas: int
    global_batch: int
    tp: int = 1  # tensor_parallel.tp_size

    def __post_init__(self) -> None:
        for name in ("world", "micro_batch", "gas", "global_batch", "tp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SizePlan.{name}: got {v!r}; allowed: an integer >= 1")
        if self.world % self.tp:
            raise ValueError(f"SizePlan: world ({self.world}) is not a multiple of tp ({self.tp})")
        if self.global_batch != self.micro_batch * self.gas * self.dp:
            raise ValueError(
                f"SizePlan: global_batch ({self.global_batch}) != micro_batch ({self.micro_batch})"
                f" x gas ({self.gas}) x dp ({self.dp})"
            )

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the world size `Config.resolve_batch` takes."""
        return self.world // self.tp

    @property
    def batch_sizes(self) -> BatchSizes:
        """The plan as `Config.resolve_batch` reports it."""
        return BatchSizes(self.global_batch, self.micro_batch, self.gas)


def plan_sizes(
    cfg: Config, min_workers: int, max_workers: int
) -> tuple[dict[int, SizePlan], dict[int, str]]:
    """For every world size in min_workers..max_workers: its plan, or why it is skipped.

    Returns (plans, skipped), keyed by world size; together they cover the whole range and
    every plan has the same global batch. An empty `plans` means no size in the range keeps
    the batch (`plan_run` turns that into an error). See the module docstring for the rules.
    """
    _check_range(min_workers, max_workers)
    tp = cfg.tensor_parallel.tp_size
    if cfg.elasticity.enabled:
        if tp > 1:
            raise ConfigError(
                "tensor_parallel.tp_size",
                tp,
                "1 while elasticity.enabled",
                "DeepSpeed's elastic batch choice counts every worker as a data-parallel rank; "
                "for an elastic run with tensor slicing leave elasticity off and give "
                "train_batch_size (zray keeps it at every multiple of tp_size)",
            )
        return _plan_elasticity(cfg.elasticity, min_workers, max_workers)
    return _plan_fixed_batch(cfg, min_workers, max_workers, tp)


def plan_run(cfg: Config) -> tuple[dict[int, SizePlan], dict[int, str]]:
    """`plan_sizes` over the run's own zray.num_workers, raising ConfigError (with the reasons)
    when no size in it can keep the global batch: such a run could never start."""
    run = cfg.zray
    plans, skipped = plan_sizes(cfg, run.min_workers, run.max_workers)
    if not plans:
        shown = [f"{w}: {skipped[w]}" for w in sorted(skipped)[:_MAX_REASONS_SHOWN]]
        if len(skipped) > _MAX_REASONS_SHOWN:
            shown.append(f"... ({len(skipped) - _MAX_REASONS_SHOWN} more)")
        reason = "no world size keeps the global batch (" + "; ".join(shown) + ")"
        allowed = "a worker range with at least one world size that splits the global batch"
        raise ConfigError("zray.num_workers", run.num_workers, allowed, reason)
    return plans, skipped


def valid_worlds(plans: Mapping[int, SizePlan]) -> list[int]:
    """The world sizes that have a plan, smallest first."""
    return sorted(plans)


def best_world(plans: Mapping[int, SizePlan], capacity: int) -> int | None:
    """The largest planned world size that `capacity` workers can host, or None if none fits."""
    fitting = [w for w in plans if w <= capacity]
    return max(fitting) if fitting else None


def config_for_world(cfg: Config, plan: SizePlan) -> Config:
    """`cfg` as a fixed-size run of `plan.world` workers: the batch triple pinned to the plan,
    zray.num_workers = plan.world, and any elasticity block switched off (its job is done, and
    an enabled block would refuse the pinned batch keys). `resolve_batch(plan.dp)` of the
    result returns exactly the plan. The controller keeps the original `cfg` for planning."""
    elasticity = cfg.elasticity
    if elasticity.enabled:
        elasticity = dataclasses.replace(elasticity, enabled=False)
    return dataclasses.replace(
        cfg,
        train_batch_size=plan.global_batch,
        train_micro_batch_size_per_gpu=plan.micro_batch,
        gradient_accumulation_steps=plan.gas,
        elasticity=elasticity,
        zray=dataclasses.replace(cfg.zray, num_workers=plan.world),
    )


# ---- (a) a fixed global batch from the batch keys ----------------------------------------------


def _plan_fixed_batch(
    cfg: Config, lo: int, hi: int, tp: int = 1
) -> tuple[dict[int, SizePlan], dict[int, str]]:
    """Keyed by worker count w; the batch splits over its w / tp data-parallel ranks."""
    tbs, micro, gas = (
        cfg.train_batch_size,
        cfg.train_micro_batch_size_per_gpu,
        cfg.gradient_accumulation_steps,
    )
    lo_dp = -(-lo // tp)  # the smallest data-parallel size in the range
    batch = tbs if tbs is not None else (micro or 1) * (gas or 1) * lo_dp
    plans: dict[int, SizePlan] = {}
    skipped: dict[int, str] = {}
    for w in range(lo, hi + 1):
        if w % tp:
            skipped[w] = f"{_workers(w)} is not a multiple of tensor_parallel.tp_size {tp}"
            continue
        dp = w // tp
        ranks = _workers(w) if tp == 1 else f"{dp} data-parallel rank{'s' * (dp > 1)}"
        if micro is not None:
            split, what = micro * dp, f"{ranks} x micro-batch {micro}"
        elif gas is not None:
            split, what = gas * dp, f"{ranks} x {gas} accumulation steps"
        else:
            split, what = dp, ranks
        if batch % split:
            relation = "is smaller than" if batch < split else "is not divisible by"
            times = f" = {split}" if split != dp else ""
            skipped[w] = f"global batch {batch} {relation} {what}{times}"
            continue
        share = batch // split  # the one term of micro x gas that is not pinned
        if micro is not None:
            plans[w] = SizePlan(w, micro, share, batch, tp)
        elif gas is not None:
            plans[w] = SizePlan(w, share, gas, batch, tp)
        else:
            plans[w] = SizePlan(w, share, 1, batch, tp)
    return plans, skipped


# ---- (b) DeepSpeed's elasticity ------------------------------------------------------------------


def _plan_elasticity(
    el: ElasticityConfig, lo_workers: int, hi_workers: int
) -> tuple[dict[int, SizePlan], dict[int, str]]:
    if el.model_parallel_size != 1:
        raise ConfigError(
            "elasticity.model_parallel_size",
            el.model_parallel_size,
            "1",
            "zray's elastic plan counts data-parallel workers; tensor slicing does not rescale yet",
        )
    assert el.micro_batch_sizes is not None and el.max_train_batch_size is not None  # _check
    micros = el.micro_batch_sizes
    per_node = el.dp_per_node  # 1 in version 0.1
    lo, hi = max(lo_workers, el.min_gpus), min(hi_workers, el.max_gpus)
    # Candidates are planned per node (per GPU in 0.1) and scaled back up: B = node batch x
    # ranks per node, so any whole number of nodes splits B exactly when it splits a node's.
    nodes = range(-(-lo // per_node), hi // per_node + 1)
    node_batch = _choose_batch(
        micros, el.max_train_batch_size // per_node, nodes, el.prefer_larger_batch
    )
    batch = node_batch * per_node
    plans: dict[int, SizePlan] = {}
    skipped: dict[int, str] = {}
    for w in range(lo_workers, hi_workers + 1):
        if not el.min_gpus <= w <= el.max_gpus:
            skipped[w] = f"outside elasticity.min_gpus..max_gpus ({el.min_gpus}..{el.max_gpus})"
        elif w % per_node:
            skipped[w] = f"not a whole number of nodes of {per_node} (elasticity.num_gpus_per_node)"
        elif batch % w:
            skipped[w] = f"global batch {batch} is not divisible by {_workers(w)}"
        else:
            share = batch // w
            micro = max((m for m in micros if share % m == 0), default=None)
            if micro is None:
                skipped[w] = (
                    f"global batch {batch} / {_workers(w)} = {share} per worker, a multiple of"
                    f" no micro-batch size in elasticity.micro_batch_sizes {list(micros)}"
                )
            else:
                plans[w] = SizePlan(w, micro, share // micro, batch)
    return plans, skipped


def _choose_batch(
    micros: Sequence[int], cap: int, sizes: Iterable[int], prefer_larger: bool
) -> int:
    """DeepSpeed's choice of global batch: among the candidates <= cap, the one valid for the
    most of `sizes`; ties go to the larger batch (prefer_larger) or the smaller."""
    bases = {*micros, math.lcm(*micros)}
    # A base above the cap is dropped (the LCM can be; ElasticityConfig keeps every micro-batch
    # size under it): scaling only grows it, and the cap is the user's limit.
    candidates = {b * _largest_hcn_at_most(cap // b) for b in bases if b <= cap}
    sizes = list(sizes)

    def valid_count(batch: int) -> int:
        return sum(1 for w in sizes if any(batch % (m * w) == 0 for m in micros))

    return max(candidates, key=lambda b: (valid_count(b), b if prefer_larger else -b))


def _largest_hcn_at_most(n: int) -> int:
    # The table ends at 720720; a larger n takes the last entry, as DeepSpeed does.
    return max(h for h in HIGHLY_COMPOSITE if h <= n)


# ---- helpers -------------------------------------------------------------------------------------


def _check_range(min_workers: int, max_workers: int) -> None:
    allowed = "1 <= min_workers <= max_workers, both integers"
    for v in (min_workers, max_workers):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError("zray.num_workers", [min_workers, max_workers], allowed)
    if not 1 <= min_workers <= max_workers:
        raise ConfigError("zray.num_workers", [min_workers, max_workers], allowed)


def _workers(w: int) -> str:
    return f"{w} worker" if w == 1 else f"{w} workers"

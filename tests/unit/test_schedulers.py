"""DeepSpeed LR schedules: values against DeepSpeed's formulas, written out by hand here.

Step k below is torch's ``last_epoch == k`` (the value applied after k ``step()`` calls), which
zray matches to DeepSpeed's ``last_batch_iteration == k``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch

from zray.schedulers import (
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_scheduler,
)

Factory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def _sgd(lr: float = 0.5, momentum: float = 0.9, groups: int = 1) -> torch.optim.SGD:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def _run(sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    """lr of group 0 at steps 0..n-1, stepping the optimizer first as torch asks."""
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def _check(values: list[float], expected: dict[int, float]) -> None:
    for k, want in expected.items():
        assert values[k] == pytest.approx(want, rel=1e-12, abs=1e-15), f"step {k}"


def test_warmup_lr_log() -> None:
    sched = WarmupLR(_sgd(), warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10)
    lrs = _run(sched, 60)
    # lr = min + (max - min) * ln(k + 1) / ln(W) during warmup, then max.
    _check(
        lrs,
        {
            0: 0.0,
            1: 0.1 * math.log(2) / math.log(10),
            5: 0.1 * math.log(6) / math.log(10),
            9: 0.1,  # ln(10) / ln(10): log warmup reaches max at W - 1
            10: 0.1,
            59: 0.1,
        },
    )
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[-1])


def test_warmup_lr_linear_and_default_max() -> None:
    sched = WarmupLR(
        _sgd(), warmup_min_lr=0.01, warmup_max_lr=0.11, warmup_num_steps=10, warmup_type="linear"
    )
    # lr = min + (max - min) * k / W during warmup.
    _check(_run(sched, 30), {0: 0.01, 1: 0.02, 9: 0.10, 10: 0.11, 29: 0.11})

    # warmup_max_lr defaults to the optimizer's lr (0.5 here).
    sched = WarmupLR(_sgd(lr=0.5), warmup_num_steps=4, warmup_type="linear")
    _check(_run(sched, 6), {0: 0.0, 2: 0.25, 4: 0.5, 5: 0.5})


def test_warmup_num_steps_is_at_least_two() -> None:
    # DeepSpeed clamps W to 2 so ln(W) > 0: steps 0, 1 -> 0, max.
    sched = WarmupLR(_sgd(), warmup_min_lr=0.0, warmup_max_lr=0.3, warmup_num_steps=0)
    _check(_run(sched, 3), {0: 0.0, 1: 0.3, 2: 0.3})


def test_warmup_decay_lr() -> None:
    sched = WarmupDecayLR(
        _sgd(),
        total_num_steps=30,
        warmup_min_lr=0.0,
        warmup_max_lr=0.1,
        warmup_num_steps=10,
        warmup_type="linear",
    )
    # Warmup k / W, then gamma = (T - k) / (T - W), floored at 0.
    _check(
        _run(sched, 40),
        {0: 0.0, 1: 0.01, 9: 0.09, 10: 0.1, 20: 0.05, 25: 0.025, 29: 0.005, 30: 0.0, 39: 0.0},
    )


def test_warmup_decay_lr_log_warmup() -> None:
    sched = WarmupDecayLR(
        _sgd(), total_num_steps=20, warmup_min_lr=0.02, warmup_max_lr=0.12, warmup_num_steps=5
    )
    _check(
        _run(sched, 21),
        {
            0: 0.02,
            1: 0.02 + 0.1 * math.log(2) / math.log(5),
            4: 0.12,
            5: 0.02 + 0.1 * 15 / 15,
            # gamma scales (max - min) on top of min: the decay ends at warmup_min_lr.
            10: 0.02 + 0.1 * 10 / 15,
            20: 0.02,
        },
    )


def test_warmup_cosine_lr() -> None:
    opt = _sgd(lr=0.2)
    sched = WarmupCosineLR(
        opt,
        total_num_steps=30,
        warmup_min_ratio=0.1,
        warmup_num_steps=10,
        cos_min_ratio=0.01,
        warmup_type="linear",
    )
    lrs = _run(sched, 45)

    def cos_ratio(k: int) -> float:  # after warmup: progress (k - W + 1) / (T - W)
        return 0.01 + 0.99 * (1 + math.cos(math.pi * (k - 10 + 1) / 20)) / 2

    _check(
        lrs,
        {
            0: 0.2 * 0.1,
            1: 0.2 * (0.1 + 0.9 * 0.1),
            9: 0.2 * (0.1 + 0.9 * 0.9),
            10: 0.2 * cos_ratio(10),
            19: 0.2 * 0.505,  # progress 1/2: cos = 0
            29: 0.2 * 0.01,  # progress 1: the end
            # Past the end zray holds the floor (DeepSpeed's cosine would climb again).
            30: 0.2 * 0.01,
            44: 0.2 * 0.01,
        },
    )


def test_warmup_cosine_lr_log_and_per_group_base() -> None:
    opt = _sgd(lr=0.2, groups=2)
    opt.param_groups[1]["lr"] = 0.4
    sched = WarmupCosineLR(opt, total_num_steps=100, warmup_num_steps=10)
    sched.optimizer.step()
    sched.step()
    ratio = 0.0 + 1.0 * math.log(2) / math.log(10)  # defaults: warmup_min_ratio 0, "log"
    assert sched.get_last_lr() == pytest.approx([0.2 * ratio, 0.4 * ratio], rel=1e-12)


def test_one_cycle_sgd_momentum_and_decay() -> None:
    opt = _sgd(lr=1.0)
    sched = OneCycle(
        opt,
        cycle_min_lr=0.01,
        cycle_max_lr=0.1,
        cycle_first_step_size=4,
        cycle_second_step_size=6,
        decay_step_size=5,
        decay_lr_rate=0.5,
        cycle_min_mom=0.8,
        cycle_max_mom=0.9,
        decay_mom_rate=0.1,
    )
    lrs, moms = [], []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    # S = 10, r = 0.4, x = (k + 1) / S: scale x / r rising, (x - 1) / (r - 1) falling.
    _check(
        lrs,
        {
            0: 0.01 + 0.09 * 0.25,
            1: 0.01 + 0.09 * 0.5,
            3: 0.1,  # x = r: the peak
            6: 0.01 + 0.09 * 0.5,
            9: 0.01,  # x wraps to 0: cycle ends at the minimum
            10: 0.01 / (1 + 0.5 * 1 / 5),  # decay: i = (k - S + 1) / decay_step_size
            14: 0.01 / (1 + 0.5 * 1),
            19: 0.01 / (1 + 0.5 * 2),
        },
    )
    _check(
        moms,
        {0: 0.875, 1: 0.85, 3: 0.8, 6: 0.85, 9: 0.9, 10: 0.9 * (1 + 0.1 / 5), 14: 0.9 * 1.1},
    )


def test_one_cycle_adam_betas_and_no_decay() -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0, betas=(0.9, 0.95))
    sched = OneCycle(opt, cycle_min_lr=0.001, cycle_max_lr=0.002, cycle_first_step_size=3)
    # Second step size defaults to the first: S = 6, r = 0.5. Default moms 0.8 / 0.9.
    assert sched.get_last_lr()[0] == pytest.approx(0.001 + 0.001 / 3)
    assert opt.param_groups[0]["betas"] == pytest.approx((0.9 - 0.1 / 3, 0.95))
    lrs = _run(sched, 12)
    # decay_step_size 0: hold cycle_min_lr / cycle_max_mom after the cycle.
    _check(lrs, {2: 0.002, 5: 0.001, 11: 0.001})
    assert opt.param_groups[0]["betas"] == pytest.approx((0.9, 0.95))


def test_one_cycle_without_momentum_support_warns() -> None:
    opt = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.warns(UserWarning, match="cycle_momentum is disabled"):
        sched = OneCycle(opt, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=2)
    assert not sched.cycle_momentum
    assert _run(sched, 2) == pytest.approx([0.1 + 0.9 * 0.5, 1.0])


FACTORIES: dict[str, Factory] = {
    "WarmupLR": lambda o: WarmupLR(o, warmup_num_steps=5, warmup_max_lr=0.1),
    "WarmupDecayLR": lambda o: WarmupDecayLR(o, total_num_steps=20, warmup_num_steps=5),
    "WarmupCosineLR": lambda o: WarmupCosineLR(o, total_num_steps=20, warmup_num_steps=5),
    "OneCycle": lambda o: OneCycle(
        o, 0.01, 0.1, cycle_first_step_size=3, decay_step_size=2, decay_lr_rate=0.1
    ),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip_resumes(name: str) -> None:
    factory = FACTORIES[name]
    opt_a = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.3)
    sched_a = factory(opt_a)
    _run(sched_a, 7)
    buf = io.BytesIO()
    torch.save({"sched": sched_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    expected = _run(sched_a, 20)

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    opt_b = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.3)
    sched_b = factory(opt_b)  # torch order: build the scheduler, then load both states
    opt_b.load_state_dict(saved["opt"])
    sched_b.load_state_dict(saved["sched"])
    assert sched_b.last_epoch == 7
    assert _run(sched_b, 20) == expected
    assert opt_b.param_groups[0]["betas"] == opt_a.param_groups[0]["betas"]


def test_build_scheduler_matches_direct_construction() -> None:
    params = {"total_num_steps": 50, "warmup_num_steps": 5, "warmup_type": "linear"}
    built = build_scheduler(_sgd(lr=0.2), "WarmupCosineLR", params)
    direct = WarmupCosineLR(_sgd(lr=0.2), **params)
    assert isinstance(built, WarmupCosineLR)
    assert _run(built, 50) == _run(direct, 50)
    for name in ("WarmupLR", "WarmupDecayLR", "OneCycle"):
        p = {"total_num_steps": 2000} if name == "WarmupDecayLR" else {}
        if name == "OneCycle":
            p = {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0}
        assert type(build_scheduler(_sgd(), name, p)).__name__ == name


def test_build_scheduler_errors() -> None:
    with pytest.raises(ValueError, match=r"'CosineLR'.*WarmupLR.*WarmupDecayLR.*OneCycle"):
        build_scheduler(_sgd(), "CosineLR", {})
    with pytest.raises(ValueError, match=r"unknown parameter.*'warmup_steps'.*warmup_num_steps"):
        build_scheduler(_sgd(), "WarmupLR", {"warmup_steps": 10})
    with pytest.raises(ValueError, match=r"requires \['total_num_steps'\]"):
        build_scheduler(_sgd(), "WarmupDecayLR", {})
    with pytest.raises(ValueError, match=r"warmup_type.*'cosine'"):
        build_scheduler(_sgd(), "WarmupLR", {"warmup_type": "cosine"})
    with pytest.raises(ValueError, match="total_num_steps"):
        WarmupCosineLR(_sgd(), total_num_steps=10, warmup_num_steps=10)
    with pytest.raises(ValueError, match="one value per param group"):
        WarmupLR(_sgd(groups=2), warmup_max_lr=[0.1, 0.2, 0.3])


def test_per_group_warmup_lists() -> None:
    sched = WarmupLR(
        _sgd(groups=2),
        warmup_min_lr=[0.0, 0.1],
        warmup_max_lr=[1.0, 0.2],
        warmup_num_steps=4,
        warmup_type="linear",
    )
    sched.optimizer.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.25, 0.125])

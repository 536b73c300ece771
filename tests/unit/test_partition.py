"""Tests for zray.zero.partition: flat-buffer layout, padding, shard ranges and segments.

Literal cases pin the arithmetic; seeded randomized cases (plain `random`, many shapes, groups
and world sizes 1..8) check the invariants against a reference written here from the docstring.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from zray.zero.partition import SHARD_ALIGN, ParamSlot, Segment, StagePlan, build_layout

Named = list[tuple[str, torch.Size, int]]


def _named(*items: tuple[str, tuple[int, ...], int]) -> Named:
    return [(n, torch.Size(s), g) for n, s, g in items]


# ---- literal cases ---------------------------------------------------------------------------


def test_shard_align_is_16() -> None:
    # 16 fp32 elements = 64 bytes; other tests' literal numbers assume it.
    assert SHARD_ALIGN == 16


def test_build_layout_groups_sorted_frozen_last_and_offsets() -> None:
    named = _named(("a", (3,), 1), ("b", (2, 2), 0), ("c", (5,), -1), ("d", (7,), 0))
    lay = build_layout(named, world=2, sharded=True)
    assert [(s.name, s.group, s.offset, s.numel, s.end) for s in lay.slots] == [
        ("b", 0, 0, 4, 4),
        ("d", 0, 4, 7, 11),
        ("a", 1, 11, 3, 14),
        ("c", -1, 14, 5, 19),
    ]
    assert lay.slots[0].shape == torch.Size([2, 2])
    assert lay.numel == 19
    assert lay.padded_numel == 32  # next multiple of 16 * 2
    assert lay.shard_numel == 16
    assert [lay.shard_range(r) for r in range(2)] == [(0, 16), (16, 32)]
    assert lay.group_ranges() == {0: (0, 11), 1: (11, 14), -1: (14, 19)}


def test_segments_literal_two_ranks() -> None:
    named = _named(("a", (3,), 1), ("b", (2, 2), 0), ("c", (5,), -1), ("d", (7,), 0))
    lay = build_layout(named, world=2, sharded=True)
    assert lay.segments(0) == [Segment(0, 0, 11, 0, 11), Segment(1, 11, 14, 11, 14)]
    # Rank 1 holds only the frozen parameter and padding: nothing for the optimizer.
    assert lay.segments(1) == []


def test_segments_literal_group_split_across_ranks() -> None:
    # group 0: 20 elements, group 1: 30 elements, frozen 10; world 3 -> padded 96, shard 32.
    named = _named(("x", (4, 5), 0), ("y", (30,), 1), ("z", (10,), -1))
    lay = build_layout(named, world=3, sharded=True)
    assert (lay.numel, lay.padded_numel, lay.shard_numel) == (60, 96, 32)
    assert lay.segments(0) == [Segment(0, 0, 20, 0, 20), Segment(1, 20, 32, 20, 32)]
    assert lay.segments(1) == [Segment(1, 32, 50, 0, 18)]
    assert lay.segments(2) == []
    assert [s.numel for s in lay.segments(0)] == [20, 12]


def test_padding_rounds_up_to_align_times_world() -> None:
    one = _named(("w", (100,), 0))
    assert build_layout(one, world=3, sharded=True).padded_numel == 144  # 3 * 48
    assert build_layout(one, world=1, sharded=True).padded_numel == 112  # 7 * 16
    assert build_layout(one, world=8, sharded=True).padded_numel == 128
    exact = _named(("w", (128,), 0))
    assert build_layout(exact, world=8, sharded=True).padded_numel == 128  # no extra shard


def test_empty_layout_still_has_one_quantum() -> None:
    lay = build_layout([], world=4, sharded=True)
    assert (lay.numel, lay.padded_numel, lay.shard_numel) == (0, 64, 16)
    assert lay.slots == ()
    assert all(lay.segments(r) == [] for r in range(4))


def test_unsharded_layout_every_rank_holds_everything() -> None:
    named = _named(("a", (3,), 1), ("b", (2, 2), 0), ("c", (5,), -1), ("d", (7,), 0))
    lay = build_layout(named, world=4, sharded=False)
    assert lay.padded_numel == 32  # padded to SHARD_ALIGN only, not SHARD_ALIGN * world
    assert lay.shard_numel == 32
    for r in range(4):
        assert lay.shard_range(r) == (0, 32)
        assert lay.segments(r) == [Segment(0, 0, 11, 0, 11), Segment(1, 11, 14, 11, 14)]
        assert lay.slot_overlap(lay.slots[1], r) == (0, 7)


def test_slot_overlap_literal() -> None:
    # x: [0, 20) group 0, y: [20, 50) group 1, z: [50, 60) frozen; shards of 32.
    named = _named(("x", (4, 5), 0), ("y", (30,), 1), ("z", (10,), -1))
    lay = build_layout(named, world=3, sharded=True)
    x, y, z = lay.slots
    assert [lay.slot_overlap(x, r) for r in range(3)] == [(0, 20), None, None]
    assert [lay.slot_overlap(y, r) for r in range(3)] == [(0, 12), (12, 30), None]
    assert [lay.slot_overlap(z, r) for r in range(3)] == [None, (0, 10), None]


def test_order_inside_a_group_is_the_given_order() -> None:
    named = _named(("p2", (2,), 2), ("q0", (1,), 0), ("p0", (3,), 0), ("r2", (4,), 2))
    lay = build_layout(named, world=1, sharded=True)
    assert [s.name for s in lay.slots] == ["q0", "p0", "p2", "r2"]
    assert [s.offset for s in lay.slots] == [0, 1, 4, 6]


# ---- StagePlan -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "optimizer", "in_backward", "params"),
    [
        (0, False, False, False),
        (1, True, False, False),
        (2, True, True, False),
        (3, True, True, True),
    ],
)
def test_stage_plan_flags(stage: int, optimizer: bool, in_backward: bool, params: bool) -> None:
    plan = StagePlan(stage)
    assert plan.partition_optimizer is optimizer
    assert plan.reduce_in_backward is in_backward
    assert plan.partition_params is params


@pytest.mark.parametrize("stage", [5, -1, 4])
def test_stage_plan_rejects_unknown_stage(stage: int) -> None:
    with pytest.raises(ValueError) as exc:
        StagePlan(stage)
    assert str(exc.value) == f"zero_optimization.stage: got {stage}; allowed: 0, 1, 2, 3"


# ---- randomized invariants -------------------------------------------------------------------


def _random_named(rng: random.Random) -> Named:
    out = []
    n_groups = rng.randint(1, 4)
    for i in range(rng.randint(1, 12)):
        ndim = rng.randint(0, 3)
        shape = tuple(rng.randint(0 if rng.random() < 0.05 else 1, 40) for _ in range(ndim))
        group = -1 if rng.random() < 0.2 else rng.randrange(n_groups)
        out.append((f"p{i}", torch.Size(shape), group))
    return out


def _numel(shape: torch.Size) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _expected_order(named: Named) -> list[int]:
    """Reference: ascending group id, frozen (-1) last, stable inside a group."""
    trainable = sorted({g for _, _, g in named if g >= 0})
    order = [i for g in trainable for i, item in enumerate(named) if item[2] == g]
    return order + [i for i, item in enumerate(named) if item[2] < 0]


@pytest.mark.parametrize("seed", range(0, 400, 50))
def test_random_layouts_invariants(seed: int) -> None:
    # Each parametrized case runs 50 seeded layouts: 400 layouts in all.
    for s in range(seed, seed + 50):
        rng = random.Random(s)
        world = rng.randint(1, 8)
        named = _random_named(rng)
        _check_layout(named, world)


def _check_layout(named: Named, world: int) -> None:
    lay = build_layout(named, world=world, sharded=True)

    # Slots: the reference order, packed from offset 0 without gaps.
    order = _expected_order(named)
    assert [s.name for s in lay.slots] == [named[i][0] for i in order]
    offset = 0
    for slot, i in zip(lay.slots, order, strict=True):
        assert slot.shape == named[i][1]
        assert slot.group == named[i][2]
        assert slot.offset == offset
        assert slot.numel == _numel(named[i][1])
        offset += slot.numel
    assert lay.numel == offset

    # Padding: smallest multiple of SHARD_ALIGN * world holding everything (at least one).
    quantum = SHARD_ALIGN * world
    assert lay.padded_numel % quantum == 0
    assert lay.padded_numel >= max(lay.numel, 1)
    assert lay.padded_numel - quantum < max(lay.numel, 1)
    assert lay.shard_numel * world == lay.padded_numel
    assert lay.shard_numel % SHARD_ALIGN == 0

    # Shard ranges tile [0, padded) in rank order.
    ranges = [lay.shard_range(r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == lay.padded_numel
    for (a0, a1), (b0, b1) in itertools.pairwise(ranges):
        assert a1 == b0 and a1 - a0 == lay.shard_numel and b1 - b0 == lay.shard_numel

    # Which group each element belongs to (None: padding).
    owner: list[int | None] = [None] * lay.padded_numel
    for slot in lay.slots:
        for e in range(slot.offset, slot.end):
            owner[e] = slot.group

    covered = [0] * lay.padded_numel
    for r in range(world):
        start, end = ranges[r]
        segs = lay.segments(r)
        groups_seen = [s.group for s in segs]
        assert len(groups_seen) == len(set(groups_seen)), "one segment per group per rank"
        prev_hi = start
        for seg in segs:
            assert seg.group >= 0
            assert start <= seg.lo < seg.hi <= end
            assert seg.lo >= prev_hi, "segments in buffer order, not overlapping"
            prev_hi = seg.hi
            assert (seg.shard_lo, seg.shard_hi) == (seg.lo - start, seg.hi - start)
            assert seg.numel == seg.hi - seg.lo
            # Contiguous: every element of the segment is its group's (no padding, no frozen).
            assert all(owner[e] == seg.group for e in range(seg.lo, seg.hi))
            for e in range(seg.lo, seg.hi):
                covered[e] += 1
        # Maximal: no element of a trainable group inside this shard is left out.
        in_segs = {e for seg in segs for e in range(seg.lo, seg.hi)}
        for e in range(start, end):
            g = owner[e]
            assert (g is not None and g >= 0) == (e in in_segs)

    for e, g in enumerate(owner):
        assert covered[e] == (1 if g is not None and g >= 0 else 0), (e, g)

    # slot_overlap: the intersection of the slot with each shard, in slot-local offsets; the
    # pieces over all ranks tile the slot exactly once.
    for slot in lay.slots:
        pieces = []
        for r, (start, end) in enumerate(ranges):
            got = lay.slot_overlap(slot, r)
            a, b = max(slot.offset, start), min(slot.end, end)
            assert got == ((a - slot.offset, b - slot.offset) if a < b else None)
            if got is not None:
                pieces.append(got)
        assert sum(b - a for a, b in pieces) == slot.numel
        for (_, a1), (b0, _) in itertools.pairwise(pieces):
            assert a1 == b0
        if pieces:
            assert pieces[0][0] == 0 and pieces[-1][1] == slot.numel


def test_random_unsharded_layouts() -> None:
    rng = random.Random(1234)
    for _ in range(100):
        world = rng.randint(1, 8)
        named = _random_named(rng)
        lay = build_layout(named, world=world, sharded=False)
        total = sum(_numel(s) for _, s, _ in named)
        expected_padded = max(SHARD_ALIGN, -(-total // SHARD_ALIGN) * SHARD_ALIGN)
        assert lay.padded_numel == expected_padded
        trainable = sum(_numel(s) for _, s, g in named if g >= 0)
        for r in range(world):
            assert lay.shard_range(r) == (0, expected_padded)
            assert sum(seg.numel for seg in lay.segments(r)) == trainable


def test_param_slot_end() -> None:
    slot = ParamSlot("w", torch.Size([3, 4]), offset=5, numel=12, group=0)
    assert slot.end == 17

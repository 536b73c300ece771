"""Checkpoint save/load, GatheredParameters and activation checkpointing on real gloo groups."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _workloads as w
from zray.launch import launch_local

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_equals_uninterrupted(stage: int, tmp_path: object) -> None:
    """Per-rank save at step 2 of 5, load into a differently initialised engine: bit-identical."""
    results = launch_local(w.resume_matches, 2, stage, str(tmp_path))
    r0 = results[0]
    for k, v in r0["uninterrupted"].items():
        assert torch.equal(v, r0["resumed"][k]), k
    assert r0["client"] == {"note": "hello"}
    assert r0["steps_after_load"] == 2
    assert r0["path"].endswith("global_step2")


@pytest.mark.parametrize("stage", [1, 3])
def test_gathered_parameters_modifier_rank(stage: int) -> None:
    results = launch_local(w.gathered_parameters, 2, stage)
    fc = w.fresh_model().blocks[0].mlp.fc.weight
    for r in results:
        assert r["inside_shape"] == tuple(fc.shape)
        assert r["inside_sum"] == pytest.approx(float(fc.detach().sum()), rel=1e-5)
        assert torch.equal(r["edited"], torch.full_like(fc, 0.5))
        assert not torch.equal(r["after_step"], r["edited"])  # and training continues from it
    held = [r["outside_bytes"] for r in results]
    assert held == [0, 0] if stage == 3 else all(b >= 4 * fc.numel() for b in held)


@pytest.mark.parametrize("stage", [2, 3])
def test_activation_checkpointing_matches_reference(stage: int) -> None:
    """Checkpointed blocks recompute during backward (at stage 3, with gathered parameters)."""
    results = launch_local(
        w.train_with, 2, stage, {"activation_checkpointing": {"modules": "blocks"}}
    )
    ref = w.reference_training()
    state = results[0]["state"]
    for k in ref:
        err = float((state[k] - ref[k]).norm() / ref[k].norm())
        assert err <= 1e-5, (k, err)

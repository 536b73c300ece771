"""A checkpoint saved on one data x tensor mesh resumes on another with the uninterrupted loss.

4 gloo ranks: saved at dp2 x tp2, resumed at dp4 x tp1, and the reverse; ZeRO stages differ
between save and load too. Tolerance, fp32: 1e-5 relative on every loss after the resume and on
every parameter tensor of the final state. The runs differ only in summation order (the mesh
changes how gradients and partial products are reduced), which moves fp32 results by ~1e-7; a
wrong restore (a mis-mapped slice, optimizer state left at zero) moves them by 1e-2 or more.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import _tp_checkpoint_workloads as w
from zray.checkpoint.format import MANIFEST
from zray.launch import launch_local

pytestmark = pytest.mark.distributed


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# (save tp, load tp, save stage, load stage)
CASES = [(2, 1, 1, 2), (1, 2, 2, 1)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict[str, Any]]]:
    """Every rank's results of every case, from one launch of 4 ranks (shared by the tests)."""
    root = tmp_path_factory.mktemp("tp_checkpoints")
    return launch_local(w.resume_cases, 4, CASES, str(root))


@pytest.mark.parametrize(
    ("save_tp", "load_tp", "save_stage", "load_stage"),
    CASES,
    ids=[f"dp{4 // a}xtp{a}-to-dp{4 // b}xtp{b}" for a, b, _, _ in CASES],
)
def test_resume_on_another_mesh(
    results: list[list[dict[str, Any]]],
    save_tp: int,
    load_tp: int,
    save_stage: int,
    load_stage: int,
) -> None:
    case = (save_tp, load_tp, save_stage, load_stage)
    ranks = [r[CASES.index(case)] for r in results]
    r0 = ranks[0]
    assert r0["meshes"] == ((4 // save_tp, save_tp), (4 // load_tp, load_tp))
    assert r0["steps_after_load"] == w.SPLIT
    assert [r["client"] for r in ranks] == [{"rank": i} for i in range(4)]
    manifest = json.loads((Path(r0["path"]) / MANIFEST).read_text())
    assert manifest["tp_size"] == save_tp
    assert bool(manifest["tp_layouts"]) == (save_tp > 1)
    for rank, r in enumerate(ranks):
        for step, (got, want) in enumerate(zip(r["resumed"], r["uninterrupted"], strict=True)):
            assert abs(got - want) <= 1e-5 * abs(want), (
                f"rank {rank}, step {w.SPLIT + step}: resumed loss {got}, uninterrupted {want}"
            )
    # The loss really moved after the resume (a frozen model would match a frozen model).
    assert abs(r0["uninterrupted"][-1] - r0["before"][0]) > 1e-3
    got, want = r0["resumed_state"], r0["uninterrupted_state"]
    assert got.keys() == want.keys()
    errors = {k: rel_err(got[k], want[k]) for k in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"{worst} off by {errors[worst]:.2e}"

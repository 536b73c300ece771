"""Tests for zray.launch.launch_local: real spawned processes joined in a real gloo group.

The worker functions live at module level so that spawned children can import them by name.
"""

from __future__ import annotations

import os

import pytest

import zray
from zray.errors import ZrayError
from zray.launch import WorkerGroupError, launch_local


def _rank_and_world_size() -> tuple[str, int]:
    import torch.distributed as dist

    zray.init_distributed()
    return os.environ["RANK"], dist.get_world_size()


def _fail_on(messages: dict[int, str]) -> int:
    rank = int(os.environ["RANK"])
    if rank in messages:
        raise RuntimeError(messages[rank])
    return rank


def test_launch_local_results_in_rank_order() -> None:
    assert launch_local(_rank_and_world_size, 2, timeout=60.0) == [("0", 2), ("1", 2)]


def test_launch_local_names_every_failed_rank() -> None:
    messages = {1: "disk quota exceeded on worker one", 2: "bad batch shape on worker two"}
    with pytest.raises(WorkerGroupError) as exc:
        launch_local(_fail_on, 3, messages, timeout=60.0)
    err = exc.value
    assert isinstance(err, ZrayError)
    assert sorted(err.failures) == [1, 2]
    text = str(err)
    assert text.startswith("2 rank(s) failed: 1, 2\n")
    assert "--- rank 1 ---" in text and "--- rank 2 ---" in text
    assert "--- rank 0 ---" not in text
    assert "RuntimeError: disk quota exceeded on worker one" in text
    assert "RuntimeError: bad batch shape on worker two" in text
    # Each rank's traceback sits under its own header.
    assert text.index("--- rank 1 ---") < text.index("worker one") < text.index("--- rank 2 ---")
    assert text.index("--- rank 2 ---") < text.index("worker two")

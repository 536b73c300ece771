"""An actor's answer stored on a node that went away before the controller fetched it.

Seen in CI (two nodes removed at once): `ray.get` of a holder's snapshots raised
ObjectReconstructionFailedError, which escaped the controller and ended the run. Such a holder
is as good as dead: its snapshots are skipped, its rank counts as died (a restart cures it).
"""

from __future__ import annotations

from typing import Any

import pytest
import ray

from zray.cluster.group import RayWorkerGroup


class _Method:
    def __init__(self, answer: str) -> None:
        self.answer = answer

    def remote(self, *args: Any) -> str:
        return self.answer


class _Actor:
    def __init__(self, name: str) -> None:
        self.snapshots = _Method(f"{name}-snapshots")
        self.report = _Method(f"{name}-report")


def _lost(ref: str) -> BaseException:
    return ray.exceptions.ObjectReconstructionFailedError(ref.encode().hex())


def _group(names: list[str]) -> RayWorkerGroup:
    g = RayWorkerGroup.__new__(RayWorkerGroup)
    g.size, g.actors, g.runs, g._finished = len(names), [_Actor(n) for n in names], [], {}
    return g


def test_snapshots_skip_a_holder_whose_answer_was_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    def get(ref: str, timeout: float | None = None) -> Any:
        if ref == "gone-snapshots":
            raise _lost(ref)
        return {0: [(4, "packed-0")]}

    monkeypatch.setattr(ray, "get", get)
    assert _group(["alive", "gone"]).snapshots() == {0: [(4, "packed-0")]}


def test_a_lost_report_counts_as_a_died_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    def get(ref: str, timeout: float | None = None) -> Any:
        if ref == "gone-report":
            raise _lost(ref)
        return None

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "wait", lambda refs, **kw: ([], refs))
    polled = _group(["alive", "gone"]).poll()
    assert [(f.rank, f.kind) for f in polled.failures] == [(1, "died")]

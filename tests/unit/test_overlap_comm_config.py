"""zero_optimization.overlap_comm_max_ctas: validated by the config, a no-op where it cannot apply."""

from __future__ import annotations

import pytest

import zray
from zray.zero import comm


def test_accepts_a_cta_cap_and_defaults_to_none() -> None:
    assert zray.Config.from_dict({}).zero_optimization.overlap_comm_max_ctas == 0
    cfg = zray.Config.from_dict({"zero_optimization": {"stage": 3, "overlap_comm_max_ctas": 8}})
    assert cfg.zero_optimization.overlap_comm_max_ctas == 8


@pytest.mark.parametrize("bad", [-1, 65, "many"])
def test_rejects_bad_caps(bad: object) -> None:
    with pytest.raises(zray.ConfigError, match="overlap_comm_max_ctas"):
        zray.Config.from_dict({"zero_optimization": {"overlap_comm_max_ctas": bad}})


def test_no_second_communicator_without_nccl() -> None:
    # One process (no group): nothing to cap; the caller keeps its group.
    assert comm.capped_group(None, 8) is None

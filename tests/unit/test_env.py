"""Tests for zray.env: the launcher variables, read in one place."""

from __future__ import annotations

import pytest

from zray.env import DistEnv, dist_env_is_set, export_dist_env, read_dist_env

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_single_process(clean_env: pytest.MonkeyPatch) -> None:
    assert read_dist_env() == DistEnv(
        rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500
    )
    assert dist_env_is_set() is False


def test_parsing(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("MASTER_ADDR", "10.0.0.5")
    clean_env.setenv("MASTER_PORT", "12345")
    env = read_dist_env()
    assert env == DistEnv(3, 8, 1, "10.0.0.5", 12345)
    assert isinstance(env.rank, int) and isinstance(env.master_port, int)
    assert dist_env_is_set() is True


def test_empty_values_mean_defaults(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "")
    clean_env.setenv("MASTER_PORT", "")
    env = read_dist_env()
    assert (env.rank, env.master_port) == (0, 29500)


def test_dist_env_is_set_needs_rank_and_world_size(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "0")
    assert dist_env_is_set() is False
    clean_env.delenv("RANK")
    clean_env.setenv("WORLD_SIZE", "2")
    assert dist_env_is_set() is False
    clean_env.setenv("RANK", "1")
    assert dist_env_is_set() is True


def test_non_integer_rank_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "zero")
    with pytest.raises(ValueError) as exc:
        read_dist_env()
    assert str(exc.value) == "environment variable RANK: got 'zero'; allowed: an integer"
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


@pytest.mark.parametrize("name", ["WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"])
def test_non_integer_error_names_the_variable(clean_env: pytest.MonkeyPatch, name: str) -> None:
    clean_env.setenv(name, "1.5")
    with pytest.raises(ValueError, match=rf"^environment variable {name}: got '1\.5'; allowed"):
        read_dist_env()


def test_export_values() -> None:
    assert export_dist_env(DistEnv(2, 4, 2, "10.1.2.3", 23456)) == {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "2",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": "23456",
    }


def test_export_read_round_trip(clean_env: pytest.MonkeyPatch) -> None:
    env = DistEnv(rank=5, world_size=7, local_rank=5, master_addr="node-3", master_port=40123)
    for k, v in export_dist_env(env).items():
        clean_env.setenv(k, v)
    assert read_dist_env() == env
    assert dist_env_is_set() is True

"""The one place where zray reads environment variables.

Launchers (torchrun, `deepspeed`, zray's own local launcher, Ray workers) describe a process's
place in the job through the usual variables; everything else in zray receives these values
explicitly, through `DistEnv` and the `ParallelContext` built from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a distributed job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    # A file every rank can open (all ranks on one machine): they meet through it (torch's
    # FileStore) instead of a TCP store, and their collectives bind the loopback interface,
    # so that the process group opens no socket reachable from outside the machine.
    store_file: str | None = None


def use_loopback_sockets() -> None:
    """Point gloo's and NCCL's sockets at the loopback interface, unless the user chose one
    (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME). For process groups on one machine only."""
    import socket

    names = [name for _, name in socket.if_nameindex()]
    if "lo" not in names:  # Linux names it lo; elsewhere leave the libraries' choice
        return
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, "lo")


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: got {raw!r}; allowed: an integer") from None


def read_dist_env() -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (defaults: one process)."""
    return DistEnv(
        rank=_int("RANK", 0),
        world_size=_int("WORLD_SIZE", 1),
        local_rank=_int("LOCAL_RANK", 0),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int("MASTER_PORT", 29500),
    )


def dist_env_is_set() -> bool:
    """True when a launcher has described a multi-process job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def export_dist_env(env: DistEnv) -> dict[str, str]:
    """The variables a launcher sets for a child process (the inverse of `read_dist_env`)."""
    return {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    }


def ray_address() -> str | None:
    """RAY_ADDRESS, which Ray Jobs set for their driver: join that cluster, start none."""
    return os.environ.get("RAY_ADDRESS") or None


def ray_auth_mode() -> str:
    """RAY_AUTH_MODE as Ray reads it ("" when unset)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower()

"""The explicit parallel context: rank, world size, device and process groups in one object.

[Note: no hidden globals] torch.distributed keeps a default process group as a global; zray
never relies on it implicitly. Every collective names the group it runs on, taken from this
context, so that a data x tensor mesh can later hand ZeRO the data-parallel group alone.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zray.env import DistEnv, dist_env_is_set, read_dist_env
from zray.zero.comm import CommStats


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits, and the groups it talks through.

    `dp_*` describe the data-parallel dimension, the one ZeRO partitions over. With no tensor
    parallelism (today) it is the whole world. `dp_group` is None when the job is a single
    process: communication then becomes a no-op rather than a special case at every call site.
    """

    rank: int
    world_size: int
    device: torch.device
    backend: str
    dp_rank: int
    dp_size: int
    dp_group: dist.ProcessGroup | None
    # Counters of this process's collectives (mutable, though the context is not).
    comm_stats: CommStats = field(default_factory=CommStats, compare=False)

    @property
    def is_distributed(self) -> bool:
        return self.dp_group is not None and self.dp_size > 1

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def single_process(cls, device: torch.device | str | None = None) -> ParallelContext:
        dev = torch.device(device) if device is not None else _default_device(0)
        return cls(
            rank=0, world_size=1, device=dev, backend="none", dp_rank=0, dp_size=1, dp_group=None
        )

    @classmethod
    def from_torch_distributed(cls, device: torch.device | str | None = None) -> ParallelContext:
        """Build the context over an already-initialised default process group."""
        if not dist.is_initialized():
            return cls.single_process(device)
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
        if device is None:
            device = _default_device(torch.cuda.current_device() if backend == "nccl" else 0)
        # The default group is the data-parallel group until tensor slicing adds a mesh.
        group = dist.group.WORLD
        return cls(
            rank=rank,
            world_size=world,
            device=torch.device(device),
            backend=backend,
            dp_rank=rank,
            dp_size=world,
            dp_group=group,
        )


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(
    backend: str | None = None,
    timeout: datetime.timedelta | float = 1800.0,
    env: DistEnv | None = None,
    device: torch.device | str | None = None,
) -> ParallelContext:
    """Join (or create) the job's process group and return the context for this process.

    Reads the launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
    unless `env` is given. Without them, and with no group initialised, the job is one process
    and no group is created. NCCL is used when CUDA is present, gloo otherwise.
    """
    if dist.is_initialized():
        return ParallelContext.from_torch_distributed(device)
    if env is None:
        if not dist_env_is_set():
            return ParallelContext.single_process(device)
        env = read_dist_env()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"init_distributed backend: got {backend!r}; allowed: 'nccl', 'gloo'")
    if device is None:
        device = _default_device(env.local_rank) if backend == "nccl" else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        # Binding the communicator to the device lets NCCL set up eagerly and fail early.
        device_id=device if device.type == "cuda" else None,
    )
    return ParallelContext.from_torch_distributed(device)

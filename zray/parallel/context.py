"""The explicit parallel context: rank, world size, device and process groups in one object.

[Note: no hidden globals] torch.distributed keeps a default process group as a global; zray
never relies on it implicitly. Every collective names the group it runs on, taken from this
context, so that the data x tensor mesh hands ZeRO the data-parallel group alone.

[Note: the mesh] world = dp x tp, tensor-parallel ranks contiguous: global rank
= dp_rank * tp_size + tp_rank. A tensor group ({d*tp .. d*tp + tp - 1}) is then a run of
neighbouring ranks, which launchers place on one node, so the per-layer all-reduces of tensor
slicing stay on the fast intra-node links; a data group ({t, t + tp, t + 2 tp, ...}) is strided
and only carries ZeRO's once-per-bucket traffic. `torch.distributed.new_group` is collective
over the whole world and must be called in the same order everywhere, so every rank creates
every group (its own and the others'), tensor groups first.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from zray.env import DistEnv, dist_env_is_set, read_dist_env, use_loopback_sockets
from zray.errors import ConfigError
from zray.parallel.comm_stats import CommStats


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits, and the groups it talks through.

    `dp_*` describe the data-parallel dimension, the one ZeRO partitions over; `tp_*` the
    tensor-parallel one, over which layers are sliced (see the Note on the mesh). With no tensor
    slicing dp is the whole world and `tp_group` is None. `dp_group` is None when the job is a
    single process: communication then becomes a no-op rather than a special case at every call
    site.
    """

    rank: int
    world_size: int
    device: torch.device
    backend: str
    dp_rank: int
    dp_size: int
    dp_group: dist.ProcessGroup | None
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
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

    def with_tensor_parallel(self, tp_size: int) -> ParallelContext:
        """This process's context on a dp x tp mesh of the same world (collective when tp > 1
        and the mesh is new: every rank must call it with the same tp_size).

        Raises ConfigError when tp_size is not a positive divisor of the world size.
        """
        _check_tp_size(tp_size, self.world_size)
        if tp_size == self.tp_size:
            return self
        if self.tp_size != 1:
            raise ValueError(
                f"with_tensor_parallel: this context already has tp_size {self.tp_size}; "
                "build the new mesh from a context without tensor slicing"
            )
        if tp_size == 1:
            return self
        dp_groups, tp_groups = _mesh_groups(self.world_size, tp_size)
        dp_rank, tp_rank = divmod(self.rank, tp_size)
        return replace(
            self,
            dp_rank=dp_rank,
            dp_size=self.world_size // tp_size,
            dp_group=dp_groups[tp_rank],
            tp_rank=tp_rank,
            tp_size=tp_size,
            tp_group=tp_groups[dp_rank],
        )

    @classmethod
    def from_torch_distributed(
        cls, device: torch.device | str | None = None, tp_size: int = 1
    ) -> ParallelContext:
        """Build the context over an already-initialised default process group, as a
        (world / tp_size) x tp_size mesh."""
        if not dist.is_initialized():
            _check_tp_size(tp_size, 1)
            return cls.single_process(device)
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
        if device is None:
            device = _default_device(torch.cuda.current_device() if backend == "nccl" else 0)
        # The default group is the data-parallel group until tensor slicing adds a mesh.
        group = dist.group.WORLD
        ctx = cls(
            rank=rank,
            world_size=world,
            device=torch.device(device),
            backend=backend,
            dp_rank=rank,
            dp_size=world,
            dp_group=group,
        )
        return ctx.with_tensor_parallel(tp_size)


def _check_tp_size(tp_size: object, world: int) -> None:
    key = "tensor_parallel.tp_size"
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigError(key, tp_size, "an integer >= 1")
    if world % tp_size != 0:
        raise ConfigError(
            key,
            tp_size,
            f"a divisor of the world size ({world})",
            "the world is a data x tensor mesh: world = dp_size * tp_size",
        )


# (world group, tp_size) -> (dp groups by tp rank, tp groups by dp rank). Groups are costly to
# create (a rendezvous each) and every rank must create them together, so one mesh per world
# group is made once and reused by every engine of the process. Keyed by the world group object
# itself (kept alive here), so a re-initialised world (elastic resize) never finds stale groups.
_Groups = list[dist.ProcessGroup]
_MESHES: dict[tuple[int, int], tuple[dist.ProcessGroup, _Groups, _Groups]] = {}


def _mesh_groups(world: int, tp_size: int) -> tuple[_Groups, _Groups]:
    world_group = dist.group.WORLD
    key = (id(world_group), tp_size)
    found = _MESHES.get(key)
    if found is not None and found[0] is world_group:
        return found[1], found[2]
    dp_size = world // tp_size
    tp_groups = [
        dist.new_group(list(range(d * tp_size, (d + 1) * tp_size))) for d in range(dp_size)
    ]
    dp_groups = [dist.new_group(list(range(t, world, tp_size))) for t in range(tp_size)]
    _MESHES[key] = (world_group, dp_groups, tp_groups)
    return dp_groups, tp_groups


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(
    backend: str | None = None,
    timeout: datetime.timedelta | float = 1800.0,
    env: DistEnv | None = None,
    device: torch.device | str | None = None,
    tp_size: int = 1,
) -> ParallelContext:
    """Join (or create) the job's process group and return the context for this process.

    Reads the launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
    unless `env` is given. Without them, and with no group initialised, the job is one process
    and no group is created. NCCL is used when CUDA is present, gloo otherwise. `tp_size` > 1
    lays the world out as a data x tensor mesh (see the Note on the mesh).
    """
    if dist.is_initialized():
        return ParallelContext.from_torch_distributed(device, tp_size)
    if env is None:
        if not dist_env_is_set():
            _check_tp_size(tp_size, 1)
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
    if env.store_file:
        use_loopback_sockets()
        init_method = f"file://{env.store_file}"
    else:
        init_method = f"tcp://{env.master_addr}:{env.master_port}"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        # Binding the communicator to the device lets NCCL set up eagerly and fail early.
        device_id=device if device.type == "cuda" else None,
    )
    return ParallelContext.from_torch_distributed(device, tp_size)

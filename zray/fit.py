"""`zray.fit`: train on Ray, under a controller that survives failures.

    result = zray.fit(model=build_model, data="tokens.parquet", config="ds_config.json",
                      num_workers=2, checkpoint_dir="/mnt/ckpt")

With no `address`, an embedded local Ray cluster is started (CPU workers with gloo when there is
no GPU) and stopped at the end; with one, the run joins that cluster. Ray's token
authentication stays on: zray refuses to start a cluster with RAY_AUTH_MODE=disabled.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zray.cluster.controller import RunStatus
from zray.config import Config
from zray.env import ray_address, ray_auth_mode
from zray.errors import ConfigError
from zray.models.data import synthetic_table
from zray.preflight import preflight
from zray.run_records import RunSpec

log = logging.getLogger("zray")


@dataclass
class FitResult:
    steps: int
    world_size: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    checkpoint: str | None = None  # the last committed checkpoint
    restarts: int = 0
    resizes: int = 0
    lost_steps: int = 0  # completed steps redone after failures
    decisions: list[str] = field(default_factory=list)
    run_name: str = ""
    metrics_url: str | None = None  # served while the run was going
    # Rank 0 of the last group: (step, seconds since that group started training) when each
    # step was done on the device; and the steps between its last two state copies.
    step_times: list[tuple[int, float]] = field(default_factory=list)
    copy_interval: float = 0.0
    copy_stats: dict[str, Any] = field(default_factory=dict)  # rank 0's ReplicaStats

    def steady_tokens_per_s(self, skip: int, tokens_per_step: int) -> float:
        """Tokens/s over the steps after the first `skip` of the last group (warm-up out)."""
        times = [(s, t) for s, t in self.step_times if s >= self.step_times[0][0] + skip]
        if len(times) < 2 or times[-1][1] <= times[0][1]:
            return float("nan")
        (s0, t0), (s1, t1) = times[0], times[-1]
        return (s1 - s0) * tokens_per_step / (t1 - t0)

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else float("nan")

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "loss": self.final_loss,
            "tokens_per_s": self.tokens_per_s,
            "steps": float(self.steps),
            "restarts": float(self.restarts),
        }


class ProgressLine:
    """The driver's live line: step, loss, tokens/s, world size, restarts, state."""

    def __init__(self, total: int | None, stream: Any = None) -> None:
        self.total, self.stream = total, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last: tuple[Any, ...] = ()
        self._announced = False

    def __call__(self, st: RunStatus) -> None:
        if st.metrics_url and not self._announced:
            self._announced = True
            self.stream.write(f"[zray] metrics: {st.metrics_url}\n")
        key = (st.state, st.step, st.restarts)
        if key == self._last:
            return
        self._last = key
        self.stream.write(("\r" + self.format(st)) if self.tty else self.format(st) + "\n")
        self.stream.flush()

    def format(self, st: RunStatus) -> str:
        """One line: the step, the newest loss read (a step behind), tokens/s and MFU over the
        last ~20 s, how often state is copied to peers, world size and restarts."""
        loss = "-" if st.loss is None else f"{st.loss:.4f}"
        of = f"/{self.total}" if self.total else ""
        mfu = "" if st.mfu is None else f"  MFU {st.mfu:.1%}"
        copies = f"  copy every {st.copy_interval:.0f} steps" if st.copy_interval else ""
        return (
            f"[zray] {st.state.value:<12} step {st.step}{of}  loss {loss}  "
            f"tokens/s {st.tokens_per_s:,.0f}{mfu}  world {st.world_size}  "
            f"restarts {st.restarts}{copies}"
        )


def _check_tensor_groups_fit(tp: int, use_gpu: bool, embedded: bool) -> None:
    """Each tensor group runs on one node (its collectives run every layer): some node must
    hold `tp` worker slots. Refused on the embedded cluster, whose nodes are all there is;
    warned on a cluster joined by address, where an autoscaler may still add a larger node."""
    import ray

    if tp == 1:
        return
    kind = "GPU" if use_gpu else "CPU"
    largest = max(
        (int(n["Resources"].get(kind, 0)) for n in ray.nodes() if n.get("Alive")), default=0
    )
    if largest >= tp:
        return
    reason = (
        f"a tensor group's {tp} workers must share one node, and the largest node has "
        f"{largest} {kind}(s)"
    )
    if embedded:
        raise ConfigError(
            "tensor_parallel.tp_size", tp, f"at most {largest} (the {kind}s of one node)", reason
        )
    log.warning("tensor_parallel.tp_size %d: %s; waiting for a node that has them", tp, reason)


def _ensure_ray(address: str | None, num_workers: int, use_gpu: bool) -> bool:
    """Connect to `address` or start an embedded cluster; True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    if ray_auth_mode() == "disabled":
        raise ConfigError(
            "RAY_AUTH_MODE",
            "disabled",
            "token (or unset)",
            "zray keeps Ray's token authentication on",
        )
    address = address or ray_address()  # inside a Ray Job (zray submit): that cluster
    # Ray logs "set RAY_AUTH_MODE=disabled to opt out" on every start: advice zray refuses.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: "opt out" not in record.getMessage()
    )
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    if use_gpu and torch.cuda.device_count() == 0:
        raise ConfigError(
            "zray.use_gpu",
            True,
            "false on a machine without GPUs, or a GPU machine (or --address of a cluster with GPUs)",
            "torch sees no CUDA device here"
            + (
                ""
                if torch.cuda.is_available()
                else f" (torch {torch.__version__}, CUDA unavailable)"
            ),
        )
    cores = os.cpu_count() or 1
    if not use_gpu and num_workers > cores:
        log.warning(
            "zray.num_workers %d on %d CPU cores: the workers share the cores, so each step "
            "takes about %.1fx as long as with %d workers",
            num_workers,
            cores,
            num_workers / cores,
            cores,
        )
    _single_machine_ray(True)
    try:
        ray.init(
            # A new cluster of its own, never one that `ray start` left running here.
            address="local",
            # Logical CPUs: one per worker plus room for the controller, even on 2 cores.
            num_cpus=max(os.cpu_count() or 1, num_workers + 1),
            num_gpus=torch.cuda.device_count() if use_gpu else 0,
            include_dashboard=False,
            log_to_driver=True,
        )
    except BaseException:
        _single_machine_ray(False)
        raise
    return True


# Ray's switch for its single-machine mode (the one it uses on macOS and Windows): its node
# address is then 127.0.0.1, and its servers (GCS, raylet, agents, every worker's) listen on
# loopback only. On Linux Ray binds them to the machine's address or all interfaces. Ray reads
# the variable when imported (this process) and when its processes start (they inherit it).
_SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_before: dict[str, Any] = {}


def _single_machine_ray(on: bool) -> None:
    """Switch Ray's single-machine mode on for an embedded run, and back after it (a later
    run in this process may join a cluster by address, which needs the machine's address)."""
    from ray._private import ray_constants

    if on:
        _before.update(
            var=os.environ.get(_SINGLE_MACHINE_VAR), flag=ray_constants.ENABLE_RAY_CLUSTER
        )
        os.environ[_SINGLE_MACHINE_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    elif _before:
        if _before["var"] is None:
            os.environ.pop(_SINGLE_MACHINE_VAR, None)
        else:
            os.environ[_SINGLE_MACHINE_VAR] = _before["var"]
        ray_constants.ENABLE_RAY_CLUSTER = _before["flag"]
        _before.clear()


def fit(
    model: Callable[..., nn.Module] | str | None = None,
    data: Any = None,
    config: Config | dict[str, Any] | str | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    num_workers: int | tuple[int, int] | None = None,
    use_gpu: bool | None = None,
    checkpoint_dir: str | None = None,
    max_failures: int | None = None,
    max_steps: int | None = None,
    address: str | None = None,
    progress: Callable[[RunStatus], None] | bool = True,
) -> FitResult:
    """Train `model` on `data` with `config` on Ray workers; returns the final metrics.

    Arguments left None come from the config's "zray" section. `progress` is True for the
    live line on stderr, False for silence, or a callable receiving every RunStatus.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from zray.cluster.controller_actor import ControllerActor

    changes: dict[str, Any] = {
        k: v
        for k, v in {
            "num_workers": list(num_workers) if isinstance(num_workers, tuple) else num_workers,
            "use_gpu": use_gpu,
            "checkpoint_dir": os.fspath(checkpoint_dir) if checkpoint_dir is not None else None,
            "max_failures": max_failures,
            "max_steps": max_steps,
            "model": model if isinstance(model, str) else None,
        }.items()
        if v is not None
    }
    # Applied before the config resolves what depends on them (a scheduler's "auto" steps).
    cfg = Config.load(config, zray=changes)
    run = cfg.zray
    model = model if model is not None else run.model
    if model is None:
        raise ConfigError("model", None, "a callable returning an nn.Module, or zray.model")
    data = data if data is not None else run.data
    if data is None:
        raise ConfigError("data", None, "a Parquet path, Arrow table, Ray or torch Dataset")
    preflight(cfg, model, data)  # mistakes every worker would hit: before Ray starts
    started = _ensure_ray(address, run.max_workers, run.use_gpu)
    show = ProgressLine(run.max_steps) if progress is True else (progress or None)
    try:
        _check_tensor_groups_fit(cfg.tensor_parallel.tp_size, run.use_gpu, started)
        data = synthetic_table(data)
        if not isinstance(data, (str, os.PathLike, list, tuple)):
            data = ray.put(data)  # into the object store once, not pickled per worker
        spec = RunSpec(config=cfg.to_dict(), model=model, data=data, loss=loss)
        run_name = run.run_name or time.strftime("zray-%Y%m%d-%H%M%S")
        # The controller serves the metrics and must outlive worker nodes: pin it (hard) to
        # the driver's node (the head, for a RayJob), where the configured port is published
        # and which an autoscaler does not remove. It needs no resources there.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = ControllerActor.options(scheduling_strategy=here).remote(
            spec, run_name, run.metrics_dir or run.checkpoint_dir
        )
        done = actor.run.remote(run.poll_interval_s)
        while not ray.wait([done], timeout=run.poll_interval_s)[0]:
            if show:
                show(ray.get(actor.status.remote()))
        status: RunStatus = ray.get(actor.status.remote())
        if show:
            show(status)
            if isinstance(show, ProgressLine) and show.tty:
                show.stream.write("\n")
        try:
            outcome = ray.get(done)
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if isinstance(getattr(e, "cause", None), Exception) else e) from None
        finally:
            ray.get(actor.close.remote())
        return FitResult(
            steps=outcome.steps,
            world_size=outcome.world_size,
            losses=outcome.losses,
            tokens_per_s=outcome.tokens_per_s,
            checkpoint=outcome.checkpoint,
            restarts=status.restarts,
            resizes=status.resizes,
            lost_steps=status.lost_steps,
            decisions=status.decisions,
            run_name=run_name,
            metrics_url=status.metrics_url,
            step_times=outcome.step_times,
            copy_interval=status.copy_interval,
            copy_stats=outcome.copy_stats,
        )
    finally:
        if started:
            ray.shutdown()
            _single_machine_ray(False)


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `pred` until true or `timeout` seconds pass (tests and benchmarks)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return False

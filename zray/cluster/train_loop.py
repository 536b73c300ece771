"""What a worker does: join the group, build the engine, resume, train, checkpoint, report.

It runs inside a Worker actor (zray/cluster/worker.py) but knows nothing of Ray: it can be
driven by any launcher that gives it a rank, a world size and a rendezvous address.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zray.checkpoint.async_saver import AsyncSaver
from zray.checkpoint.engine_state import capture, restore
from zray.checkpoint.replica import Send, StateReplicator
from zray.checkpoint.shard import PackedShard, RankShard
from zray.checkpoint.writer import save_shard
from zray.config import Config
from zray.entrypoint import load_entry
from zray.env import DistEnv
from zray.errors import ConfigError, NonFiniteError
from zray.initialize import initialize
from zray.metrics.progress import LossLog, RateWindow
from zray.metrics.worker import WorkerMetrics
from zray.parallel.context import init_distributed
from zray.parallel.step_signals import StepSignals, StepValues


@dataclass
class RunSpec:
    """Everything a worker needs to train; pickled to every worker."""

    config: dict[str, Any]  # Config.to_dict(): DeepSpeed keys plus the "zray" run section
    model: Callable[..., nn.Module] | str  # a factory, or "package.module:callable"
    data: Any  # anything zray.data.as_source accepts (or a Ray ObjectRef to it)
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Unique to this zray.fit call (the spec is made once and pickled to every worker): checkpoint
    # pieces carry it, so a piece an earlier, killed run left in the same directory is never
    # committed beside this run's.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass(frozen=True)
class Report:
    """A worker's progress, as polled by the controller."""

    rank: int
    pid: int
    node: str
    step: int = 0
    loss: float | None = None  # the global mean loss of the newest step read (one step late)
    tokens_per_s: float = 0.0  # all ranks, over the last RATE_WINDOW_S seconds
    mfu: float | None = None  # model FLOPs utilisation over the same window (None: unknown)
    checkpoint_step: int | None = None
    phase: str = "starting"  # starting | training | checkpointing | paused | done
    stage: int = 0
    copy_interval: float = 0.0  # steps between this rank's last two state copies (0: none yet)
    steps_done: int = 0  # steps this process completed (exact: read when the report is asked)
    metrics: dict[str, Any] = field(default_factory=dict)  # see zray.metrics.worker


@dataclass
class RunOutcome:
    """Rank 0's return value when training completes."""

    steps: int
    losses: list[tuple[int, float]]
    tokens_per_s: float
    checkpoint: str | None
    world_size: int
    # (step, seconds since this group started training) when the step's values were read back
    # from the device, i.e. when the device had finished it (to within the host's own step).
    step_times: list[tuple[int, float]] = field(default_factory=list)
    copy_stats: dict[str, Any] = field(default_factory=dict)  # ReplicaStats.as_dict()
    # A planned pause (a resize): every rank stopped after the same step and hands over its
    # state, which the next group restores from memory instead of disk.
    paused: bool = False
    handover: RankShard | None = None


def checkpoint_save_id(run_id: str, attempt: int, step: int) -> str:
    """The id every rank's checkpoint piece of one save carries (see save_shard's save_id)."""
    return f"{run_id}-attempt{attempt}-step{step}"


def build_model(spec: RunSpec, cfg: Config) -> nn.Module:
    factory = load_entry(spec.model) if isinstance(spec.model, str) else spec.model
    kwargs = {**cfg.zray.model_kwargs, **spec.model_kwargs}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            "zray.model",
            spec.model,
            "a callable returning an nn.Module",
            f"it returned {type(model).__name__}",
        )
    return model


def _resolve(data: Any) -> Any:
    if type(data).__name__ == "ObjectRef":
        import ray

        return ray.get(data)
    return data


# The report the controller polls (every zray.poll_interval_s) is refreshed this often: building
# it every step would cost a small model's step a noticeable share of its host time.
REPORT_EVERY_S = 0.1


class TrainLoop:
    """One rank's training: the engine, its data, state copies, checkpoints and reports.

    `send_copy` hands a state copy to the rank's holder (see zray.checkpoint.replica); None
    turns copies off."""

    def __init__(
        self,
        spec: RunSpec,
        rank: int,
        world: int,
        master_addr: str,
        master_port: int,
        resume: Resume,
        attempt: int = 0,
        send_copy: Send | None = None,
    ) -> None:
        self.spec, self.rank, self.world, self.attempt = spec, rank, world, attempt
        self.master_addr, self.master_port, self.resume = master_addr, master_port, resume
        self.send_copy = send_copy
        self._report = Report(rank=rank, pid=os.getpid(), node=socket.gethostname())
        self._lock = threading.Lock()
        # A pause asked for by the controller; the ranks agree on the step (StepSignals).
        self._pause = threading.Event()
        self.copies: StateReplicator | None = None
        self.steps_done = 0
        self.losses = LossLog()  # (step, global mean loss), the resumed history first

    def request_pause(self) -> None:
        self._pause.set()

    def report(self) -> Report:
        with self._lock:
            return Report(**{**self._report.__dict__, "steps_done": self.steps_done})

    def snapshots(self) -> list[tuple[int, PackedShard]]:
        """This rank's complete in-memory copies of its state (for recovery)."""
        return self.copies.snapshots() if self.copies is not None else []

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._report = Report(**{**self._report.__dict__, **changes})

    def run(self) -> RunOutcome:
        try:
            return self._run()
        finally:
            self.losses.close()
            if self.copies is not None:
                self.copies.close()

    def _run(self) -> RunOutcome:
        from zray.data.loader import RankBatches
        from zray.data.prefetch import Prefetcher
        from zray.data.sampler import GlobalBatchSampler
        from zray.data.sources import as_source

        cfg = Config.from_dict(self.spec.config)
        run = cfg.zray
        device = None
        if run.use_gpu:
            device = torch.device("cuda", torch.cuda.current_device())
        init_distributed(
            backend="nccl" if run.use_gpu else "gloo",
            timeout=run.collective_timeout_s,
            env=DistEnv(self.rank, self.world, 0, self.master_addr, self.master_port),
            device=device if device is not None else "cpu",
        )
        torch.manual_seed(run.seed)
        model = build_model(self.spec, cfg)
        engine, *_ = initialize(model=model, config=cfg)
        ctx = engine.ctx
        b = engine.batch
        source = as_source(_resolve(self.spec.data))
        sampler = GlobalBatchSampler(len(source), b.train_batch_size, seed=run.seed)
        metrics = WorkerMetrics(*_flops_and_peak(model, source, engine))
        last_ckpt: str | None = self.resume if isinstance(self.resume, str) else None
        if self.resume:
            self._restore(engine, sampler, metrics)
        data = Prefetcher(
            RankBatches(
                source,
                sampler,
                ctx.dp_rank,
                ctx.dp_size,
                b.micro_batch_per_gpu,
                b.gradient_accumulation_steps,
                "cpu",
            ),
            ctx.device,
        )
        counted = _CountTokens(data)
        signals = StepSignals(ctx)
        if run.replica_interval and self.send_copy is not None:
            self.copies = StateReplicator(
                engine,
                run.replica_interval,
                self.send_copy,
                self.losses.client_state_through,
                generations=2 if self.world > 1 else 1,
                budget_bytes=_host_budget(ctx),
            )
        copies = self.copies
        max_steps = run.max_steps or 100
        root = run.checkpoint_dir
        saver = AsyncSaver() if run.async_checkpoint else None
        rate = RateWindow(ctx.dp_size)
        t0 = time.perf_counter()
        self._set(phase="training", step=engine.global_steps, stage=engine.plan.stage)
        votes: StepValues | None = None  # the newest values read: they decide the next step
        step_times: list[tuple[int, float]] = []

        def read(values: list[StepValues]) -> None:
            nonlocal votes
            now = time.perf_counter() - t0
            for v in values:
                step_times.append((v.step, now))
                keep = v.step % run.log_interval == 0 or v.step == max_steps
                self.losses.record(v.step, v.loss, keep)
                votes = v
                if not engine.fp16_enabled():  # fp16 skips such steps itself (loss scaling)
                    _check_finite(v)
            if values:
                metrics.logged(values[-1].loss, values[-1].grad_norm)

        def checkpoint(step: int) -> str:
            self._set(phase="checkpointing")
            t_save = time.perf_counter()
            shard = capture(
                engine, sampler=data.state_dict(), client_state=self.losses.client_state()
            )
            nbytes = sum(
                t.numel() * t.element_size() for r in shard.ranges for t in r.tensors.values()
            )
            # The same id on every rank of this run and attempt: a step saved again after a
            # restart, or by another run in the same directory, can never commit a mix of the
            # old files and the new ones.
            save_id = checkpoint_save_id(self.spec.run_id, self.attempt, step)
            if saver is not None:
                # capture() already copied to CPU: the snapshot needs no second copy.
                saver.save(
                    root, step, shard, keep_last=run.keep_last, save_id=save_id, copy_ranges=False
                )
                path = os.path.join(root, f"step_{step:08d}")
            else:
                path = str(save_shard(root, step, shard, keep_last=run.keep_last, save_id=save_id))
            # With async saves this is the snapshot's time, not the write's.
            metrics.checkpoint_saved(time.perf_counter() - t_save, nbytes)
            self._set(phase="training", checkpoint_step=step, metrics=metrics.snapshot())
            return path

        samples_per_step = b.micro_batch_per_gpu * b.gradient_accumulation_steps
        t_step = time.perf_counter()
        last_report = 0.0
        try:
            while engine.global_steps < max_steps:
                tokens_before = counted.tokens
                local = engine.train_batch(counted, loss_fn=self.spec.loss)
                self.steps_done += 1
                step = engine.global_steps
                now = time.perf_counter()
                step_s = now - t_step
                t_step = now
                metrics.step(
                    engine,
                    step_s,
                    counted.tokens - tokens_before,
                    samples_per_step,
                    data.fetch_seconds,
                    data.wait_seconds,
                )
                # The values of the step before (all ranks' sums): the pause and copy votes
                # they carry decide what happens after this step, on every rank alike.
                read(signals.take(through=step - signals.lag))
                decided = votes if votes is not None and votes.step == step - 1 else None
                pause = decided is not None and decided.pause and step < max_steps
                copy_now = decided is not None and decided.copy_ready and not pause
                if copies is not None and copy_now and step < max_steps:
                    copies.capture(step, data.state_dict())
                ready = copies is not None and copies.ready(step + 1, rate.seconds_per_step())
                signals.push(step, local, engine.last_grad_norm, self._pause.is_set(), ready)
                rate.add(now, counted.tokens)
                if now - last_report >= REPORT_EVERY_S or pause or step == max_steps:
                    last_report = now
                    self._report_progress(engine, metrics, rate, step)
                if pause:
                    read(signals.drain())
                    self._set(phase="paused", loss=self.losses.newest())
                    return RunOutcome(
                        steps=step,
                        losses=self.losses.items(),
                        tokens_per_s=0.0,
                        checkpoint=last_ckpt,
                        world_size=ctx.dp_size,
                        step_times=step_times,
                        paused=True,
                        handover=capture(
                            engine,
                            sampler=data.state_dict(),
                            client_state=self.losses.client_state(),
                        ),
                    )
                if (
                    root
                    and run.checkpoint_interval
                    and step % run.checkpoint_interval == 0
                    and step < max_steps
                ):
                    read(signals.drain())
                    last_ckpt = checkpoint(step)
            read(signals.drain())
            if root:
                last_ckpt = checkpoint(engine.global_steps)
            if saver is not None:
                saver.wait()
        finally:
            data.close()
        self._report_progress(engine, metrics, rate, engine.global_steps)
        self._set(phase="done")
        return RunOutcome(
            steps=engine.global_steps,
            losses=self.losses.items(),
            tokens_per_s=counted.tokens * ctx.dp_size / max(time.perf_counter() - t0, 1e-9),
            checkpoint=last_ckpt,
            world_size=ctx.dp_size,
            step_times=step_times,
            copy_stats=copies.stats.as_dict() if copies is not None else {},
        )

    def _report_progress(
        self, engine: Any, metrics: WorkerMetrics, rate: RateWindow, step: int
    ) -> None:
        """Refresh what the controller polls (every REPORT_EVERY_S, not every step)."""
        metrics.sample(engine)
        stats = self.copies.stats if self.copies is not None else None
        if stats is not None:
            metrics.copies(stats)
        tokens_per_s = rate.tokens_per_s()
        self._set(
            step=step,
            loss=self.losses.newest(),
            tokens_per_s=tokens_per_s,
            mfu=metrics.mfu(tokens_per_s / engine.ctx.dp_size),
            copy_interval=stats.interval if stats is not None else 0.0,
            metrics=metrics.snapshot(),
        )

    def _restore(self, engine: Any, sampler: Any, metrics: WorkerMetrics) -> None:
        t_load = time.perf_counter()
        reader = _reader(self.resume)
        glob = restore(engine, reader)
        metrics.checkpoint_loaded(time.perf_counter() - t_load)
        if glob.get("sampler"):
            sampler.load_state_dict(glob["sampler"])
        # The loss history of the steps this state has behind it (rolled-back steps are not
        # in it): a resumed or resized run reports one continuous history.
        history = ((reader.rank_state(0) or {}).get("client_state") or {}).get("losses")
        for a, b in history or []:
            self.losses.record(int(a), float(b))


def _host_budget(ctx: Any) -> int | None:
    """Host bytes this rank's state copies may take: half the memory available on its host
    now, shared by the ranks on that host (a one-time gather of host names)."""
    import torch.distributed as dist

    available = _mem_available()
    if available is None:
        return None
    name = socket.gethostname()
    names = [name]
    if dist.is_initialized() and dist.get_world_size() > 1:
        names = [""] * dist.get_world_size()
        dist.all_gather_object(names, name)
    return int(available * 0.5 / max(1, names.count(name)))


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


Resume = str | list[Any] | None  # a checkpoint dir, or in-memory RankShards (or refs to them)


def _check_finite(v: StepValues) -> None:
    """Stop on a non-finite loss or gradient norm, on every rank at the same step (the values
    are sums over ranks, the same everywhere): training on would spread it into the weights.
    Collective when it raises (the ranks learn which of them saw it)."""
    import torch.distributed as dist

    if math.isfinite(v.loss) and (v.grad_norm is None or math.isfinite(v.grad_norm)):
        return
    what, value = ("loss", v.loss) if not math.isfinite(v.loss) else ("gradient norm", v.grad_norm)
    mine = not math.isfinite(v.my_loss) if what == "loss" else False
    flags = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = [False] * dist.get_world_size()
        dist.all_gather_object(flags, mine)
    raise NonFiniteError(v.step, what, [r for r, bad in enumerate(flags) if bad], float(value))


def _reader(resume: Resume) -> Any:
    """A RangeReader over a checkpoint on disk or shards handed over in memory."""
    from zray.checkpoint.memory import MemoryReader
    from zray.checkpoint.reader import CheckpointReader

    if isinstance(resume, str):
        return CheckpointReader(resume)
    assert resume is not None
    shards: list[Any] = []
    for item in resume:  # shards, refs to shards, or a ref to the whole list
        item = _resolve(item)
        shards.extend(item if isinstance(item, list) else [item])
    return MemoryReader([s.unpack() if isinstance(s, PackedShard) else s for s in shards])


def _flops_and_peak(model: nn.Module, source: Any, engine: Any) -> tuple[float, float]:
    """Model FLOPs per token (6N + attention) and this device's dense peak TFLOP/s."""
    from zray.metrics.flops import device_peak_tflops, model_flops_per_token

    seq_len = 0
    if "input_ids" in getattr(source, "columns", []):
        seq_len = int(source.take([0])["input_ids"].shape[-1])
    try:
        fpt = float(model_flops_per_token(model, seq_len)) if seq_len else 0.0
    except ValueError:
        fpt = 0.0  # a model whose shape cannot be inferred: no MFU, the rest still published
    peak, _ = device_peak_tflops(engine.ctx.device, engine.compute_dtype)
    return fpt, peak


class _CountTokens:
    """Pass batches through, counting this rank's input tokens (for tokens/s)."""

    def __init__(self, it: Any) -> None:
        self.it, self.tokens = iter(it), 0

    def __iter__(self) -> _CountTokens:
        return self

    def __next__(self) -> Any:
        batch = next(self.it)
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        self.tokens += ids.numel() if isinstance(ids, torch.Tensor) else 0
        return batch

"""What a worker does: join the group, build the engine, resume, train, checkpoint, report.

It runs inside a Worker actor (zray/cluster/worker.py) but knows nothing of Ray: it can be
driven by any launcher that gives it a rank, a world size and a rendezvous address.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zray.checkpoint.engine_state import capture, restore
from zray.checkpoint.shard import RankShard
from zray.config import Config
from zray.entrypoint import load_entry
from zray.env import DistEnv
from zray.errors import ConfigError
from zray.initialize import initialize
from zray.metrics.worker import WorkerMetrics
from zray.parallel.context import init_distributed
from zray.zero import comm


@dataclass
class RunSpec:
    """Everything a worker needs to train; pickled to every worker."""

    config: dict[str, Any]  # Config.to_dict(): DeepSpeed keys plus the "zray" run section
    model: Callable[..., nn.Module] | str  # a factory, or "package.module:callable"
    data: Any  # anything zray.data.as_source accepts (or a Ray ObjectRef to it)
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    """A worker's progress, as polled by the controller."""

    rank: int
    pid: int
    node: str
    step: int = 0
    loss: float | None = None  # the global mean loss of the last logged step
    tokens_per_s: float = 0.0
    checkpoint_step: int | None = None
    phase: str = "starting"  # starting | training | checkpointing | done
    stage: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # see zray.metrics.worker


@dataclass
class RunOutcome:
    """Rank 0's return value when training completes."""

    steps: int
    losses: list[tuple[int, float]]
    tokens_per_s: float
    checkpoint: str | None
    world_size: int
    # A planned pause (a resize): every rank stopped after the same step and hands over its
    # state, which the next group restores from memory instead of disk.
    paused: bool = False
    handover: RankShard | None = None


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


class TrainLoop:
    def __init__(
        self,
        spec: RunSpec,
        rank: int,
        world: int,
        master_addr: str,
        master_port: int,
        resume: Resume,
        attempt: int = 0,
        on_snapshot: Callable[[int, RankShard], None] | None = None,
    ) -> None:
        self.spec, self.rank, self.world, self.attempt = spec, rank, world, attempt
        self.master_addr, self.master_port, self.resume = master_addr, master_port, resume
        self._report = Report(rank=rank, pid=os.getpid(), node=socket.gethostname())
        self._lock = threading.Lock()
        # A pause asked for by the controller; the ranks agree on the step (see run()).
        self._pause = threading.Event()
        # The last two in-memory snapshots of this rank's state, (step, shard), newest last:
        # with a peer's copy of the same steps they let a lost rank be rebuilt without disk.
        self.snapshots: deque[tuple[int, RankShard]] = deque(maxlen=2)
        self.on_snapshot = on_snapshot
        self.history: list[tuple[int, float]] = []  # (step, global mean loss) before resuming

    def request_pause(self) -> None:
        self._pause.set()

    def report(self) -> Report:
        with self._lock:
            return self._report

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._report = Report(**{**self._report.__dict__, **changes})

    def run(self) -> RunOutcome:
        from zray.checkpoint.async_saver import AsyncSaver
        from zray.checkpoint.writer import save_shard
        from zray.data.loader import RankBatches
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
        if self.resume:
            t_load = time.perf_counter()
            reader = _reader(self.resume)
            glob = restore(engine, reader)
            metrics.checkpoint_loaded(time.perf_counter() - t_load)
            if glob.get("sampler"):
                sampler.load_state_dict(glob["sampler"])
            # The loss history of the steps this state has behind it (rolled-back steps are
            # not in it): a resumed or resized run reports one continuous history.
            history = ((reader.rank_state(0) or {}).get("client_state") or {}).get("losses")
            self.history = [(int(a), float(b)) for a, b in history or []]
        batches = RankBatches(
            source,
            sampler,
            ctx.dp_rank,
            ctx.dp_size,
            b.micro_batch_per_gpu,
            b.gradient_accumulation_steps,
            ctx.device,
        )
        counted = _CountTokens(batches)
        max_steps = run.max_steps or 100
        root = run.checkpoint_dir
        saver = AsyncSaver() if run.async_checkpoint else None
        losses: list[tuple[int, float]] = list(self.history)
        last_ckpt: str | None = self.resume if isinstance(self.resume, str) else None
        t0 = time.perf_counter()
        self._set(phase="training", step=engine.global_steps, stage=engine.plan.stage)

        def checkpoint(step: int) -> str:
            self._set(phase="checkpointing")
            t_save = time.perf_counter()
            shard = capture(engine, sampler=batches.state_dict(), client_state=_hist(losses))
            nbytes = sum(
                t.numel() * t.element_size() for r in shard.ranges for t in r.tensors.values()
            )
            # The same id on every rank of this attempt: a step saved again after a restart
            # can never commit a mix of the old attempt's files and the new one's.
            save_id = f"attempt{self.attempt}-step{step}"
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
        while engine.global_steps < max_steps:
            tokens_before = counted.tokens
            local = engine.train_batch(counted, loss_fn=self.spec.loss)
            step = engine.global_steps
            now = time.perf_counter()
            # Host wall time between steps: on CUDA the host runs ahead of the device between
            # the syncs of logging steps, so single values jitter; their average is right.
            metrics.step(
                engine,
                now - t_step,
                counted.tokens - tokens_before,
                samples_per_step,
                batches.total_fetch_seconds,
            )
            t_step = now
            pause = False
            if step % run.log_interval == 0 or step == max_steps:
                # The global mean loss and the pause vote in one tiny all-reduce (and one host
                # sync) per logged step: every rank sees the same vote, so all stop together.
                total = torch.stack(
                    [
                        local.detach().float().reshape(()).cpu(),
                        torch.tensor(float(self._pause.is_set())),
                    ]
                )
                total = total.to(ctx.device)
                comm.all_reduce_sum(total, ctx.dp_group).wait()
                value, votes = float(total[0].item()) / ctx.dp_size, float(total[1].item())
                pause = votes > 0 and step < max_steps
                losses.append((step, value))
                rate = counted.tokens * ctx.dp_size / (time.perf_counter() - t0)
                metrics.logged(engine, value)
                self._set(step=step, loss=value, tokens_per_s=rate, metrics=metrics.snapshot())
            else:
                self._set(step=step, metrics=metrics.snapshot())
            if run.replica_interval and step % run.replica_interval == 0 and step < max_steps:
                self._snapshot(engine, batches, step, losses)
            if pause:
                self._set(phase="paused")
                return RunOutcome(
                    steps=step,
                    losses=losses,
                    tokens_per_s=0.0,
                    checkpoint=last_ckpt,
                    world_size=ctx.dp_size,
                    paused=True,
                    handover=capture(
                        engine, sampler=batches.state_dict(), client_state=_hist(losses)
                    ),
                )
            if (
                root
                and run.checkpoint_interval
                and step % run.checkpoint_interval == 0
                and step < max_steps
            ):
                last_ckpt = checkpoint(step)
        if root:
            last_ckpt = checkpoint(engine.global_steps)
        if saver is not None:
            saver.wait()
        self._set(phase="done")
        return RunOutcome(
            steps=engine.global_steps,
            losses=losses,
            tokens_per_s=counted.tokens * ctx.dp_size / max(time.perf_counter() - t0, 1e-9),
            checkpoint=last_ckpt,
            world_size=ctx.dp_size,
        )

    def _snapshot(
        self, engine: Any, batches: Any, step: int, losses: list[tuple[int, float]]
    ) -> None:
        """Keep this rank's state of `step` in host memory and send a copy to its peer."""
        shard = capture(engine, sampler=batches.state_dict(), client_state=_hist(losses))
        self.snapshots.append((step, shard))
        if self.on_snapshot is not None:
            self.on_snapshot(step, shard)


def _hist(losses: list[tuple[int, float]]) -> dict[str, Any]:
    return {"losses": [[s, v] for s, v in losses]}


Resume = str | list[Any] | None  # a checkpoint dir, or in-memory RankShards (or refs to them)


def _reader(resume: Resume) -> Any:
    """A RangeReader over a checkpoint on disk or shards handed over in memory."""
    from zray.checkpoint.memory import MemoryReader
    from zray.checkpoint.reader import CheckpointReader

    if isinstance(resume, str):
        return CheckpointReader(resume)
    assert resume is not None
    return MemoryReader([_resolve(s) for s in resume])


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

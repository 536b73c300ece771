"""The worker's training loop: engine, data, state, signals and reports, with no Ray in it.

A Ray Worker actor (zray/cluster/worker.py) runs one `Trainer` per GPU or CPU slot; so does
`python -m zray.launch --nproc N zray/trainer.py run.json` (or torchrun), with the rank and the
rendezvous from the launcher's variables. `Trainer.train` is the recipe; each step's helpers
below it say what they cost.

[Note: what the step's host does] Nothing on the step's path waits for the device: batches are
built ahead (zray.data.prefetch), the step's values travel in one small all-reduce read one step
late (zray.parallel.step_signals), state copies run on a side stream (zray.checkpoint.replica),
and the report the controller polls is refreshed every REPORT_EVERY_S. Host syncs happen only
when a checkpoint is saved, at a pause, and at the end (the signals are drained then).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
from typing import Any

import torch
from torch import nn

from zray.checkpoint.manager import CheckpointManager, Resume
from zray.checkpoint.replica import Send
from zray.checkpoint.shard import PackedShard
from zray.config import Config
from zray.entrypoint import load_entry
from zray.env import DistEnv, read_dist_env
from zray.errors import ConfigError, NonFiniteError
from zray.initialize import initialize
from zray.metrics.flops import device_peak_tflops, model_flops_per_token
from zray.metrics.progress import LossLog, RateWindow
from zray.metrics.worker import WorkerMetrics
from zray.parallel.context import init_distributed
from zray.parallel.step_signals import StepSignals, StepValues
from zray.run_records import Report, RunOutcome, RunSpec, WorkerPhase

log = logging.getLogger(__name__)

__all__ = ["Trainer", "build_model"]

# The report the controller polls (every zray.poll_interval_s) is refreshed this often: building
# it every step would cost a small model's step a noticeable share of its host time.
REPORT_EVERY_S = 0.1


class Trainer:
    """One rank's training. `send_copy` hands in-memory state copies to the rank's holder
    (zray.checkpoint.replica); None turns them off."""

    def __init__(
        self,
        spec: RunSpec,
        env: DistEnv,
        resume: Resume = None,
        attempt: int = 0,
        send_copy: Send | None = None,
        created: float | None = None,
    ) -> None:
        self.spec, self.env, self.attempt, self.resume = spec, env, attempt, resume
        self.rank, self.world = env.rank, env.world_size
        self.send_copy = send_copy
        self.cfg = Config.reread(spec.config)  # the driver showed its warnings
        self.max_steps = self.cfg.zray.max_steps or 100
        self.losses = LossLog()  # (step, global mean loss), the resumed history first
        self.steps_done = 0
        now = time.time()
        self._report = Report(
            rank=env.rank,
            pid=os.getpid(),
            node=socket.gethostname(),
            milestones={"process": created or now, "run": now},
        )
        self._lock = threading.Lock()
        # A pause asked for by the controller; the ranks agree on the step (StepSignals).
        self._pause = threading.Event()
        self.checkpoints: CheckpointManager | None = None

    # ---- what the actor's other threads call -------------------------------------------------

    def request_pause(self) -> None:
        self._pause.set()

    def report(self) -> Report:
        with self._lock:
            # The milestones copied: Ray pickles the report after the lock is released.
            r = self._report
            return Report(
                **{**r.__dict__, "steps_done": self.steps_done, "milestones": dict(r.milestones)}
            )

    def snapshots(self) -> list[tuple[int, PackedShard]]:
        """This rank's complete in-memory copies of its state (for recovery)."""
        return self.checkpoints.snapshots() if self.checkpoints is not None else []

    # ---- the recipe --------------------------------------------------------------------------

    def train(self) -> RunOutcome:
        try:
            self._setup()  # process group, model, engine, resume, data
            self._set(
                phase=WorkerPhase.TRAINING,
                step=self.engine.global_steps,
                stage=self.engine.plan.stage,
            )
            while self.engine.global_steps < self.max_steps:
                loss = self.engine.train_batch(self.batches, loss_fn=self.spec.loss)
                step = self._after_step(loss)  # read last step's values, vote, copy, report
                if self._pausing:
                    return self._hand_over(step)
                if self.checkpoints.due(step, self.max_steps):
                    self._save(step)
            return self._finish()
        finally:
            self.losses.close()
            if self.checkpoints is not None:
                self.checkpoints.close()
            if getattr(self, "data", None) is not None:
                self.data.close()

    # ---- the steps of the recipe -------------------------------------------------------------

    def _setup(self) -> None:
        from zray.data.collate import collate_for
        from zray.data.loader import RankBatches
        from zray.data.prefetch import Prefetcher
        from zray.data.sampler import GlobalBatchSampler
        from zray.data.sources import as_source

        run = self.cfg.zray
        device = torch.device("cuda", torch.cuda.current_device()) if run.use_gpu else None
        init_distributed(
            backend="nccl" if run.use_gpu else "gloo",
            timeout=run.collective_timeout_s,
            env=self.env,
            device=device if device is not None else "cpu",
        )
        self._milestone("rendezvous")
        torch.manual_seed(run.seed)
        model = build_model(self.spec, self.cfg)
        source = as_source(self.spec.data)
        # Counted on the whole model, before the engine slices or shards its tensors.
        flops_per_token = _flops_per_token(model, source)
        collate = collate_for(model, source.columns)
        self.engine, *_ = initialize(model=model, config=self.cfg)
        self._milestone("built")
        ctx, b = self.engine.ctx, self.engine.batch
        sampler = GlobalBatchSampler(len(source), b.train_batch_size, seed=run.seed)
        peak, _ = device_peak_tflops(ctx.device, self.engine.compute_dtype)
        # A tensor group shares each token's work: this device does 1/tp of it.
        self.metrics = WorkerMetrics(flops_per_token / ctx.tp_size, peak)
        self.checkpoints = CheckpointManager(
            self.engine,
            run,
            self.spec.run_id,
            self.attempt,
            self.losses,
            self.metrics,
            self.send_copy,
            _host_budget() if run.replica_interval and self.send_copy else None,
        )
        position = self.checkpoints.resume(self.resume)
        self._milestone("restored")
        if position:
            sampler.load_state_dict(position)
        rows = RankBatches(
            source, sampler, ctx.dp_rank, ctx.dp_size, b.micro_batch_per_gpu,
            b.gradient_accumulation_steps, "cpu", collate,
        )  # fmt: skip
        self.data = Prefetcher(rows, ctx.device)
        self.batches = _CountTokens(self.data)
        self.signals = StepSignals(ctx)
        self.rate = RateWindow(ctx.dp_size)
        self.step_times: list[tuple[int, float]] = []
        self._votes: StepValues | None = None  # the newest values read: they decide a step
        self._pausing = False
        self._t0 = self._t_step = time.perf_counter()
        self._tokens_before = 0
        self._last_report = 0.0
        self._samples_per_step = b.micro_batch_per_gpu * b.gradient_accumulation_steps

    def _after_step(self, loss: torch.Tensor) -> int:
        """Everything between two steps; no host sync unless a vote says so."""
        engine, checkpoints = self.engine, self.checkpoints
        assert checkpoints is not None
        self.steps_done += 1
        step = engine.global_steps
        now = time.perf_counter()
        tokens = self.batches.tokens
        self.metrics.step(
            step,
            now - self._t_step,
            tokens - self._tokens_before,
            self._samples_per_step,
            loss_scale=engine.loss_scale,
            skipped_steps=engine.skipped_steps,
            data_seconds_total=self.data.fetch_seconds,
            data_wait_seconds_total=self.data.wait_seconds,
        )
        self._t_step, self._tokens_before = now, tokens
        if self.steps_done == 1:
            self._milestone("first_step")
        # The values of step - lag (sums over all ranks): the votes they carry decide what
        # happens after this step, on every rank alike.
        lag = self.signals.lag
        self._read(self.signals.take(through=step - lag))
        votes = self._votes if self._votes is not None and self._votes.step == step - lag else None
        last = step >= self.max_steps
        self._pausing = votes is not None and votes.pause and not last
        if votes is not None and votes.copy_ready and not (self._pausing or last):
            checkpoints.copy(step, self.data.state_dict())
        ready = checkpoints.copy_ready(step + 1, self.rate.seconds_per_step())
        self.signals.push(step, loss, engine.last_grad_norm, self._pause.is_set(), ready)
        self.rate.add(now, tokens)
        if now - self._last_report >= REPORT_EVERY_S or self._pausing or step == self.max_steps:
            self._last_report = now
            self._report_progress(step)
        return step

    def _read(self, values: list[StepValues]) -> None:
        """Record the values read back: loss history, step times, votes; stop on a
        non-finite loss (fp16 skips such steps itself)."""
        now = time.perf_counter() - self._t0
        for v in values:
            self.step_times.append((v.step, now))
            keep = v.step % self.cfg.zray.log_interval == 0 or v.step == self.max_steps
            self.losses.record(v.step, v.loss, keep)
            self._votes = v
            if not self.engine.fp16_enabled():  # fp16's loss scaling skips such steps itself
                _check_finite(v, stop=not self.engine.skip_nonfinite)
        if values:
            self.metrics.logged(values[-1].loss, values[-1].grad_norm)

    def _save(self, step: int) -> None:
        assert self.checkpoints is not None
        self._read(self.signals.drain())  # the history through this step, checked finite
        self._set(phase=WorkerPhase.CHECKPOINTING)
        self.checkpoints.save(step, self.data.state_dict())
        self._set(phase=WorkerPhase.TRAINING, checkpoint_step=step, metrics=self.metrics.snapshot())

    def _hand_over(self, step: int) -> RunOutcome:
        assert self.checkpoints is not None
        self._read(self.signals.drain())
        self._set(phase=WorkerPhase.PAUSED, loss=self.losses.newest())
        return self._outcome(
            steps=step, tokens_per_s=0.0, paused=True,
            handover=self.checkpoints.handover(self.data.state_dict()),
        )  # fmt: skip

    def _finish(self) -> RunOutcome:
        assert self.checkpoints is not None
        self._read(self.signals.drain())
        if self.checkpoints.root:
            self._save(self.engine.global_steps)
        self.checkpoints.finish()
        self._report_progress(self.engine.global_steps)
        self._set(phase=WorkerPhase.DONE)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        return self._outcome(
            steps=self.engine.global_steps,
            tokens_per_s=self.batches.tokens * self.engine.ctx.dp_size / elapsed,
        )

    def _outcome(self, **kw: Any) -> RunOutcome:
        assert self.checkpoints is not None
        copies = self.checkpoints.copies
        return RunOutcome(
            losses=self.losses.items(),
            checkpoint=self.checkpoints.last,
            world_size=self.engine.ctx.world_size,  # workers: dp x tp
            step_times=self.step_times,
            copy_stats=copies.stats.as_dict() if copies is not None else {},
            **kw,
        )

    # ---- reports -----------------------------------------------------------------------------

    def _milestone(self, name: str) -> None:
        with self._lock:
            self._report.milestones[name] = time.time()

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._report = Report(**{**self._report.__dict__, **changes})

    def _report_progress(self, step: int) -> None:
        """Refresh what the controller polls (every REPORT_EVERY_S, not every step)."""
        assert self.checkpoints is not None
        ctx = self.engine.ctx
        self.metrics.sample(
            ctx.comm_stats, self.engine.memory_breakdown(), ctx.device if ctx.is_cuda else None
        )
        copies = self.checkpoints.copies
        if copies is not None:
            self.metrics.copies(copies.stats)
        tokens_per_s = self.rate.tokens_per_s()
        self._set(
            step=step,
            stage=self.engine.plan.stage,
            loss=self.losses.newest(),
            tokens_per_s=tokens_per_s,
            mfu=self.metrics.mfu(tokens_per_s / self.engine.ctx.dp_size),
            copy_interval=copies.stats.interval if copies is not None else 0.0,
            copy_step=copies.stats.newest_step if copies is not None else None,
            metrics=self.metrics.snapshot(),
        )


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


def _check_finite(v: StepValues, stop: bool) -> None:
    """On a non-finite loss or gradient norm: stop (`stop`), on every rank at the same step (the
    values are sums over ranks, the same everywhere), since training on would spread it into
    the weights; else warn: the engine skipped that update (zray.skip_nonfinite_steps or
    bf16.check_grad_overflow). Collective when the values are non-finite (the ranks learn which
    of them saw it)."""
    import torch.distributed as dist

    if math.isfinite(v.loss) and (v.grad_norm is None or math.isfinite(v.grad_norm)):
        return
    what, value = ("loss", v.loss) if not math.isfinite(v.loss) else ("gradient norm", v.grad_norm)
    mine = not math.isfinite(v.my_loss) if what == "loss" else False
    flags = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = [False] * dist.get_world_size()
        dist.all_gather_object(flags, mine)
    ranks = [r for r, bad in enumerate(flags) if bad]
    if stop:
        raise NonFiniteError(v.step, what, ranks, float(value))
    where = f"rank(s) {ranks}" if ranks else "the sum over ranks"
    log.warning("step %d: the %s is %s on %s; update skipped", v.step, what, value, where)


def _host_budget() -> int | None:
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


def _flops_per_token(model: nn.Module, source: Any) -> float:
    """Model FLOPs per token (6N + attention); 0 where the model's shape cannot be inferred
    (no MFU then; everything else is still published)."""
    seq_len = 0
    if "input_ids" in getattr(source, "columns", []):
        seq_len = int(source.take([0])["input_ids"].shape[-1])
    try:
        return float(model_flops_per_token(model, seq_len)) if seq_len else 0.0
    except ValueError:
        return 0.0


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


def main(argv: list[str] | None = None) -> int:
    """`python -m zray.launch --nproc N zray/trainer.py run.json`: the same training as
    `zray fit run.json`, one process per rank, without Ray (no recovery, no copies)."""
    args = sys.argv[1:] if argv is None else argv
    args = [a for a in args if not a.startswith("--local_rank")]
    if len(args) != 1:
        print("usage: python -m zray.launch --nproc N zray/trainer.py CONFIG", file=sys.stderr)
        return 2
    cfg = Config.load(args[0])
    if cfg.zray.model is None or cfg.zray.data is None:
        print(f"{args[0]}: zray.model and zray.data must be set", file=sys.stderr)
        return 2
    from zray.models.data import synthetic_table

    env = read_dist_env()
    spec = RunSpec(config=cfg.to_dict(), model=cfg.zray.model, data=synthetic_table(cfg.zray.data))
    trainer = Trainer(spec, env)
    outcome = trainer.train()
    if env.rank == 0:
        summary = {"steps": outcome.steps, "losses": outcome.losses}
        print(json.dumps({**summary, "step_times": outcome.step_times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

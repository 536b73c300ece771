"""The FLOPs profiler against torch.utils.flop_counter and hand counts; the step timer on CPU."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from zray.activation_checkpointing import apply_activation_checkpointing
from zray.metrics.profiler import ProfileReport, profile_step
from zray.metrics.timer import Phase, StepTimer
from zray.models.gpt import GPT, GPTConfig

V, T, L, H, D, B = 128, 32, 3, 2, 32, 2
CFG = GPTConfig(vocab_size=V, seq_len=T, n_layer=L, n_head=H, d_model=D)
TOKENS = B * T


def make() -> tuple[GPT, Callable[[], None]]:
    torch.manual_seed(0)
    model = GPT(CFG)
    ids = torch.randint(0, V, (B, T))

    def step() -> None:
        model(input_ids=ids, labels=ids).backward()

    return model, step


def children(report: ProfileReport, name: str) -> list[str]:
    prefix = f"{name}." if name else ""
    return [
        m.name
        for m in report.modules
        if m.name.startswith(prefix) and m.name and "." not in m.name[len(prefix) :]
    ]


def test_total_flops_equal_torch_flop_counter_for_the_same_step() -> None:
    model, step = make()
    report = profile_step(model, step)
    model.zero_grad()
    with FlopCounterMode(display=False) as counter:
        step()
    assert report.total_flops == counter.get_total_flops()
    # Not only the counter it is built on: the hand count (Linears only; CPU SDPA counts 0).
    assert report.total_flops == 6 * TOKENS * (L * 12 * D * D + D * V)
    assert report.flops_by_op == {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    # Everything ran inside the model (the loss is the model's own).
    assert report.module("").flops == report.total_flops
    assert report.flops_outside_model == 0


def test_module_flops_match_hand_counts_and_sum_up_the_hierarchy() -> None:
    model, step = make()
    report = profile_step(model, step)
    # Every Linear: 2 FLOPs per weight per token forward, 4 backward (input and weight grads).
    assert report.module("blocks.0.attn.qkv").flops == 6 * TOKENS * D * 3 * D
    assert report.module("blocks.2.mlp.proj").flops == 6 * TOKENS * 4 * D * D
    assert report.module("lm_head").flops == 6 * TOKENS * D * V
    for m in report.modules:
        kids = sum(report.module(c).flops for c in children(report, m.name))
        assert m.flops >= kids, m.name
        if m.type in ("GPT", "ModuleList", "Block", "MLP", "CausalSelfAttention"):
            # Their own code does only elementwise work (adds, views, CPU SDPA: count 0).
            assert m.flops == kids, m.name
        if m.type in ("Dropout", "LayerNorm", "Embedding", "GELU"):
            # FlopCounterMode's own tracker charges backward matmuls to Dropout(p=0) layers.
            assert m.flops == 0, m.name
    assert report.module("blocks").flops == L * 6 * TOKENS * 12 * D * D


def test_cpu_attention_counted_with_torch_flash_formulas_when_asked() -> None:
    model, step = make()
    plain = profile_step(model, step)
    model.zero_grad()
    counted = profile_step(model, step, count_cpu_attention=True)
    # torch's formulas: QK^T and AV forward = 4·B·T²·D per layer; backward 2.5x that (flash
    # backward recomputes QK^T: 5 matmuls), so 14·B·T²·D per layer where PaLM's count has 12.
    per_layer = 14 * B * T * T * D
    assert counted.total_flops - plain.total_flops == L * per_layer
    attn = counted.module("blocks.1.attn")
    linears = counted.module("blocks.1.attn.qkv").flops + counted.module("blocks.1.attn.proj").flops
    assert attn.flops - linears == per_layer


def test_flops_outside_the_model_are_counted_but_not_charged_to_it() -> None:
    model, _ = make()
    ids = torch.randint(0, V, (B, T))
    head = torch.randn(V, 1)  # no grad: backward computes only the logits' gradient

    def step() -> None:
        logits = model(input_ids=ids)  # [B, T, V]
        (logits.reshape(B * T, V) @ head).sum().backward()  # [B*T, V] @ [V, 1]

    report = profile_step(model, step)
    assert report.flops_outside_model == 2 * (2 * B * T * V)  # the mm forward and its backward
    assert report.module("").flops == report.total_flops - report.flops_outside_model


def test_activation_checkpointing_recompute_is_charged_to_the_blocks() -> None:
    model, step = make()
    base = profile_step(model, step)
    model.zero_grad()
    apply_activation_checkpointing(model, "blocks")
    again = profile_step(model, step)
    block_forward = 2 * TOKENS * 12 * D * D  # the recomputed Linear forwards of one block
    assert again.total_flops == base.total_flops + L * block_forward
    assert again.module("blocks.1").flops == base.module("blocks.1").flops + block_forward
    assert again.module("blocks.1.mlp.fc").flops == 8 * TOKENS * D * 4 * D  # 6 + 2 recomputed
    assert again.module("").flops == again.total_flops


def test_params_latency_and_the_table() -> None:
    model, step = make()
    profile_step(model, step)  # warm-up: first calls of kernels are not what we want timed
    model.zero_grad()
    report = profile_step(model, step)
    named = dict(model.named_modules())
    for m in report.modules:
        assert m.params == sum(p.numel() for p in named[m.name].parameters())
        assert m.depth == (0 if not m.name else m.name.count(".") + 1)
    root = report.module("")
    assert root.calls == 1 and report.module("blocks.2.attn.qkv").calls == 1
    assert 0 < root.forward_seconds <= report.step_seconds
    assert report.module("blocks.0").forward_seconds <= root.forward_seconds
    assert report.module("blocks").calls == 0  # a ModuleList has no forward

    table = report.table(depth=2)
    for i in range(L):
        assert f"{i} (Block)" in table
    assert "GPT (model)" in table and "lm_head (Linear)" in table
    assert "qkv (Linear)" not in table  # depth 4
    assert "qkv (Linear)" in report.table(depth=4)
    assert "(Block)" not in report.table(depth=0)
    header = next(line for line in table.splitlines() if line.startswith("module"))
    rows = [line for line in table.splitlines() if line.endswith("%") and line != header]
    # the model; tok_emb, pos_emb, drop, blocks; the L blocks; ln_f, lm_head
    assert len(rows) == 1 + 4 + L + 2
    assert {len(r) for r in rows} == {len(header)}  # aligned, right-justified columns

    d = report.as_dict()
    json.dumps(d)
    assert d["total_flops"] == report.total_flops
    assert [m["name"] for m in d["modules"]] == [name for name, _ in model.named_modules()]


def test_hooks_and_modes_are_removed_even_when_the_step_fails() -> None:
    model, _ = make()

    def boom() -> None:
        model(input_ids=torch.zeros(1, T + 1, dtype=torch.long))  # longer than seq_len

    with pytest.raises(ValueError, match=r"longer than GPTConfig\.seq_len"):
        profile_step(model, boom)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    with FlopCounterMode(display=False) as counter:  # no mode left behind on the stack
        model(input_ids=torch.zeros(1, T, dtype=torch.long))
    assert counter.get_total_flops() > 0


# ---- StepTimer ---------------------------------------------------------------------------------


class FakeClock:
    """The timer's clock, advanced only by `busy`: exact, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("zray.metrics.timer.time", fake)
    return fake


def test_timer_phases_sum_to_the_measured_total(clock: FakeClock) -> None:
    timer = StepTimer("cpu")
    start = clock.now
    for _ in range(3):
        with timer.phase(Phase.DATA):
            clock.now += 0.001
        with timer.phase(Phase.FORWARD):
            clock.now += 0.004
        clock.now += 0.0005  # between phases: charged to none
        with timer.phase(Phase.BACKWARD):
            clock.now += 0.006
        with timer.phase("optimizer"):
            clock.now += 0.002
    got = timer.summary()
    assert list(got) == ["data", "forward", "backward", "optimizer"]
    assert got == pytest.approx(
        {"data": 0.003, "forward": 0.012, "backward": 0.018, "optimizer": 0.006}
    )
    assert sum(got.values()) == pytest.approx(clock.now - start - 3 * 0.0005)


def test_timer_nested_phases_are_charged_their_self_time(clock: FakeClock) -> None:
    timer = StepTimer("cpu")
    with timer.phase(Phase.BACKWARD):
        clock.now += 0.005
        with timer.phase(Phase.COMMUNICATION):
            clock.now += 0.010
        clock.now += 0.005
    got = timer.summary()
    assert got["communication"] == pytest.approx(0.010)
    assert got["backward"] == pytest.approx(0.010)  # 20 ms span less the inner 10
    assert sum(got.values()) == pytest.approx(0.020)  # nothing counted twice


def busy(seconds: float) -> None:
    """Spin (not sleep) so the time is spent on this core, like compute."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_timer_records_a_phase_that_raises_and_refuses_reset_inside_a_phase() -> None:
    timer = StepTimer("cpu")
    with pytest.raises(KeyError), timer.phase("data"):
        busy(0.002)
        raise KeyError("no more batches")
    assert timer.summary()["data"] >= 0.002
    assert timer.open_phases == []
    with timer.phase("forward"):
        assert timer.open_phases == ["forward"]
        with pytest.raises(RuntimeError, match=r"inside open phase\(s\) \['forward'\]"):
            timer.reset()
    timer.reset()
    assert timer.summary() == {}


def test_disabled_timer_is_a_shared_no_op() -> None:
    timer = StepTimer("cpu", enabled=False)
    assert timer.phase("forward") is timer.phase("backward")
    with timer.phase("forward"):
        busy(0.001)
    assert timer.summary() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timer_uses_events_and_syncs_only_in_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2048, 2048, device="cuda")
    (x @ x).sum().item()  # warm-up: cuBLAS initialisation stays out of the phases
    syncs: list[str] = []
    real_event_sync = torch.cuda.Event.synchronize
    real_sync = torch.cuda.synchronize

    def event_sync(self: torch.cuda.Event) -> None:
        syncs.append("event")
        real_event_sync(self)

    def device_sync(device: object = None) -> None:
        syncs.append("device")
        real_sync(device)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.cuda.Event, "synchronize", event_sync)
    monkeypatch.setattr(torch.cuda, "synchronize", device_sync)
    timer = StepTimer("cuda")
    for _ in range(3):
        with timer.phase(Phase.FORWARD):
            y = x @ x
        with timer.phase(Phase.BACKWARD):
            y = y @ x @ x @ x
    assert syncs == []  # the hot path queued events only
    got = timer.summary()
    assert set(got) == {"forward", "backward"}
    assert 0 < got["forward"] < got["backward"]  # one matmul vs three
    assert "device" not in syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_profile_matches_the_counter_and_counts_attention() -> None:
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    ids = torch.randint(0, V, (B, T), device="cuda")

    def step() -> None:
        model(input_ids=ids, labels=ids).backward()

    step()  # warm-up: kernel selection and first-call costs stay out of the timings
    model.zero_grad()
    report = profile_step(model, step)
    model.zero_grad()
    with FlopCounterMode(display=False) as counter:
        step()
    assert report.total_flops == counter.get_total_flops()
    assert report.module("").flops == report.total_flops
    attn = report.module("blocks.0.attn")
    linears = report.module("blocks.0.attn.qkv").flops + report.module("blocks.0.attn.proj").flops
    # CUDA SDPA kernels have torch formulas: 14·B·T²·D per layer for the fused kernels
    # (backward recomputes QK^T), 12 if SDPA fell back to the math path's bmm ops.
    assert attn.flops - linears in (14 * B * T * T * D, 12 * B * T * T * D)
    assert 0 < report.module("blocks.0").forward_seconds < report.module("").forward_seconds

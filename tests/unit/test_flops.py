"""FLOPs per token, device peaks and MFU, checked against hand counts and torch's FLOP counter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from zray.metrics.flops import (
    ThroughputMeter,
    cpu_flops_per_cycle,
    device_peak_tflops,
    gpu_peak_tflops,
    infer_transformer_shape,
    model_flops_per_token,
    transformer_flops_per_token,
)
from zray.metrics.registry import BY_NAME
from zray.models.gpt import GPT, GPTConfig

# The test model, by its numbers: untied embeddings, biases, MLP ratio 4.
V, T, L, H, D = 256, 64, 2, 2, 64
CFG = GPTConfig(vocab_size=V, seq_len=T, n_layer=L, n_head=H, d_model=D)

# Hand count, from the numbers above only.
# One block: ln1 (2D) + qkv (D*3D + 3D) + attn proj (D*D + D) + ln2 (2D) + fc (D*4D + 4D)
# + mlp proj (4D*D + D).
BLOCK = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)
# N: blocks, ln_f (2D), lm_head (V*D, no bias); the tok (V*D) and pos (T*D) tables excluded.
N = L * BLOCK + 2 * D + V * D
HAND_FLOPS_PER_TOKEN = 6 * N + 12 * L * D * T
# The matmul weights alone (no biases, no norms): what torch's counter sees.
LINEAR_WEIGHTS = L * (12 * D * D) + V * D


def test_hand_count_numbers() -> None:
    assert N == 116_480  # 2 x 49,984 + 128 + 16,384
    assert HAND_FLOPS_PER_TOKEN == 797_184


def test_transformer_flops_per_token_is_6n_plus_12ldt() -> None:
    assert transformer_flops_per_token(N, L, D, T) == HAND_FLOPS_PER_TOKEN
    assert transformer_flops_per_token(1000, 0, 0, 0) == 6000
    with pytest.raises(ValueError, match="n_layer must be an int >= 0, got -1"):
        transformer_flops_per_token(N, -1, D, T)
    with pytest.raises(ValueError, match="seq_len"):
        transformer_flops_per_token(N, L, D, 64.0)  # type: ignore[arg-type]


def test_model_flops_per_token_uses_the_model_and_else_infers_the_same() -> None:
    model = GPT(CFG)
    assert model_flops_per_token(model, T) == HAND_FLOPS_PER_TOKEN

    class Uncounted(GPT):
        flops_per_token = None  # type: ignore[assignment]

    uncounted = Uncounted(CFG)
    assert infer_transformer_shape(uncounted) == (N, L, D)
    assert model_flops_per_token(uncounted, T) == HAND_FLOPS_PER_TOKEN
    # A tied output head is counted once, as the model's own count does.
    tied = CFG.with_(tie_embeddings=True)
    assert model_flops_per_token(Uncounted(tied), T) == model_flops_per_token(GPT(tied), T)


def test_model_flops_per_token_passes_seq_len_to_a_method_that_takes_it() -> None:
    class Counted(nn.Module):
        def flops_per_token(self, seq_len: int) -> int:
            return 7 * seq_len

    assert model_flops_per_token(Counted(), 10) == 70


def test_inference_names_what_it_cannot_find() -> None:
    with pytest.raises(ValueError, match=r"no non-empty nn\.ModuleList"):
        model_flops_per_token(nn.Linear(4, 4), 8)

    class NoLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.LayerNorm(4)])

    with pytest.raises(ValueError, match="cannot infer d_model of NoLinear"):
        model_flops_per_token(NoLinear(), 8)


def test_mfu_and_tflops_agree_with_a_hand_count() -> None:
    peak = 100.0  # TFLOP/s, a round known peak
    tokens, seconds = 8 * T, 0.25  # 8 sequences of 64 tokens in 250 ms
    meter = ThroughputMeter(model_flops_per_token(GPT(CFG), T), peak)
    got = meter.update(tokens, seconds)

    hand_tokens_per_s = 512 / 0.25  # 2048
    hand_tflops = 797_184 * hand_tokens_per_s / 1e12
    hand_mfu = hand_tflops / 100.0
    assert got.tokens_per_second == pytest.approx(
        hand_tokens_per_s, rel=1e-12
    )  # exact arithmetic: float rounding only
    assert got.tflops == pytest.approx(
        hand_tflops, rel=1e-12
    )  # exact arithmetic: float rounding only
    assert got.mfu == pytest.approx(hand_mfu, rel=1e-12)  # exact arithmetic: float rounding only


def test_meter_mean_over_steps_and_metric_names() -> None:
    meter = ThroughputMeter(1_000_000, 10.0)
    meter.update(1000, 1.0)
    last = meter.update(3000, 1.0)
    assert last.tokens_per_second == 3000
    assert meter.last == last
    assert meter.mean.tokens_per_second == 2000  # 4000 tokens / 2 s
    assert meter.mean.tflops == pytest.approx(2000 * 1e6 / 1e12)
    assert meter.mean.mfu == pytest.approx(2e-3 / 10)
    metrics = last.as_metrics()
    assert set(metrics) <= set(BY_NAME)
    assert metrics["zray_mfu_ratio"] == last.mfu


def test_meter_without_a_peak_publishes_nan_mfu_and_refuses_bad_input() -> None:
    meter = ThroughputMeter(1000, math.nan)
    got = meter.update(10, 1.0)
    assert got.tflops > 0 and math.isnan(got.mfu)
    with pytest.raises(ValueError, match="seconds > 0"):
        meter.update(10, 0.0)
    with pytest.raises(ValueError, match="flops_per_token must be > 0"):
        ThroughputMeter(0, 1.0)
    with pytest.raises(ValueError, match="peak_tflops must be > 0 or NaN"):
        ThroughputMeter(1, -1.0)


@pytest.mark.parametrize(
    ("name", "dtype", "tf32", "want"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.0),  # H100 SXM's torch name
        ("NVIDIA H200", torch.bfloat16, False, 989.0),
        ("NVIDIA H200", torch.float16, False, 989.0),
        ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.5),
        ("NVIDIA H100 80GB HBM3", torch.float32, False, 67.0),
        ("NVIDIA H100 PCIe", torch.bfloat16, False, 756.5),
        ("NVIDIA H100 NVL", torch.bfloat16, False, 835.5),
        ("NVIDIA H200 NVL", torch.bfloat16, False, 835.5),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312.0),
        ("NVIDIA A100 80GB PCIe", torch.float32, True, 156.0),
        ("NVIDIA A10G", torch.bfloat16, False, 70.0),
        ("NVIDIA A10", torch.bfloat16, False, 125.0),
        ("NVIDIA L40S", torch.bfloat16, False, 362.05),
        ("NVIDIA L4", torch.bfloat16, False, 121.0),
        ("Tesla V100-SXM2-16GB", torch.float16, False, 125.0),
        ("Tesla V100-SXM2-16GB", torch.float32, True, 15.7),  # no TF32: the fp32 figure
    ],
)
def test_gpu_names_map_to_dense_datasheet_peaks(
    name: str, dtype: torch.dtype, tf32: bool, want: float
) -> None:
    peak, how = gpu_peak_tflops(name, dtype, tf32=tf32)
    assert peak == want
    assert name in how and "dense" in how


def test_unknown_gpus_and_dtypes_get_nan_with_the_reason() -> None:
    peak, how = gpu_peak_tflops("NVIDIA GeForce GTX 1080", torch.bfloat16)
    assert math.isnan(peak) and "unknown device 'NVIDIA GeForce GTX 1080'" in how
    peak, how = gpu_peak_tflops("Tesla V100-SXM2-16GB", torch.bfloat16)
    assert math.isnan(peak) and "no dense figure for bf16" in how
    peak, how = device_peak_tflops(torch.device("meta"), torch.float32)
    assert math.isnan(peak) and "meta" in how


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_peak_is_a_positive_finite_number(dtype: torch.dtype) -> None:
    peak, how = device_peak_tflops(torch.device("cpu"), dtype)
    assert math.isfinite(peak) and peak > 0
    assert how.startswith("nominal CPU peak")
    # Bounded by what one process's cores could nominally do: <= 1024 FLOP/cycle at <= 6 GHz.
    assert peak <= torch.get_num_threads() * 6e9 * 1024 / 1e12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_this_gpu_is_in_the_peak_table() -> None:
    name = torch.cuda.get_device_name()
    peak, how = device_peak_tflops(torch.device("cuda"), torch.bfloat16)
    assert math.isfinite(peak) and peak > 0, how
    if "h100 80gb hbm3" in name.lower() or name.lower().endswith("h200"):
        assert peak == 989.0, how


def test_cpu_flops_per_cycle_follows_the_widest_isa() -> None:
    assert cpu_flops_per_cycle({"avx512f", "avx2", "fma"}, torch.float32) == (64, "AVX-512 FMA")
    assert cpu_flops_per_cycle({"avx2", "fma"}, torch.float32) == (32, "AVX2 FMA")
    assert cpu_flops_per_cycle({"sse2"}, torch.float32) == (8, "SSE")
    assert cpu_flops_per_cycle({"avx512f", "avx512_bf16"}, torch.bfloat16)[0] == 128
    assert cpu_flops_per_cycle({"avx512f", "amx_bf16"}, torch.bfloat16)[0] == 1024
    assert cpu_flops_per_cycle({"avx2", "fma"}, torch.bfloat16)[0] == 32  # computed in fp32


def test_6n_term_against_torch_flop_counter() -> None:
    """torch.utils.flop_counter over one forward + backward of the GPT, on CPU.

    The counter sees the matmuls only: each Linear's weight costs 2 FLOPs per token forward
    and 4 backward, so it counts exactly 6 x (matmul weights) x tokens. It does not see:
    - biases and LayerNorm weights, which 6N includes (elementwise work, not matmuls): the
      difference between 6N and the count, 6 x 1,792 x tokens here, 1.5%;
    - attention: CPU SDPA runs a kernel torch has no formula for (the profiler's
      count_cpu_attention adds it; see test_profiler), so 12·L·D·T is absent too;
    - embeddings (lookups, excluded from N as well) and the loss.
    """
    torch.manual_seed(0)
    model = GPT(CFG)
    B = 4
    ids = torch.randint(0, V, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).backward()
    counted = counter.get_total_flops()
    tokens = B * T

    assert counted == 6 * LINEAR_WEIGHTS * tokens
    six_n = 6 * N * tokens
    assert abs(six_n - counted) / counted < 0.03
    non_matmul = L * (3 * D + D + 4 * D + D + 2 * D + 2 * D) + 2 * D  # biases + LN, = 1,792
    assert six_n - counted == 6 * non_matmul * tokens

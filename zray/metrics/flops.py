"""Model FLOPs, device peaks and MFU: what `zray_device_tflops` and `zray_mfu_ratio` publish.

MFU = achieved model TFLOP/s / the device's dense peak TFLOP/s for the compute dtype, where
achieved = flops_per_token x tokens/s. "Model" FLOPs count the model's arithmetic once
(PaLM, appendix B): recomputation from activation checkpointing, optimizer arithmetic and
communication are overhead, not model FLOPs, so they lower MFU rather than raise it.

[Note: the peak table] One table, `_GPU_PEAKS`, holds every GPU figure. All figures are
*dense* tensor-core TFLOP/s from the vendor datasheets; the datasheets' headline numbers for
TF32 / FP16 / BF16 on Ampere and later are "with sparsity" (2:4 structured), twice the dense
rate, and are halved here. A GPU the table does not know gets NaN, never a guess: a NaN MFU
on a dashboard is visibly missing, a wrong one looks plausible. CPUs always get a number (a
nominal peak from cores x clock x FLOPs/cycle), so CPU runs show data on the dashboards.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# ---- the peak table --------------------------------------------------------------------------


@dataclass(frozen=True)
class GPUPeak:
    """Dense TFLOP/s of one GPU model; None where the GPU has no such unit (e.g. V100 bf16)."""

    name: str
    bf16: float | None
    fp16: float | None
    tf32: float | None  # tensor-core TF32, used for fp32 matmuls when torch allows TF32
    fp32: float  # plain FP32 (CUDA cores): fp32 matmuls at torch's "highest" precision
    source: str


# Order matters: the first pattern that matches the lower-cased device name wins, so the
# specific variants (H100 PCIe / NVL, H200 NVL, A10G, L40S) come before their families.
_GPU_PEAKS: tuple[tuple[str, GPUPeak], ...] = (
    # NVIDIA Blackwell datasheet, HGX B200 (8 GPUs): FP16/BF16 36 PF, TF32 18 PF with sparsity,
    # FP32 600 TF -> per GPU dense 2250 / 1125 / 75.
    (r"\bb200\b", GPUPeak("B200", 2250.0, 2250.0, 1125.0, 75.0, "HGX B200 datasheet / 8")),
    # GH200 datasheet: the Hopper GPU of H100 SXM (BF16 1979 with sparsity).
    (r"\bgh200\b", GPUPeak("GH200", 989.0, 989.0, 494.5, 67.0, "GH200 datasheet")),
    # H200 datasheet: NVL BF16/FP16 1671, TF32 835 with sparsity; FP32 60.
    (r"\bh200\b.*\bnvl\b", GPUPeak("H200 NVL", 835.5, 835.5, 417.5, 60.0, "H200 datasheet")),
    # H200 datasheet: SXM BF16/FP16 1979, TF32 989 with sparsity; FP32 67. Same compute as H100 SXM.
    (r"\bh200\b", GPUPeak("H200 SXM", 989.0, 989.0, 494.5, 67.0, "H200 datasheet")),
    # H100 datasheet: NVL BF16/FP16 1671, TF32 835 with sparsity; FP32 60.
    (r"\bh100\b.*\bnvl\b", GPUPeak("H100 NVL", 835.5, 835.5, 417.5, 60.0, "H100 datasheet")),
    # H100 datasheet: PCIe BF16/FP16 1513, TF32 756 with sparsity; FP32 51.
    (r"\bh100\b.*\bpcie\b", GPUPeak("H100 PCIe", 756.5, 756.5, 378.0, 51.0, "H100 datasheet")),
    # H100 datasheet: SXM5 BF16/FP16 1979 (989.4 dense, quoted as 989), TF32 989 with sparsity;
    # FP32 67. torch names it "NVIDIA H100 80GB HBM3".
    (r"\bh100\b", GPUPeak("H100 SXM", 989.0, 989.0, 494.5, 67.0, "H100 datasheet")),
    # A100 datasheet (40/80 GB, SXM4 and PCIe alike): BF16/FP16 312, TF32 156 dense; FP32 19.5.
    (r"\ba100\b", GPUPeak("A100", 312.0, 312.0, 156.0, 19.5, "A100 datasheet")),
    # A10G (AWS G5) has no NVIDIA datasheet; AWS's figures as compiled by Baseten ("NVIDIA A10 vs
    # A10G for ML model inference"): BF16/FP16 70, TF32 35, FP32 35 dense.
    (r"\ba10g\b", GPUPeak("A10G", 70.0, 70.0, 35.0, 35.0, "AWS G5 figures (Baseten)")),
    # A10 datasheet: BF16/FP16 125, TF32 62.5 dense (250 / 125 with sparsity); FP32 31.2.
    (r"\ba10\b", GPUPeak("A10", 125.0, 125.0, 62.5, 31.2, "A10 datasheet")),
    # L40S datasheet: BF16/FP16 362.05 (733 with sparsity), TF32 183 (366); FP32 91.6.
    (r"\bl40s\b", GPUPeak("L40S", 362.05, 362.05, 183.0, 91.6, "L40S datasheet")),
    # L40 datasheet: BF16/FP16 181.05 (362.1 with sparsity), TF32 90.5 (181); FP32 90.5.
    (r"\bl40\b", GPUPeak("L40", 181.05, 181.05, 90.5, 90.5, "L40 datasheet")),
    # L4 datasheet: BF16/FP16 242, TF32 120 with sparsity; FP32 30.3.
    (r"\bl4\b", GPUPeak("L4", 121.0, 121.0, 60.0, 30.3, "L4 datasheet")),
    # V100 datasheet: FP16 tensor 112 (PCIe) / 125 (SXM2); FP32 14 / 15.7; no BF16, no TF32.
    (r"\bv100\b.*\bpcie\b", GPUPeak("V100 PCIe", None, 112.0, None, 14.0, "V100 datasheet")),
    (r"\bv100\b", GPUPeak("V100 SXM2", None, 125.0, None, 15.7, "V100 datasheet")),
    # T4 datasheet: FP16 tensor 65; FP32 8.1; no BF16, no TF32.
    (r"\bt4\b", GPUPeak("T4", None, 65.0, None, 8.1, "T4 datasheet")),
)


def gpu_peak_tflops(
    device_name: str, dtype: torch.dtype, *, tf32: bool = False
) -> tuple[float, str]:
    """Dense peak TFLOP/s of the GPU called `device_name` (torch.cuda.get_device_name) for
    matmuls in `dtype`, and how it was determined. `tf32`: fp32 matmuls run on TF32 tensor
    cores. NaN with the reason when the GPU or the dtype has no figure."""
    lowered = device_name.lower()
    peak = next((p for pattern, p in _GPU_PEAKS if re.search(pattern, lowered)), None)
    if peak is None:
        return math.nan, f"unknown device {device_name!r}: no entry in zray's peak table"
    if dtype == torch.bfloat16:
        value, unit = peak.bf16, "bf16 tensor cores"
    elif dtype == torch.float16:
        value, unit = peak.fp16, "fp16 tensor cores"
    elif dtype == torch.float32 and tf32 and peak.tf32 is not None:
        value, unit = peak.tf32, "tf32 tensor cores (fp32 matmuls allowed to use TF32)"
    elif dtype == torch.float32:
        value, unit = peak.fp32, "fp32 (no TF32)"
    else:
        value, unit = None, str(dtype)
    if value is None:
        return math.nan, f"{peak.name} ({device_name!r}): no dense figure for {unit}"
    return value, f"{peak.name} ({device_name!r}) {unit}: {value:g} TFLOP/s dense, {peak.source}"


# ---- CPU: a nominal peak -----------------------------------------------------------------------

# When no clock can be read (no cpufreq in most VMs, no "cpu MHz" off x86): a typical
# server all-core clock. Stated in the "how" string whenever it is used.
_FALLBACK_GHZ = 2.5


def cpu_flops_per_cycle(flags: Iterable[str], dtype: torch.dtype) -> tuple[int, str]:
    """Nominal FLOPs per cycle per core for `dtype` from /proc/cpuinfo flags, and the ISA.

    An FMA is 2 FLOPs; server cores have 2 vector FMA units, so AVX-512: 2 x 16 fp32 lanes x 2
    = 64, AVX2: 2 x 8 x 2 = 32; without FMA, 8 (SSE: 4 lanes, an add and a mul per cycle).
    bf16/fp16 get their own units' rate where the CPU has them (AVX512_BF16 / AVX512_FP16 dot
    products: 2 x the fp32 rate; AMX tiles: Intel quotes 1024 bf16/fp16 FLOPs/cycle/core),
    else the fp32 rate, since oneDNN then computes in fp32. Upper bounds: some parts have one
    FMA unit, and AVX-512 clocks lower than the base clock.
    """
    f = set(flags)
    if "avx512f" in f:
        fp32 = (64, "AVX-512 FMA")
    elif "avx2" in f and "fma" in f:
        fp32 = (32, "AVX2 FMA")
    else:
        fp32 = (8, "SSE")
    if dtype == torch.bfloat16:
        if "amx_bf16" in f:
            return 1024, "AMX-BF16"
        if "avx512_bf16" in f:
            return 128, "AVX512_BF16"
    if dtype == torch.float16:
        if "amx_fp16" in f:
            return 1024, "AMX-FP16"
        if "avx512_fp16" in f:
            return 128, "AVX512_FP16"
    return fp32


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _process_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask, which containers and
    taskset narrow; os.cpu_count() would count the whole host)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _physical_cores(cpus: list[int]) -> int:
    """Physical cores among `cpus`: SMT siblings share one core's FMA units, so counting
    hyperthreads would double the peak. Falls back to the logical count."""
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


def _cpu_ghz(cpuinfo: str, cpu: int) -> tuple[float, str]:
    """The core's maximum clock: cpufreq's cpuinfo_max_freq (kHz), else the highest "cpu MHz"
    in /proc/cpuinfo (the current clock; VMs report the nominal one), else a constant."""
    try:
        khz = int(Path(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq").read_text())
        return khz / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)]
    if mhz and max(mhz) > 0:
        return max(mhz) / 1e3, "/proc/cpuinfo cpu MHz"
    return _FALLBACK_GHZ, "no clock readable; assumed"


def cpu_peak_tflops(dtype: torch.dtype) -> tuple[float, str]:
    """Nominal peak of the cores this process computes on: cores x GHz x FLOPs/cycle.

    Cores = physical cores in the affinity mask, capped by torch.get_num_threads() (the
    intra-op threads that actually run matmuls: a Ray actor with num_cpus=1 gets 1 thread
    on a many-core host, and its MFU must not be divided by the whole host). Always a
    positive finite number: every input has a stated fallback.
    """
    cpuinfo = _cpuinfo()
    cpus = _process_cpus()
    physical = _physical_cores(cpus)
    threads = torch.get_num_threads()
    cores = max(1, min(physical, threads))
    ghz, clock_source = _cpu_ghz(cpuinfo, cpus[0] if cpus else 0)
    flags_line = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    flags = flags_line.group(1).split() if flags_line else []
    per_cycle, isa = cpu_flops_per_cycle(flags, dtype)
    peak = cores * ghz * 1e9 * per_cycle / 1e12
    how = (
        f"nominal CPU peak: {cores} cores (physical cores in affinity: {physical}, torch "
        f"threads: {threads}) x {ghz:.3g} GHz ({clock_source}) x {per_cycle} FLOP/cycle "
        f"({isa}, {dtype})"
    )
    return peak, how


def device_peak_tflops(
    device: torch.device, dtype: torch.dtype, *, tf32: bool | None = None
) -> tuple[float, str]:
    """(dense peak TFLOP/s, how it was determined) for matmuls in `dtype` on `device`.

    CUDA: the peak table, matched on torch.cuda.get_device_name; NaN for a GPU it lacks.
    CPU: the nominal peak of `cpu_peak_tflops`, always finite. `tf32=None` reads torch's
    setting: fp32 matmuls use TF32 unless torch.get_float32_matmul_precision() is "highest".
    """
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_peak_tflops(dtype)
    if device.type == "cuda":
        if tf32 is None:
            tf32 = torch.get_float32_matmul_precision() != "highest"
        return gpu_peak_tflops(torch.cuda.get_device_name(device), dtype, tf32=tf32)
    return math.nan, f"unknown device {device}: no peak for device type {device.type!r}"


# ---- model FLOPs -------------------------------------------------------------------------------


def transformer_flops_per_token(
    n_params_non_embedding: int, n_layer: int, d_model: int, seq_len: int
) -> int:
    """Training FLOPs per token, forward + backward: 6N + 12·L·D·T (PaLM, appendix B).

    6N: every weight does one multiply-add (2 FLOPs) per token in forward and two in backward
    (gradients of the input and of the weight). 12·L·D·T: attention's QK^T and AV matmuls,
    2·2·T·D per layer per token forward, x3 for forward + backward. Left out: softmax,
    norms, activations, residual adds and the loss (O(D) per token, not O(D^2)); the causal
    mask's skipped half (not subtracted, as PaLM and nanoGPT do, so MFUs compare); recomputed
    activations. N includes biases and norm weights although they do no matmul work (a
    ~1% overcount for small D, vanishing as D grows).

    Against torch.utils.flop_counter (and so `zray.metrics.profiler`): the counter sees only
    matmul weights (6 x weights, no biases or norms) and charges the fused attention kernels
    14·L·D·T, not 12, because its flash / cuDNN backward formula includes recomputing QK^T.
    On zray's GPT-125M shape (4 layers, T=1024, H100, bf16) it counted 445.7M FLOPs per token
    where this formula gives 439.7M (+1.4%).
    """
    for name, value in (
        ("n_params_non_embedding", n_params_non_embedding),
        ("n_layer", n_layer),
        ("d_model", d_model),
        ("seq_len", seq_len),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"transformer_flops_per_token: {name} must be an int >= 0, got {value!r}"
            )
    return 6 * n_params_non_embedding + 12 * n_layer * d_model * seq_len


def _outermost_module_list(model: nn.Module) -> nn.ModuleList | None:
    """The ModuleList nearest the root (breadth-first): the stack of transformer blocks."""
    frontier = [model]
    while frontier:
        for m in frontier:
            if isinstance(m, nn.ModuleList):
                return m
        frontier = [child for m in frontier for child in m.children()]
    return None


def infer_transformer_shape(model: nn.Module) -> tuple[int, int, int]:
    """(N, L, D) of a transformer, inferred from its modules, for `model_flops_per_token`.

    N: unique parameters, less those held only by nn.Embedding modules (lookups do no matmul;
    a token embedding tied to a Linear output head stays counted, once). L: the length of the
    outermost nn.ModuleList (the block stack). D: the in_features of the first nn.Linear in
    the first block (the q/k/v or fused qkv projection reads the residual stream, width D).
    A heuristic for decoder stacks in the nanoGPT / Hugging Face shape; raises ValueError
    naming what it could not find.
    """
    in_embedding: set[int] = set()
    elsewhere: set[int] = set()  # held by some other module too (e.g. a tied output head)
    for m in model.modules():
        owners = in_embedding if isinstance(m, nn.Embedding) else elsewhere
        owners.update(id(p) for p in m.parameters(recurse=False))
    n = sum(
        p.numel() for p in model.parameters() if id(p) not in in_embedding or id(p) in elsewhere
    )
    blocks = _outermost_module_list(model)
    if blocks is None or len(blocks) == 0:
        raise ValueError(
            f"model_flops_per_token: cannot infer the number of layers of "
            f"{type(model).__name__}: it has no non-empty nn.ModuleList of blocks; give the "
            "model a flops_per_token() method"
        )
    first_linear = next((m for m in blocks[0].modules() if isinstance(m, nn.Linear)), None)
    if first_linear is None:
        raise ValueError(
            f"model_flops_per_token: cannot infer d_model of {type(model).__name__}: its first "
            f"block ({type(blocks[0]).__name__}) has no nn.Linear; give the model a "
            "flops_per_token() method"
        )
    return n, len(blocks), first_linear.in_features


def model_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token of `model` at sequence length `seq_len`.

    The model's own `flops_per_token()` when it has one (called with `seq_len` if it takes an
    argument; zray's GPT takes none and counts at its configured seq_len), else 6N + 12·L·D·T
    with N, L, D from `infer_transformer_shape`. Call it on the unwrapped model, before the
    engine shards it: parameter counts come from the tensors' numel.
    """
    own = getattr(model, "flops_per_token", None)
    if callable(own):
        takes_arg = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            for p in inspect.signature(own).parameters.values()
        )
        return int(own(seq_len) if takes_arg else own())
    n, n_layer, d_model = infer_transformer_shape(model)
    return transformer_flops_per_token(n, n_layer, d_model, seq_len)


# ---- throughput and MFU ------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """One measurement: this device's tokens/s, model TFLOP/s and MFU (NaN if no peak)."""

    tokens_per_second: float
    tflops: float
    mfu: float

    def as_metrics(self) -> dict[str, float]:
        """Values keyed by their registry names (zray.metrics.registry)."""
        return {
            "zray_tokens_per_second": self.tokens_per_second,
            "zray_device_tflops": self.tflops,
            "zray_mfu_ratio": self.mfu,
        }


class ThroughputMeter:
    """Turns (tokens, seconds) per step into tokens/s, TFLOP/s per device and MFU.

    Feed it this rank's tokens (micro-batch x accumulation steps x T) and the step's wall
    time; `last` is the latest step, `mean` the whole run (total tokens / total seconds).
    """

    def __init__(self, flops_per_token: int, peak_tflops: float) -> None:
        if flops_per_token <= 0:
            raise ValueError(
                f"ThroughputMeter: flops_per_token must be > 0, got {flops_per_token!r}"
            )
        if not (math.isnan(peak_tflops) or peak_tflops > 0):
            raise ValueError(
                f"ThroughputMeter: peak_tflops must be > 0 or NaN, got {peak_tflops!r}"
            )
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._last = self._measure(0, 0.0)

    @classmethod
    def for_model(
        cls, model: nn.Module, seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[ThroughputMeter, str]:
        """A meter for `model` on `device` computing in `dtype`, and how the peak was found."""
        peak, how = device_peak_tflops(device, dtype)
        return cls(model_flops_per_token(model, seq_len), peak), how

    def _measure(self, tokens: int, seconds: float) -> Throughput:
        tps = tokens / seconds if seconds > 0 else 0.0
        tflops = self.flops_per_token * tps / 1e12
        return Throughput(tps, tflops, tflops / self.peak_tflops)

    def update(self, tokens: int, seconds: float) -> Throughput:
        """Record one step of `tokens` tokens taking `seconds`; returns that step's figures."""
        if tokens < 0 or not seconds > 0:
            raise ValueError(
                f"ThroughputMeter.update: need tokens >= 0 and seconds > 0, got "
                f"tokens={tokens!r}, seconds={seconds!r}"
            )
        self.total_tokens += tokens
        self.total_seconds += seconds
        self._last = self._measure(tokens, seconds)
        return self._last

    @property
    def last(self) -> Throughput:
        return self._last

    @property
    def mean(self) -> Throughput:
        return self._measure(self.total_tokens, self.total_seconds)

"""GPT training throughput: zray's ZeRO stages side by side with DDP, FSDP2 and DeepSpeed.

One model definition (zray.models.gpt.GPT; default ~1.34B parameters: d_model 2048, 24 layers,
16 heads, sequence 2048, vocabulary 32768, untied embeddings), one optimizer (torch AdamW,
fused kernel, lr 3e-4, betas (0.9, 0.95), weight decay 0.1, global-norm clipping at 1.0), the
same synthetic batches on every engine (a learnable Markov language, micro-batch 8 per GPU), bf16
compute. Per engine, in its own process group:

    torchrun --nproc_per_node 2 benchmarks/gpt_throughput.py --engine zray3 --out run/zray3.json
    python benchmarks/gpt_throughput.py --table run/         # the table and the checks

Engines: zray0..zray3 (zray.initialize, bf16 params, fp32 master, fused AdamW on the shard);
ddp (fp32 params, bf16 autocast, DistributedDataParallel); plain (the same loop on one GPU,
no wrapper); fsdp2 (fully_shard per block and the root, bf16 params, fp32 reduce); ds1..ds3
(DeepSpeed, bf16, "torch_adam": true plus "fused": true so it steps with the same torch kernel
and no op has to compile). benchmarks/run_gpt_throughput.sh runs them all.

Timing: `--warmup` steps, then `--steps` steps between two device synchronisations; the step
time is their mean (no host sync inside the timed steps: losses are read afterwards). Peak
memory is torch.cuda.max_memory_allocated from the first training step on (states and
activations; the build of the fp32 model before the engine takes it is not counted). FLOPs per
token are 6N + 12 L D T (PaLM's count, N without the position table), MFU against 989 TFLOP/s
(H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zray.models.data import lm_batch, synthetic_tokens
from zray.models.gpt import GPT, GPTConfig

PEAK_TFLOPS = 989.0  # dense bf16, H100 / H200 SXM datasheet
ENGINES = ("plain", "ddp", "fsdp2", "zray0", "zray1", "zray2", "zray3", "ds1", "ds2", "ds3")
Batch = dict[str, torch.Tensor]
StepFn = Callable[[Batch], torch.Tensor]


def model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(
        vocab_size=args.vocab,
        seq_len=args.seq,
        n_layer=args.layers,
        n_head=args.heads,
        d_model=args.d_model,
        bias=not args.no_bias,
        tie_embeddings=args.tie,
    )


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights for every engine
    with torch.device(device):
        if args.hf == "llama":
            return hf_llama(args)
        return GPT(model_config(args))


def hf_llama(args: argparse.Namespace) -> torch.nn.Module:
    """A Hugging Face Llama of the same size class (MLP width 8/3 D rounded to 64, so a layer has
    ~12 D^2 weights like the GPT's), built from its config: random weights, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = -(-(8 * args.d_model // 3) // 64) * 64
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=args.tie,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def flops_and_params(args: argparse.Namespace) -> tuple[int, int]:
    """(training FLOPs per token, parameters): 6 N + 12 L D T with N the matmul weights."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        if not args.hf:
            meta = GPT(model_config(args))
            return meta.flops_per_token(), meta.num_params()
        model = build_model(args, torch.device("meta"))
    total = sum(p.numel() for p in model.parameters())
    lookup = 0 if args.tie else model.get_input_embeddings().weight.numel()
    attention = 12 * args.layers * args.d_model * args.seq
    return 6 * (total - lookup) + attention, total


def _loss(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.loss  # HF models return an output


def tp_config(args: argparse.Namespace, key: str) -> dict[str, Any]:
    return {"tensor_parallel": {key: args.tp}} if args.tp > 1 else {}


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each block's forward (the engines' hooks stay on the module, outside)."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def adamw_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"lr": args.lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


# ---- engines: each returns a function that runs one full training step and returns the loss ----


def torch_engine(args: argparse.Namespace, device: torch.device, kind: str) -> StepFn:
    """plain / ddp / fsdp2: a plain PyTorch loop, wrapped as its users wrap it."""
    model = build_model(args, device)
    if kind == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        reduce = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.fsdp_reduce_dtype]
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
        if args.compile:
            compile_blocks(model)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        autocast: Any = nullcontext()
        net: torch.nn.Module = model
    else:
        if args.compile:
            compile_blocks(model)
        net = model
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            net = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), fused=True, **adamw_kwargs(args))

    def step(batch: Batch) -> torch.Tensor:
        with autocast:
            loss = _loss(net(**batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def ds_style_config(
    args: argparse.Namespace, optimizer_params: dict[str, Any], zero: dict[str, Any], tp_key: str
) -> dict[str, Any]:
    """The one DeepSpeed-format config both zray and DeepSpeed read (bf16, no accumulation)."""
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": args.clip,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        **tp_config(args, tp_key),
    }


def engine_step(engine: Any) -> StepFn:
    """A DeepSpeed-shaped engine's step (zray's and DeepSpeed's are called alike)."""

    def step(batch: Batch) -> torch.Tensor:
        loss = _loss(engine(**batch))
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def zray_engine(args: argparse.Namespace, device: torch.device, stage: int) -> StepFn:
    import zray

    model = build_model(args, device)
    if args.compile:
        compile_blocks(model)
    zero = {"stage": stage, **json.loads(args.zray_zero or "{}")}
    config = ds_style_config(args, adamw_kwargs(args), zero, "tp_size")
    engine, *_ = zray.initialize(model=model, config=config)
    step = engine_step(engine)
    # Stage 3's peer-copy staging slots live outside torch's caching allocator: count them in
    # the peak (NCCL's own buffers, which no engine's peak counts, are left out for all alike).
    step.unmanaged_bytes = engine.memory_breakdown().get("comm", 0)  # type: ignore[attr-defined]
    return step


def deepspeed_engine(args: argparse.Namespace, device: torch.device, stage: int) -> StepFn:
    import deepspeed

    model = build_model(args, device)
    if args.compile:
        compile_blocks(model)
    params = {**adamw_kwargs(args), "torch_adam": True, "fused": True}
    # "autotp_size" turns on DeepSpeed AutoTP (training mode) when --tp > 1.
    config = ds_style_config(args, params, {"stage": stage}, "autotp_size")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    return engine_step(engine)


def make_engine(args: argparse.Namespace, device: torch.device) -> StepFn:
    e = args.engine
    if e in ("plain", "ddp", "fsdp2"):
        return torch_engine(args, device, e)
    if e.startswith("zray"):
        return zray_engine(args, device, int(e[4:]))
    return deepspeed_engine(args, device, int(e[2:]))


# ---- the measurement -------------------------------------------------------------------------


def batches(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> list[Batch]:
    """Step s gives rank r samples [(s * world + r) * B, ...): the same data for every engine."""
    n = args.warmup + args.steps
    b = args.micro_batch
    toks = synthetic_tokens(n * world * b, args.seq, args.vocab, seed=1)
    out = []
    for s in range(n):
        lo = (s * world + rank) * b
        out.append({k: v.to(device) for k, v in lm_batch(toks[lo : lo + b]).items()})
    return out


def profile_steps(
    step: StepFn, data: list[Batch], rank: int, rows: int = 18, by_op: bool = False
) -> None:
    """Profile a few more steps; rank 0 prints where the GPU time went (not in the timing).

    `by_op`: also record the CPU-side operators and print the GPU time under each (which op
    launched the elementwise kernels that share one kernel name)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if by_op else [])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in data:
            step(batch)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if rank != 0:
        return
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    total = sum(e.self_device_time_total for e in kernels) / 1e6
    print(f"profile: {len(data)} steps, wall {wall:.3f} s, kernel time {total:.3f} s", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=rows), flush=True)
    if by_op:
        ops = sorted(
            (e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
            key=lambda e: -e.self_device_time_total,
        )
        print("GPU time launched directly by each operator (ms per step, calls per step):")
        for e in ops[:rows]:
            ms = e.self_device_time_total / 1e3 / len(data)
            print(f"  {ms:8.2f}  {e.count / len(data):6.1f}  {e.key}", flush=True)


def _frame_key(frames: list[dict[str, Any]]) -> str:
    """The innermost frame in the engines' or the model's own code (not torch's internals)."""
    own = ("zray/", "benchmarks/", "fsdp/", "deepspeed/", "torch/autograd/", "torch/nn/")
    for f in frames:
        if any(k in f["filename"] for k in own):
            tail = "/".join(f["filename"].split("/")[-2:])
            return f"{tail}:{f['line']} {f['name']}"
    return "(no python frame)"


def memory_at_peak(step: StepFn, data: list[Batch], rank: int, device: torch.device) -> None:
    """More steps under the allocator's history: rank 0 prints what is live at their peak.

    Memory allocated before the window (weights, optimizer states) is one line; the window's
    own allocations live at the peak are grouped by the innermost frame of engine or model
    code. The allocator's own maximum over the window is printed beside the replayed one (they
    agree when the replay is right).
    """
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    for batch in data:
        step(batch)
    torch.cuda.synchronize()
    report_peak(rank, device, base, f"{len(data)} more steps")


def report_peak(rank: int, device: torch.device, base: int, what: str) -> None:
    """Stop recording; rank 0 replays the trace and prints what is live at its peak."""
    window_max = torch.cuda.max_memory_allocated(device)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    if rank != 0:
        return
    live: dict[int, dict[str, Any]] = {}
    cur = peak = base
    old = old_at_peak = base  # bytes from before the recording still allocated
    at_peak: dict[int, dict[str, Any]] = {}
    events = snap["device_traces"][device.index]
    where = 0
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
        elif e["action"] == "free_completed":
            if live.pop(e["addr"], None) is None:
                old -= e["size"]
            cur -= e["size"]
        else:
            continue
        if cur > peak:
            peak, at_peak, old_at_peak, where = cur, dict(live), old, i
    groups: dict[str, int] = {}
    for e in at_peak.values():
        key = _frame_key(e.get("frames", []))
        groups[key] = groups.get(key, 0) + e["size"]
    gb = 2**30
    print(
        f"memory over {what}: allocator max {window_max / gb:.2f} GB, replayed peak "
        f"{peak / gb:.2f} GB at event {where} of {len(events)}; of it {old_at_peak / gb:.2f} GB "
        f"allocated before the recording ({base / gb:.2f} GB at its start)",
        flush=True,
    )
    for key, size in sorted(groups.items(), key=lambda kv: -kv[1])[:18]:
        print(f"  {size / gb:6.3f} GB  {key}", flush=True)


def set_attention_backend(name: str) -> None:
    """--sdpa: make one torch SDPA backend the only fused one (math stays as the fallback)."""
    if name == "default":
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = args.device == "cuda"
    # --device cpu (gloo) only checks the script itself on a machine without GPUs.
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        set_attention_backend(args.sdpa)
    if world > 1 or args.engine in ("ddp", "fsdp2") or args.engine.startswith("ds"):
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if args.engine == "plain" and world != 1:
        raise SystemExit("--engine plain is the one-GPU loop: run it with one process")
    if args.tp > 1 and (world % args.tp or not (args.engine.startswith(("zray", "ds")))):
        raise SystemExit("--tp needs a zray or ds engine and a world size it divides")
    flops_per_token, n_params = flops_and_params(args)
    # Ranks are tp-contiguous in both engines: a tensor group shares one data rank's batch.
    data = batches(args, rank // args.tp, world // args.tp, device)
    if args.memory_trace and cuda:  # the whole run under the allocator's history (slow)
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=4_000_000)
    t_init = time.perf_counter()
    step = make_engine(args, device)
    init_s = time.perf_counter() - t_init

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.gc == "off":
        gc.disable()
    unmanaged = getattr(step, "unmanaged_bytes", 0)  # read before --gc collect wraps the step
    if args.gc == "collect":  # diagnosis: are tensors held by reference cycles until a GC?
        inner = step

        def step(batch: Batch) -> torch.Tensor:
            out = inner(batch)
            gc.collect()
            return out

    losses = [step(data[i]) for i in range(args.warmup)]
    sync()
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        losses.append(step(data[i]))
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    peak_bytes = torch.cuda.max_memory_allocated(device) if cuda else 0
    peak_bytes += unmanaged
    if args.memory_trace and cuda:
        report_peak(rank, device, 0, "the whole run (timing slowed by the recording)")
    if args.profile and cuda:
        profile_steps(step, data[: args.warmup], rank, args.profile_rows, args.profile_ops)
    if args.memory_peak and cuda:
        memory_at_peak(step, data[: args.warmup], rank, device)
    loss_t = torch.stack([x.float().reshape(()) for x in losses])
    if dist.is_initialized():
        dist.all_reduce(loss_t)
        loss_t /= world
    peak = torch.tensor([peak_bytes], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens = args.micro_batch * args.seq // args.tp  # a tensor group shares one micro-batch
    tflops = flops_per_token * tokens / step_s / 1e12
    row = {
        "engine": args.engine,
        "tag": args.tag,
        "world": world,
        "tp": args.tp,
        "model": args.hf or "gpt",
        "compile": bool(args.compile),
        "sdpa": args.sdpa,
        "params": n_params,
        "flops_per_token": flops_per_token,
        "tokens_per_step_per_gpu": tokens,
        "init_s": init_s,
        "step_s": step_s,
        "tokens_per_s_per_gpu": tokens / step_s,
        "tflops_per_gpu": tflops,
        "mfu": tflops / PEAK_TFLOPS,
        "peak_gb": float(peak.item()) / 2**30,
        "losses": [float(x) for x in loss_t.tolist()],
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "args": vars(args),
    }
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return row


# ---- the table and the checks ----------------------------------------------------------------


def load_rows(paths: list[str]) -> list[dict[str, Any]]:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return [json.loads(f.read_text()) for f in files]


def table(rows: list[dict[str, Any]]) -> str:
    head = "| engine | GPUs | step s | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GB | loss first -> last |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['engine']}{' ' + r['tag'] if r.get('tag') else ''} | {_mesh(r)} | "
            f"{r['step_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.0f} | "
            f"{100 * r['mfu']:.1f}% | {r['peak_gb']:.1f} | "
            f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |"
        )
    return "\n".join(lines)


def _mesh(r: dict[str, Any]) -> str:
    tp = r.get("tp", 1)
    return f"{r['world']}" if tp == 1 else f"{r['world']} (dp{r['world'] // tp} x tp{tp})"


def checks(rows: list[dict[str, Any]], loss_rtol: float) -> list[tuple[str, bool, str]]:
    """The issue's bars, each as (what, passed, the numbers). Missing engines are skipped."""
    # Tagged rows are variants (other settings): reported in the table, not held to the bars.
    multi = {r["engine"]: r for r in rows if r["world"] > 1 and not r.get("tag")}
    multi = {
        e: r for e, r in multi.items() if r.get("tp", 1) == 1 and r.get("model") in (None, "gpt")
    }
    one = {r["engine"]: r for r in rows if r["world"] == 1 and not r.get("tag")}
    out: list[tuple[str, bool, str]] = []

    def speed(a: str, b: str, bar: float, pool: dict[str, dict[str, Any]]) -> None:
        if a in pool and b in pool:
            ratio = pool[a]["tokens_per_s_per_gpu"] / pool[b]["tokens_per_s_per_gpu"]
            out.append((f"{a} >= {bar:g}x {b} tokens/s", ratio >= bar, f"{ratio:.3f}x"))

    speed("zray3", "fsdp2", 1.05, multi)
    if "zray3" in multi and "fsdp2" in multi:
        a, b = multi["zray3"]["peak_gb"], multi["fsdp2"]["peak_gb"]
        out.append(("zray3 peak memory <= fsdp2", a <= b, f"{a:.1f} vs {b:.1f} GB"))
    speed("zray1", "ds1", 1.05, multi)
    speed("zray2", "ds2", 1.05, multi)
    speed("zray3", "ds3", 1.0, multi)
    speed("zray0", "ddp", 1.0, multi)
    for e in ("zray0", "zray1", "zray2", "zray3"):
        if e in multi:
            m = multi[e]["mfu"]
            out.append((f"{e} MFU >= 55%", m >= 0.55, f"{100 * m:.1f}%"))
    if "zray0" in one and "plain" in one:
        ratio = one["zray0"]["tokens_per_s_per_gpu"] / one["plain"]["tokens_per_s_per_gpu"]
        out.append(("1 GPU: zray0 within 2% of plain (or faster)", ratio >= 0.98, f"{ratio:.3f}x"))
    if "ddp" in multi:
        ref = multi["ddp"]["losses"]
        for e in ("zray0", "zray1", "zray2", "zray3"):
            if e in multi:
                got = multi[e]["losses"]
                rel = abs(got[-1] - ref[-1]) / abs(ref[-1])
                out.append(
                    (
                        f"{e} last loss = ddp's within {loss_rtol:g}",
                        rel <= loss_rtol,
                        f"{got[-1]:.4f} vs {ref[-1]:.4f} (rel {rel:.1e})",
                    )
                )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", choices=ENGINES)
    p.add_argument("--table", nargs="*", help="JSON files or folders: print the table and checks")
    p.add_argument("--out", default="")
    p.add_argument("--tag", default="", help="names a variant run (kept out of the checks)")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--tp", type=int, default=1, help="tensor slicing degree (zray, ds AutoTP)")
    p.add_argument("--hf", default="", choices=["", "llama"], help="a Hugging Face model instead")
    p.add_argument("--tie", action="store_true", help="tie the embedding and the output layer")
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # zray.launch
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels")
    p.add_argument("--profile-rows", type=int, default=18, help="kernels --profile prints")
    p.add_argument(
        "--profile-ops", action="store_true", help="--profile also by operator (CPU side)"
    )
    p.add_argument("--memory-peak", action="store_true", help="print what is live at the peak")
    p.add_argument("--gc", default="default", choices=["default", "collect", "off"])
    p.add_argument("--memory-trace", action="store_true", help="--memory-peak over the whole run")
    p.add_argument("--sdpa", default="default", choices=["default", "flash", "efficient", "cudnn"])
    p.add_argument("--compile", action="store_true", help="torch.compile each block (all engines)")
    p.add_argument("--zray-zero", default="", help="extra zero_optimization keys for zray, JSON")
    p.add_argument(
        "--fsdp-reduce-dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="FSDP2's gradient reduce dtype (bf16: like-for-like with zray's and DeepSpeed's)",
    )
    # bf16 rounding differs between the engines' precision schemes (autocast over fp32 weights
    # vs bf16 weights with fp32 masters): ~1e-3 relative on the loss after a few steps.
    p.add_argument("--loss-rtol", type=float, default=1e-2)
    args = p.parse_args()
    if args.table is not None:
        rows = load_rows(args.table)
        order = {e: i for i, e in enumerate(ENGINES)}
        rows.sort(key=lambda r: (r["world"], order.get(r["engine"], 99)))
        print(table(rows))
        results = checks(rows, args.loss_rtol)
        for what, ok, numbers in results:
            print(f"{'PASS' if ok else 'MISS'}  {what}: {numbers}")
        return
    if not args.engine:
        p.error("--engine or --table is required")
    row = measure(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in row.items() if k != "args"}), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(row, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

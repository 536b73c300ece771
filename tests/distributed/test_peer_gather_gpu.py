"""Stage 3's peer-copy gather on 2 GPUs: bitwise equal to NCCL's all-gather, and to its engine.

Skipped without 2 CUDA devices (CI has none); run on the GPU machine with
`pytest tests/distributed/test_peer_gather_gpu.py` (results: benchmarks/RESULTS.md).

- Many gathers of shards larger than a piece, queued back to back with no wait between them
  (so staging slots are reused while peers may still be reading), each compared bitwise with
  NCCL's all-gather of the same shards: the copies and the bf16 cast must be exact.
- zray stage 3, bf16, 4 steps, with `stage3_gather` "peer_copy" and "nccl" from the same
  weights and data, deterministic kernels: every loss and every final parameter bitwise equal
  (the gathers are exact, and everything else runs the same kernels in the same order).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (run on the GPU machine)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gathers(rank: int) -> None:
    from zray.zero.peer_gather import PeerGather

    dev = torch.device("cuda", rank)
    group = dist.group.WORLD
    assert group is not None
    # Shards of several sizes, most above the piece size (1000 elements), 2 slots.
    sizes = [2500, 999, 1000, 4096, 1, 3333] * 4
    gather = PeerGather.create(group, dev, torch.bfloat16, max(sizes), piece=1000, slots=2)
    g = torch.Generator(device=dev).manual_seed(rank)
    shards = [torch.randn(n, device=dev, generator=g, dtype=torch.float32) for n in sizes]
    fulls = [torch.empty(2 * n, device=dev, dtype=torch.bfloat16) for n in sizes]
    pending = [gather.all_gather(f, s) for f, s in zip(fulls, shards, strict=True)]
    for p in pending:
        p.wait()
    for n, shard, full in zip(sizes, shards, fulls, strict=True):
        want = torch.empty(2 * n, device=dev, dtype=torch.bfloat16)
        dist.all_gather_into_tensor(want, shard.to(torch.bfloat16))
        assert torch.equal(full, want), n


def _engine_run(rank: int, mode: str) -> dict[str, Any]:
    import zray
    from zray.models.gpt import GPT, GPTConfig

    dev = torch.device("cuda", rank)
    # Bitwise comparison: deterministic kernels only (the math attention, no atomics).
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, seq_len=64, n_layer=4, n_head=4, d_model=256)).to(dev)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {
            "stage": 3,
            "stage3_gather": mode,
            "stage3_param_persistence_threshold": 1000,
        },
    }
    engine, *_ = zray.initialize(model=model, config=cfg)
    assert (engine.zero.peer_gather is not None) == (mode == "peer_copy")
    g = torch.Generator().manual_seed(1 + rank)
    losses = []
    for _ in range(4):
        ids = torch.randint(0, 512, (4, 64), generator=g).to(dev)
        loss = engine(input_ids=ids, labels=ids)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    state = engine.consolidated_state_dict()
    return {"losses": torch.stack(losses).cpu(), "state": state}


def _worker(rank: int, port: int, out: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    try:
        _gathers(rank)
        runs = {mode: _engine_run(rank, mode) for mode in ("peer_copy", "nccl")}
        a, b = runs["peer_copy"], runs["nccl"]
        assert torch.equal(a["losses"], b["losses"]), (a["losses"], b["losses"])
        for k, v in a["state"].items():
            assert torch.equal(v, b["state"][k]), k
        if rank == 0:
            out["ok"] = True
    finally:
        dist.destroy_process_group()


def test_peer_gather_matches_nccl() -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        assert out.get("ok")

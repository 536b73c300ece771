"""How much a collective running beside compute slows that compute, per transport, on one node.

    torchrun --standalone --nproc_per_node 2 benchmarks/comm_contention.py

ZeRO-3 overlaps its all-gathers and reduce-scatters with the blocks' matrix multiplies. NCCL's
kernels take SMs from those GEMMs while they run; copies between GPUs through symmetric memory
(cudaMemcpy over NVLink: the copy engines) take none, and a reduce-scatter then needs only a
local add. This measures, for one transformer-sized GEMM loop on every rank:
- the GEMMs alone, each transport alone, and both at once (GEMM slowdown, transfer rate);
transports: NCCL all-gather, NCCL reduce-scatter, copy-engine all-gather, copy-engine
reduce-scatter (push to the peers, then a local sum). Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import torch.distributed as dist


def timed(
    fn: Callable[[int], None], count: int, stream: torch.cuda.Stream
) -> tuple[torch.cuda.Event, ...]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        fn(count)
        end.record()
    return start, end


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=100, help="collective output size, MB")
    p.add_argument("--gemms", type=int, default=60)
    p.add_argument("--colls", type=int, default=20, help="collectives timed alone")
    a = p.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    rank, world = dist.get_rank(), dist.get_world_size()

    x = torch.randn(16384, 2048, device=dev, dtype=torch.bfloat16)
    w = torch.randn(2048, 8192, device=dev, dtype=torch.bfloat16)
    gemm_flops = 2 * 16384 * 2048 * 8192

    def gemms(k: int) -> None:
        for _ in range(k):
            torch.mm(x, w)

    n = a.mb * 2**20 // 2  # bf16 elements of the gathered / reduced tensor
    n -= n % world
    full = torch.empty(n, device=dev, dtype=torch.bfloat16)
    shard = torch.randn(n // world, device=dev, dtype=torch.bfloat16)
    grads = torch.randn(n, device=dev, dtype=torch.bfloat16)

    def nccl_ag(k: int) -> None:
        for _ in range(k):
            dist.all_gather_into_tensor(full, shard)

    def nccl_rs(k: int) -> None:
        for _ in range(k):
            dist.reduce_scatter_tensor(shard, grads)

    transports: dict[str, Callable[[int], None]] = {
        "nccl all-gather": nccl_ag,
        "nccl reduce-scatter": nccl_rs,
    }
    try:
        import torch.distributed._symmetric_memory as symm_mem

        sbuf = symm_mem.empty(n, dtype=torch.bfloat16, device=dev)
        hdl = symm_mem.rendezvous(sbuf, dist.group.WORLD)
        c = n // world

        def ce_ag(k: int) -> None:
            # Each rank's shard sits in its symmetric buffer at offset rank * c; peers pull it.
            for _ in range(k):
                hdl.barrier()  # every shard written
                for r in range(world):
                    src = hdl.get_buffer(r, (c,), torch.bfloat16, r * c)
                    full[r * c : (r + 1) * c].copy_(src)
                hdl.barrier()  # every peer done reading before anyone rewrites its shard

        def ce_rs(k: int) -> None:
            # Push chunk r of my gradients into rank r's buffer, slot `rank`; then sum locally.
            for _ in range(k):
                hdl.barrier()
                for r in range(world):
                    dst = hdl.get_buffer(r, (c,), torch.bfloat16, rank * c)
                    dst.copy_(grads[r * c : (r + 1) * c])
                hdl.barrier()
                torch.sum(sbuf.view(world, c), dim=0, out=shard)

        transports["copy-engine all-gather"] = ce_ag
        transports["copy-engine reduce-scatter"] = ce_rs
    except Exception as e:  # report why the copy-engine path is missing
        if rank == 0:
            print(f"symmetric memory unavailable: {type(e).__name__}: {e}")

    main_s = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    gemms(3)  # warm-up: cuBLAS heuristics, NCCL channels, symmetric-memory mappings
    for fn in transports.values():
        timed(fn, 2, side)
    torch.cuda.synchronize()
    dist.barrier()

    g0, g1 = timed(gemms, a.gemms, main_s)
    torch.cuda.synchronize()
    gemm_alone = g0.elapsed_time(g1) / a.gemms
    rows = [
        f"GEMM 16384x2048x8192 bf16 alone: {gemm_alone:.3f} ms "
        f"({gemm_flops / gemm_alone / 1e9:.0f} TFLOP/s)"
    ]
    for name, fn in transports.items():
        dist.barrier()
        torch.cuda.synchronize()
        c0, c1 = timed(fn, a.colls, side)
        torch.cuda.synchronize()
        alone = c0.elapsed_time(c1) / a.colls
        # Enough collectives to cover the whole GEMM loop (the same count on every rank).
        need = torch.tensor([gemm_alone * a.gemms / alone], device=dev)
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
        k = int(need.item()) + 1
        dist.barrier()
        torch.cuda.synchronize()
        c0, c1 = timed(fn, k, side)
        g0, g1 = timed(gemms, a.gemms, main_s)
        torch.cuda.synchronize()
        both = c0.elapsed_time(c1) / k
        gemm = g0.elapsed_time(g1) / a.gemms
        gb = n * 2 * (world - 1) / world / 1e9
        rows.append(
            f"{name:28s} alone {alone:7.3f} ms ({gb / alone * 1e3:5.0f} GB/s)  "
            f"beside GEMMs {both:7.3f} ms   GEMM {gemm:.3f} ms "
            f"({100 * (gemm / gemm_alone - 1):+.1f}%)"
        )
    if rank == 0:
        print(
            f"{torch.cuda.get_device_name()} x{world}, {a.mb} MB per collective, "
            f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
        )
        print("\n".join(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Stage-3 parameter all-gather by peer copies over NVLink (the copy engines), not NCCL kernels.

ZeRO-3 overlaps each block's all-gather with the previous block's matrix multiplies. NCCL's
all-gather runs as kernels that hold SMs for the whole transfer, and the GEMMs beside it slow
down (measured on 2 x H200, `benchmarks/comm_contention.py`: +19% per 100 MB gather, vs +7% for
the same bytes moved by peer copies). Here each rank casts its shard into a staging slot of
symmetric memory (memory every peer has mapped), all ranks meet at a device-side barrier, and
every rank copies the peers' slots into its own `full` buffer with cudaMemcpyAsync: on a
CUDA-IPC mapping that is a DMA on the copy engines, and only the cast and the barrier take SMs.

[Note: staging slots and the one barrier per piece]
A unit's shard is moved in pieces of at most `piece` elements through `slots` staging slots
used round robin, all on one side stream. Piece k: write my slot k % slots, barrier, copy every
rank's slot k % slots into `full`. Rank r rewrites that slot at piece k + slots only after
passing the barrier of piece k + 1, which a peer reaches only after its copies of piece k are
done (same stream, in order); so with slots >= 2 one barrier per piece is enough. Every rank
issues the same gathers in the same order, as with NCCL.

Needs CUDA, PyTorch's symmetric memory, and every rank of the group on one host with peer
access; `PeerGather.create` raises PeerGatherUnavailable on every rank where that fails. Compute waits for a gather through a CUDA event, like a NCCL work's wait: no host sync.
"""

from __future__ import annotations

import socket
from typing import Any

import torch
import torch.distributed as dist

from zray.parallel.comm_stats import CommStats

PIECE = 16 * 2**20  # elements per piece: 32 MiB of bf16 per slot
# A peer that never reaches the barrier (dead, or diverged) traps the kernel after this long, so
# the worker fails as on a NCCL timeout and the controller can restart it, instead of spinning
# forever (zray's default collective timeout).
BARRIER_TIMEOUT_MS = 300_000


class PeerGatherUnavailable(RuntimeError):
    """This group cannot gather by peer copies (the reason is the message)."""


def _agree(why: str, group: dist.ProcessGroup, device: torch.device) -> None:
    """Raise on every rank if any rank failed (why != ""), naming this rank's reason."""
    failed = torch.tensor([1 if why else 0], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if failed.item():
        raise PeerGatherUnavailable(why or "a peer rank could not set up symmetric memory")


class EventPending:
    """A gather in flight on the side stream: waiting orders the current stream after it."""

    def __init__(self, event: torch.cuda.Event, keep: tuple[torch.Tensor, ...]) -> None:
        self.event: torch.cuda.Event | None = event
        self.keep = keep

    def wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
            self.event = None
        self.keep = ()


class PeerGather:
    def __init__(
        self,
        handle: Any,
        buf: torch.Tensor,
        piece: int,
        slots: int,
        stats: CommStats | None,
    ) -> None:
        self.handle, self.buf, self.piece, self.slots = handle, buf, piece, slots
        self.rank, self.world = handle.rank, handle.world_size
        self.stream = torch.cuda.Stream(buf.device)
        self.stats = stats
        self._next = 0  # the next slot, round robin

    @classmethod
    def create(
        cls,
        group: dist.ProcessGroup,
        device: torch.device,
        dtype: torch.dtype,
        largest_shard: int,
        stats: CommStats | None = None,
        piece: int = PIECE,
        slots: int = 2,
    ) -> PeerGather:
        """Set up the staging slots; collective over `group` (every rank must call it).

        Raises PeerGatherUnavailable on every rank alike when any rank cannot take part, so that
        no rank gathers by peer copies while another waits in NCCL.
        """
        if device.type != "cuda":
            raise PeerGatherUnavailable("it needs CUDA devices")
        world = dist.get_world_size(group)
        hosts: list[str] = [""] * world
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        if len(set(hosts)) > 1:
            raise PeerGatherUnavailable(f"it needs one host; the group spans {len(set(hosts))}")
        piece = max(1, min(piece, largest_shard))
        buf, handle, why = None, None, ""
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(slots * piece, dtype=dtype, device=device)
        except Exception as e:  # reported below, on every rank
            why = f"{type(e).__name__}: {e}"
        _agree(why, group, device)
        try:
            handle = symm_mem.rendezvous(buf, group)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
        _agree(why, group, device)
        assert buf is not None
        return cls(handle, buf, piece, slots, stats)

    def all_gather(self, full: torch.Tensor, master: torch.Tensor) -> EventPending:
        """full[world * S] = every rank's shard; this rank's is `master` [S] (the fp32 master or
        the stage-3 shard, on the device), cast into full's dtype on the way."""
        shard = master.numel()
        assert full.numel() == shard * self.world and full.dtype == self.buf.dtype
        if self.stats is not None:
            self.stats.launched("all_gather", full[:shard])
        self.stream.wait_stream(torch.cuda.current_stream(full.device))
        with torch.cuda.stream(self.stream):
            for lo in range(0, shard, self.piece):
                n = min(self.piece, shard - lo)
                off = self._next * self.piece
                self._next = (self._next + 1) % self.slots
                self.buf[off : off + n].copy_(master[lo : lo + n])  # the cast: an SM kernel
                self.handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
                for r in range(self.world):
                    src = self.handle.get_buffer(r, (n,), self.buf.dtype, off)
                    full[r * shard + lo : r * shard + lo + n].copy_(src)  # DMA over NVLink
            done = torch.cuda.Event()
            done.record()
        return EventPending(done, (full, master))

"""Counters of one process's collectives: calls, bytes and the seconds the host waited.

They live in the `ParallelContext` (below everything that communicates), so the ZeRO
collectives (zray.zero.comm), the step's signals and the metrics all count into one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CommStats:
    """Per collective kind: calls, bytes this rank put in, and seconds the host waited.

    The wait time is what the step lost to communication that did not overlap: on gloo the
    whole collective when waited on; on NCCL `wait()` only orders streams, so it is ~0 there and
    GPU-side time needs the step timer's CUDA events.
    """

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def launched(self, kind: str, t: torch.Tensor) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + t.numel() * t.element_size()

    def waited(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds

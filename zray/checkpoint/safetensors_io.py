"""A streaming safetensors writer: tensors go to disk one at a time, hashed on the way.

safetensors.torch.save_file builds the whole file in memory (a second copy of the data). The
format is simple enough to write directly: 8-byte little-endian header length, a JSON header
{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}} padded with
spaces to a multiple of 8 bytes, then the tensors' raw little-endian bytes back to back, in
header order. Peak extra memory is one tensor (the one being produced), and none for tensors
that are already contiguous CPU tensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from zray.checkpoint.atomic_stream import open_atomic
from zray.checkpoint.format import CheckpointWriteError

# torch dtype -> safetensors dtype name.
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

# The header is padded so that tensor data starts 8-byte aligned (mmap'ed reads of fp64/int64).
_HEADER_ALIGN = 8


@dataclass(frozen=True)
class TensorSpec:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def dtype_name(dtype: torch.dtype, what: str) -> str:
    """The safetensors name of `dtype`; `what` names the tensor in the error."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        allowed = ", ".join(str(d) for d in _DTYPE_NAMES)
        raise ValueError(f"{what}: dtype {dtype} cannot be saved; allowed: {allowed}") from None


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for s in specs:
        if s.key in header:
            raise ValueError(f"tensor key {s.key!r} appears twice in one safetensors file")
        header[s.key] = {
            "dtype": dtype_name(s.dtype, s.key),
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> tuple[str, int]:
    """Write `tensors` (yielded in `specs` order, each matching its spec) atomically to `path`.

    `tensors` may be a generator that builds each tensor on demand: it is consumed one at a
    time, so a consolidation holds one parameter at once. Returns (sha256 hex, file bytes).
    """
    # safetensors data is little-endian; torch's in-memory layout is the host's.
    assert sys.byteorder == "little", "writing safetensors needs a little-endian host"
    head = _header(specs, metadata or {})
    try:
        return _write(path, specs, tensors, head)
    except CheckpointWriteError:
        raise
    except OSError as e:  # ENOSPC, EROFS, EDQUOT...: name the file and the bytes
        wanted = len(head) + sum(s.nbytes for s in specs)
        raise CheckpointWriteError(str(path), "writing", wanted, e) from None


def _write(
    path: Path, specs: list[TensorSpec], tensors: Iterable[torch.Tensor], head: bytes
) -> tuple[str, int]:
    h = hashlib.sha256()
    h.update(head)
    total = len(head)
    with open_atomic(path) as f:
        f.write(head)
        it = iter(tensors)
        for spec in specs:
            t = next(it, None)
            if t is None:
                raise ValueError(f"{path}: tensor {spec.key!r} was never produced")
            if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
                raise ValueError(
                    f"{path}: tensor {spec.key!r} is {t.dtype} {tuple(t.shape)}; its header "
                    f"entry says {spec.dtype} {spec.shape}"
                )
            # Raw bytes without a copy for contiguous CPU tensors (uint8 view; works for bf16,
            # which numpy lacks).
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            h.update(data)
            total += spec.nbytes
        if next(it, None) is not None:
            raise ValueError(f"{path}: more tensors produced than the header lists")
    return h.hexdigest(), total

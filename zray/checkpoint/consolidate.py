"""Offline tools on a saved checkpoint: one full state_dict, and a summary for people.

`consolidate` writes {name: tensor of the parameter's shape} of the master weights (or another
saved key) to one file, tied parameters under each of their names (so the file loads into the
model with `load_state_dict(strict=True)`: in torch format as one tensor under both names, in
safetensors, which cannot share storage, as a copy). In safetensors format it streams: the header is computed from the
shapes alone, then each parameter is assembled from its ranges, written and dropped, so peak
memory is one parameter (plus the reader's mmaps), whatever the model's size. In "torch" format
(torch.save) the whole dict is built first: the model is held once in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from zray.checkpoint.atomic_stream import open_atomic
from zray.checkpoint.format import (
    COMMITTED,
    MANIFEST,
    CheckpointFormatError,
    numel,
    parse_step_dir_name,
    piece_name,
    read_marker,
)
from zray.checkpoint.reader import CheckpointReader
from zray.checkpoint.safetensors_io import TensorSpec, dtype_name, write_safetensors
from zray.checkpoint.shard import MASTER

_FORMATS = ("safetensors", "torch")


def consolidate(
    step_dir: Path | str,
    out_path: Path | str,
    dtype: torch.dtype = torch.float32,
    fmt: str = "safetensors",
    *,
    key: str = MASTER,
) -> Path:
    """Write the full `key` tensors (default: master weights) of a committed checkpoint to
    `out_path` (atomically), cast to `dtype`. Returns `out_path`."""
    if fmt not in _FORMATS:
        raise ValueError(f"fmt: got {fmt!r}; allowed: {', '.join(map(repr, _FORMATS))}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: got {dtype}; allowed: a floating point dtype")
    dtype_name(dtype, "dtype")  # refuse what safetensors cannot hold before reading anything
    out = Path(out_path)
    with CheckpointReader(step_dir) as reader:
        params = reader.params()
        tied = {a: n for a, n in reader.global_state()["tied"].items() if n in params}
        names = [*params, *tied]  # every name the model's state_dict has for its parameters

        def tensors(names: list[str]) -> Iterator[torch.Tensor]:
            for name in names:
                saved = tied.get(name, name)
                shape = params[saved]
                # [numel] fp32 -> shape, dtype; the fp32 buffer is dropped once cast/written.
                yield reader.read(saved, 0, numel(shape), key).to(dtype).view(shape)

        if fmt == "safetensors":
            specs = [TensorSpec(n, dtype, params[tied.get(n, n)]) for n in names]
            meta = {"format": "pt", "zray_step": str(reader.step), "zray_key": key}
            write_safetensors(out, specs, tensors(names), metadata=meta)
        else:
            state = dict(zip(params, tensors(list(params)), strict=True))
            state.update({alias: state[name] for alias, name in tied.items()})  # one tensor
            with open_atomic(out) as f:
                torch.save(state, f)
    return out


def inspect(step_dir: Path | str) -> dict[str, Any]:
    """A summary of one step dir, committed or not: for `zray checkpoint inspect`.

    Keys: path, step, committed, world_size, zero_stage, tp_size, num_params, total_elements, keys
    (tensor keys saved for every parameter), files [{name, bytes}], checksums_ok (None when
    not checked: an uncommitted dir), problems [str]. Cost: hashes every file (reads the
    whole checkpoint).
    """
    d = Path(step_dir)
    if not d.is_dir():
        raise ValueError(f"step_dir: {d} is not a directory")
    info: dict[str, Any] = {
        "path": str(d),
        "step": parse_step_dir_name(d.name),
        "committed": read_marker(d) is not None,
        "world_size": None,
        "zero_stage": None,
        "tp_size": None,
        "num_params": None,
        "total_elements": None,
        "keys": None,
        "files": [
            {"name": f.name, "bytes": f.stat().st_size}
            for f in sorted(d.iterdir())
            if f.is_file() and not f.name.startswith(".")
        ],
        "checksums_ok": None,
        "problems": [],
    }
    if info["committed"]:
        try:
            with CheckpointReader(d, verify=False) as r:
                params = r.params()
                keys = set.intersection(*(r.keys(n) for n in params)) if params else set()
                info.update(
                    step=r.step,
                    world_size=r.world_size,
                    zero_stage=r.zero_stage,
                    tp_size=r.tp_size,
                    num_params=len(params),
                    total_elements=sum(numel(s) for s in params.values()),
                    keys=sorted(keys),
                )
                found = r.problems()
            info["checksums_ok"] = not found
            info["problems"] = [str(e) for e in found]
        except CheckpointFormatError as e:
            info["checksums_ok"] = False
            info["problems"] = [str(e)]
    else:
        info["problems"] = _uncommitted_problems(d)
    return info


def _uncommitted_problems(d: Path) -> list[str]:
    """What an uncommitted dir lacks, from whichever rank pieces are there."""
    problems = [f"{d / COMMITTED}: missing: the save never finished (or is in progress)"]
    piece0 = d / piece_name(0)
    try:
        world = int(json.loads(piece0.read_bytes())["world_size"])
    except (OSError, ValueError, KeyError):
        problems.append(f"{piece0}: missing or unreadable, so the world size is unknown")
        return problems
    missing = [r for r in range(world) if not (d / piece_name(r)).is_file()]
    if missing:
        problems.append(f"pieces of ranks {missing} (of world size {world}) missing")
    elif not (d / MANIFEST).is_file():
        problems.append("all pieces present but no manifest: rank 0 did not commit")
    return problems

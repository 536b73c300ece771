"""JSON-safe encoding of a rank's non-tensor state (RNG states, hyperparameters, client state).

JSON alone loses what training state holds: tuples (python `random.getstate()`), torch tensors
(`torch.get_rng_state()`), numpy arrays (`np.random.get_state()`), dicts with int keys,
non-finite floats. Each such value becomes a tagged object {"__zray__": kind, ...}; torch
tensors are moved out into the rank's safetensors file (no pickle anywhere) and referenced by
key. `decode` is the exact inverse: decode(encode(x)) == x, types included.

Other types (arbitrary class instances) are refused with the path of the value in the state, so
a user learns at save time, not at resume time, that their client state cannot be restored.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

_TAG = "__zray__"

# What `encode` accepts, for error messages.
_ALLOWED = (
    "None, bool, int, float, str, bytes, list, tuple, dict, torch.Tensor, numpy array or scalar"
)


def encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON-safe data; tensors are added to `tensors` under a key derived from `path`.

    `path` names the value in error messages and in tensor keys ("__state__/rng/torch").
    """
    if isinstance(obj, np.generic):
        # Before float: np.float64 is a float subclass and would lose its numpy type.
        return {_TAG: "npscalar", "dtype": obj.dtype.str, "value": encode(obj.item(), path, {})}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        # Plain JSON has no inf/nan (Python writes non-standard tokens other tools reject).
        return {_TAG: "float", "value": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = path
        n = 1
        while key in tensors:  # two paths can spell the same key ("a/b" vs {"a": {"b": ..}})
            key = f"{path}#{n}"
            n += 1
        # Detached CPU copy: the file needs bytes; the caller's tensor is left alone.
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {_TAG: "tensor", "key": key}
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype.hasobject:
            raise ValueError(
                f"{path}: numpy array of dtype object cannot be saved; allowed: "
                "numeric numpy arrays"
            )
        return {
            _TAG: "ndarray",
            "dtype": arr.dtype.str,  # with byte order, e.g. "<u4"
            "shape": list(arr.shape),
            "data": base64.b64encode(arr.tobytes()).decode("ascii"),
        }
    if isinstance(obj, bytes):
        return {_TAG: "bytes", "data": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, list):
        return [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {
            _TAG: "tuple",
            "items": [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)],
        }
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and _TAG not in obj:
            return {k: encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        # Keys JSON cannot hold (int param ids, tuples), or our own tag used as a key.
        return {
            _TAG: "dict",
            "items": [
                [encode(k, f"{path}/<key {k!r}>", tensors), encode(v, f"{path}/{k}", tensors)]
                for k, v in obj.items()
            ],
        }
    raise ValueError(
        f"{path}: a value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be saved "
        f"in a checkpoint; allowed: {_ALLOWED} (nested in any combination)"
    )


def decode(data: Any, load_tensor: Callable[[str], torch.Tensor]) -> Any:
    """Inverse of `encode`; `load_tensor(key)` returns a tensor `encode` moved out."""
    if isinstance(data, list):
        return [decode(v, load_tensor) for v in data]
    if not isinstance(data, dict):
        return data
    kind = data.get(_TAG)
    if kind is None:
        return {k: decode(v, load_tensor) for k, v in data.items()}
    if kind == "float":
        return float(data["value"])
    if kind == "tensor":
        return load_tensor(data["key"])
    if kind == "ndarray":
        raw = base64.b64decode(data["data"])
        return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()
    if kind == "npscalar":
        return np.dtype(data["dtype"]).type(decode(data["value"], load_tensor))
    if kind == "bytes":
        return base64.b64decode(data["data"])
    if kind == "tuple":
        return tuple(decode(v, load_tensor) for v in data["items"])
    if kind == "dict":
        return {decode(k, load_tensor): decode(v, load_tensor) for k, v in data["items"]}
    raise ValueError(
        f"unknown encoded value kind {kind!r}; allowed: float, tensor, ndarray, "
        "npscalar, bytes, tuple, dict (was the checkpoint written by a newer zray?)"
    )

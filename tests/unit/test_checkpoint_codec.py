"""Tests for the pieces under the format: the JSON-safe state codec and the streaming
safetensors writer (checked against the safetensors library's own reader)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from zray.checkpoint.safetensors_io import TensorSpec, write_safetensors
from zray.checkpoint.state_codec import decode, encode


def _round_trip(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    data = json.loads(json.dumps(encode(obj, "__state__/x", tensors), allow_nan=False))
    return decode(data, tensors.__getitem__), tensors


def test_codec_round_trips_types_exactly() -> None:
    obj = {
        "python": random.Random(3).getstate(),
        "ints": {1: "a", (2, 3): [None, True]},
        "floats": [0.1, float("inf"), -float("inf")],
        "np_scalar": np.float64(2.5),
        "np_int": np.int64(7),
        "bytes": b"\x00\xff",
        "__zray__": "a user key that looks like our tag",
        "nested": {"t": torch.arange(3), "deep": [(torch.ones(2, 2, dtype=torch.bfloat16),)]},
    }
    back, tensors = _round_trip(obj)
    assert back["python"] == obj["python"]
    assert back["ints"] == {1: "a", (2, 3): [None, True]}
    assert back["floats"] == [0.1, float("inf"), -float("inf")]
    assert type(back["np_scalar"]) is np.float64 and back["np_scalar"] == 2.5
    assert type(back["np_int"]) is np.int64
    assert back["bytes"] == b"\x00\xff"
    assert back["__zray__"] == obj["__zray__"]
    assert torch.equal(back["nested"]["t"], torch.arange(3))
    (t,) = back["nested"]["deep"][0]
    assert t.dtype == torch.bfloat16 and torch.equal(t, obj["nested"]["deep"][0][0])
    assert set(tensors) == {"__state__/x/nested/t", "__state__/x/nested/deep/0/0"}
    nan, _ = _round_trip(float("nan"))
    assert math.isnan(nan)


def test_codec_numpy_rng_state() -> None:
    state = np.random.RandomState(5).get_state()
    back, _ = _round_trip(state)
    rs = np.random.RandomState()
    rs.set_state(back)
    assert rs.rand() == np.random.RandomState(5).rand()


def test_codec_refuses_objects_naming_the_path() -> None:
    with pytest.raises(ValueError, match=r"__state__/x/opt/1: a value of type builtins.object"):
        encode({"opt": [1, object()]}, "__state__/x", {})


def test_codec_colliding_tensor_paths_get_distinct_keys() -> None:
    obj = {"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}}
    back, tensors = _round_trip(obj)
    assert len(tensors) == 2
    assert torch.equal(back["a/b"], torch.zeros(1)) and torch.equal(back["a"]["b"], torch.ones(1))


def test_streaming_writer_matches_safetensors_reader(tmp_path: Path) -> None:
    tensors = {
        "f64": torch.randn(3, dtype=torch.float64),
        "f32": torch.randn(2, 3),
        "bf16": torch.randn(5).bfloat16(),
        "u8": torch.arange(7, dtype=torch.uint8),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(1.5),
        "strided": torch.randn(4, 4).t(),  # non-contiguous input
    }
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    path = tmp_path / "x.safetensors"
    sha, nbytes = write_safetensors(path, specs, iter(tensors.values()), metadata={"a": "b"})
    assert nbytes == path.stat().st_size
    loaded = load_file(path)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"a": "b"}
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


def test_streaming_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"old")

    def produce() -> Any:
        yield torch.zeros(2)
        raise RuntimeError("producer died")

    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError, match="producer died"):
        write_safetensors(path, specs, produce())
    assert path.read_bytes() == b"old"  # the old file stays, whole
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temp file left


def test_streaming_writer_checks_tensors_against_header(tmp_path: Path) -> None:
    specs = [TensorSpec("a", torch.float32, (2,))]
    with pytest.raises(ValueError, match=r"tensor 'a' is torch.float32 \(3,\)"):
        write_safetensors(tmp_path / "x", specs, [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"dtype torch\.complex64 cannot be saved"):
        write_safetensors(tmp_path / "y", [TensorSpec("c", torch.complex64, (1,))], [])

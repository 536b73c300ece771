"""`zray checkpoint inspect | consolidate | reshard` on a checkpoint a real engine saved.

One single-process stage-1 engine trains a tiny GPT for 2 steps and saves; every command runs
through `zray.cli.main` as a user would run it, and its output is compared exactly with what
the engine holds (fp32 all the way, so equality is exact, not approximate).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import zray
from zray.checkpoint.format import numel
from zray.checkpoint.reader import CheckpointReader
from zray.checkpoint.reshard import even_split
from zray.cli import main
from zray.models.data import lm_batch, synthetic_tokens
from zray.models.gpt import GPT, GPTConfig

MODEL = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)
CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
    "zero_optimization": {"stage": 1},
}
KEYS = ("master", "exp_avg", "exp_avg_sq")
TOKENS = synthetic_tokens(8, 16, 64, seed=1)


def new_engine(seed: int) -> zray.Engine:
    torch.manual_seed(seed)
    engine, *_ = zray.initialize(model=GPT(MODEL), config=CONFIG)
    return engine


def train_step(engine: zray.Engine, step: int) -> None:
    engine.backward(engine(**lm_batch(TOKENS[2 * step : 2 * step + 2])))
    engine.step()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A checkpoint root holding step 2 of a trained engine, and that engine's full state."""
    root = tmp_path_factory.mktemp("ckpt")
    engine = new_engine(seed=0)
    for step in range(2):
        train_step(engine, step)
    step_dir = Path(engine.save_checkpoint(str(root)))
    return {"root": root, "step_dir": step_dir, "state": engine.consolidated_state_dict()}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def every_tensor(step_dir: Path) -> dict[tuple[str, str], torch.Tensor]:
    """{(parameter, key): its whole flat fp32 tensor} read back from a checkpoint."""
    with CheckpointReader(step_dir) as r:
        return {
            (name, key): r.read(name, 0, numel(shape), key)
            for name, shape in r.params().items()
            for key in sorted(r.keys(name))
        }


def test_inspect_prints_step_world_and_params(
    saved: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    for target in (saved["step_dir"], saved["root"]):  # a root means its newest step
        code, out, err = run(capsys, "checkpoint", "inspect", str(target))
        assert code == 0, err
        info = json.loads(out)
        assert info["path"] == str(saved["step_dir"])
        assert (info["step"], info["world_size"], info["zero_stage"]) == (2, 1, 1)
        assert info["num_params"] == len(saved["state"])
        assert info["total_elements"] == sum(t.numel() for t in saved["state"].values())
        assert info["keys"] == sorted(KEYS)
        assert info["committed"] is True and info["checksums_ok"] is True


def test_consolidate_writes_the_engines_weights(
    saved: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state: dict[str, torch.Tensor] = saved["state"]
    out = tmp_path / "model.safetensors"
    code, stdout, err = run(capsys, "checkpoint", "consolidate", str(saved["root"]), str(out))
    assert code == 0, err
    assert json.loads(stdout)["path"] == str(out)
    got = load_file(out)
    assert got.keys() == state.keys()
    for name, t in state.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], t), name

    bf16 = tmp_path / "model_bf16.safetensors"
    code, _, err = run(
        capsys, "checkpoint", "consolidate", str(saved["step_dir"]), str(bf16), "--dtype", "bf16"
    )
    assert code == 0, err
    got = load_file(bf16)
    for name, t in state.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], t.to(torch.bfloat16)), name

    pt = tmp_path / "exp_avg.pt"
    code, _, err = run(
        capsys,
        "checkpoint",
        "consolidate",
        str(saved["step_dir"]),
        str(pt),
        "--format",
        "torch",
        "--key",
        "exp_avg",
    )
    assert code == 0, err
    moments = torch.load(pt, weights_only=True)
    expected = every_tensor(saved["step_dir"])
    for name, t in state.items():
        assert torch.equal(moments[name], expected[(name, "exp_avg")].view(t.shape)), name


def test_reshard_to_three_then_one_keeps_every_tensor_and_state(
    saved: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = every_tensor(saved["step_dir"])
    assert {k for _, k in original} == set(KEYS)

    code, out, err = run(
        capsys,
        "checkpoint",
        "reshard",
        str(saved["root"]),
        str(tmp_path / "w3"),
        "--world-size",
        "3",
    )
    assert code == 0, err
    w3 = Path(json.loads(out)["path"])
    assert w3 == tmp_path / "w3" / saved["step_dir"].name
    code, out, err = run(
        capsys, "checkpoint", "reshard", str(w3), str(tmp_path / "w1"), "--world-size", "1"
    )
    assert code == 0, err
    w1 = Path(json.loads(out)["path"])

    for step_dir, world in ((w3, 3), (w1, 1)):
        got = every_tensor(step_dir)
        assert got.keys() == original.keys()
        for k, t in original.items():
            assert torch.equal(got[k], t), (step_dir, k)
        with CheckpointReader(step_dir) as r, CheckpointReader(saved["step_dir"]) as src:
            assert (r.step, r.world_size, r.zero_stage) == (2, world, 1)
            # Even contiguous splits: every parameter is cut into `world` pieces.
            manifest = json.loads((step_dir / "manifest.json").read_text())
            for rng in manifest["ranges"]:
                n = numel(r.params()[rng["name"]])
                assert (rng["lo"], rng["hi"]) == even_split(n, world, rng["rank"])
                assert rng["keys"] == sorted(KEYS)
            assert r.global_state() == src.global_state()
            before, after = src.rank_state(0), r.rank_state(0)
            assert before is not None and after is not None
            assert after["param_groups"] == before["param_groups"]
            assert after["group_scalars"] == before["group_scalars"]
            assert torch.equal(after["rng"]["torch"], before["rng"]["torch"])
            for rank in range(1, world):  # ranks the saving job did not have
                extra = r.rank_state(rank)
                assert extra is not None and extra["rng"] == {}
                assert extra["param_groups"] == before["param_groups"]
    # Files are smaller per rank: the point of resharding to more ranks.
    sizes3 = [f.stat().st_size for f in w3.glob("*.safetensors")]
    size1 = next(saved["step_dir"].glob("*.safetensors")).stat().st_size
    assert len(sizes3) == 3 and max(sizes3) < size1 / 2


def test_engine_loads_a_resharded_checkpoint(
    saved: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys,
        "checkpoint",
        "reshard",
        str(saved["root"]),
        str(tmp_path / "w3"),
        "--world-size",
        "3",
    )
    assert code == 0, err
    resumed = new_engine(seed=123)  # other initial weights: only the load can make them equal
    path, client_state = resumed.load_checkpoint(str(tmp_path / "w3"))
    assert path == str(tmp_path / "w3" / saved["step_dir"].name) and client_state == {}
    assert resumed.global_steps == 2
    state = resumed.consolidated_state_dict()
    for name, t in saved["state"].items():
        assert torch.equal(state[name], t), name
    # Optimizer state came along too: a step after loading either copy lands in the same place.
    direct = new_engine(seed=7)
    direct.load_checkpoint(str(saved["root"]))
    train_step(resumed, 2)
    train_step(direct, 2)
    a, b = resumed.consolidated_state_dict(), direct.consolidated_state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_corrupt_shard_fails_naming_the_file(
    saved: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(saved["root"], root)
    step_dir = root / saved["step_dir"].name
    shard = next(step_dir.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor's data: still parses, fails its hash
    shard.write_bytes(bytes(data))

    # inspect a root checks its newest committed step rather than passing over it.
    for target in (step_dir, root):
        code, out, err = run(capsys, "checkpoint", "inspect", str(target))
        assert code == 1
        assert len(err.strip().splitlines()) == 1 and str(shard) in err
        assert "checksum mismatch" in err
        assert json.loads(out)["checksums_ok"] is False
    code, _, err = run(capsys, "checkpoint", "consolidate", str(step_dir), str(tmp_path / "m"))
    assert code == 1 and str(shard) in err and not (tmp_path / "m").exists()


def test_bad_arguments_are_one_line_errors(
    saved: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "checkpoint", "reshard", str(saved["step_dir"]), str(tmp_path), "--world-size", "0"
    )
    assert code == 2 and "world_size: got 0; allowed: an int >= 1" in err
    # Writing into the input's own root would overwrite the input: refused.
    code, _, err = run(
        capsys,
        "checkpoint",
        "reshard",
        str(saved["step_dir"]),
        str(saved["root"]),
        "--world-size",
        "2",
    )
    assert code == 2 and "already exists" in err and str(saved["step_dir"]) in err
    code, _, err = run(capsys, "checkpoint", "inspect", str(tmp_path / "nowhere"))
    assert code == 2 and "is not a directory" in err
    code, _, err = run(capsys, "checkpoint", "consolidate", str(tmp_path), str(tmp_path / "m"))
    assert code == 1 and "no committed checkpoint" in err


def test_a_tied_model_consolidates_under_every_name_and_loads_strictly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPT-2-style tied embeddings: the checkpoint saves the shared weight once and records its
    other name; consolidate writes it under both (safetensors: a copy; torch: one tensor), so
    load_state_dict(strict=True) takes the file, also after a reshard. Before, lm_head.weight
    was missing and a strict load failed."""
    tied = MODEL.with_(tie_embeddings=True)
    torch.manual_seed(0)
    engine, *_ = zray.initialize(model=GPT(tied), config=CONFIG)
    for step in range(2):
        train_step(engine, step)
    want = engine.consolidated_state_dict()
    step_dir = Path(engine.save_checkpoint(str(tmp_path / "ckpt")))
    with CheckpointReader(step_dir) as r:
        assert "lm_head.weight" not in r.params()  # saved once
        assert r.global_state()["tied"] == {"lm_head.weight": "tok_emb.weight"}
    resharded = tmp_path / "resharded"
    code, _, err = run(
        capsys, "checkpoint", "reshard", str(step_dir), str(resharded), "--world-size", "2"
    )
    assert code == 0, err
    for source in (step_dir, next(resharded.glob("step_*"))):
        for fmt, name in (("safetensors", "m.safetensors"), ("torch", "m.pt")):
            out = tmp_path / f"{source.parent.name}_{name}"
            argv = ["checkpoint", "consolidate", str(source), str(out), "--format", fmt]
            code, _, err = run(capsys, *argv)
            assert code == 0, err
            got = load_file(out) if fmt == "safetensors" else torch.load(out, weights_only=True)
            assert got.keys() == want.keys(), (fmt, source)
            model = GPT(tied)
            model.load_state_dict(got, strict=True)
            assert model.lm_head.weight is model.tok_emb.weight  # still one parameter
            for k, v in want.items():
                assert torch.equal(got[k], v), (fmt, k)

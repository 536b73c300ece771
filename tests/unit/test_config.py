"""Tests for zray.config: DeepSpeed JSON in, typed config out, clear errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from zray.config import (
    IGNORED_KEYS,
    BatchSizes,
    Config,
    ConfigError,
    OptimizerConfig,
    SchedulerConfig,
    ZeroConfig,
    ZrayConfigWarning,
)
from zray.config import fields as _config_fields
from zray.errors import NOT_GIVEN, ZrayError

# Hugging Face's documented ZeRO-3 config (transformers' ds_config_zero3.json), "auto" and all.
HF_ZERO3: dict[str, Any] = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
    },
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


@pytest.fixture(autouse=True)
def _fresh_warning_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Warn-once state is per process; give every test its own so their order does not matter.
    monkeypatch.setattr(_config_fields, "_WARNED_KEYS", set())


def _config_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ZrayConfigWarning)]


# ---- defaults and round trips ---------------------------------------------------------------


def test_defaults_are_deepspeeds() -> None:
    cfg = Config.load(None)
    assert cfg == Config() == Config.from_dict({})
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu) == (None, None)
    assert cfg.gradient_accumulation_steps is None
    assert cfg.optimizer is None and cfg.scheduler is None
    assert cfg.fp16.enabled is False and cfg.fp16.loss_scale == 0.0
    assert cfg.fp16.initial_scale_power == 16 and cfg.fp16.loss_scale_window == 1000
    assert cfg.fp16.hysteresis == 2 and cfg.fp16.min_loss_scale == 1.0
    assert cfg.bf16.enabled is False
    zero = cfg.zero_optimization
    assert zero.stage == 0 and zero.overlap_comm is False and zero.contiguous_gradients is True
    assert zero.reduce_bucket_size == 500_000_000 and zero.allgather_bucket_size == 500_000_000
    assert zero.stage3_prefetch_bucket_size == 50_000_000
    assert zero.stage3_param_persistence_threshold == 100_000
    assert zero.offload_optimizer.device == "none" and not zero.offload_optimizer.enabled
    assert zero.offload_param.device == "none" and zero.offload_param.buffer_count == 5
    assert cfg.gradient_clipping == 0.0 and cfg.steps_per_print == 10
    assert cfg.communication_data_type is None
    assert cfg.activation_checkpointing.modules is None
    assert cfg.tensor_parallel.tp_size == 1
    assert cfg.zray.num_workers == 1 and cfg.zray.seed == 0 and cfg.zray.model_kwargs == {}
    assert (cfg.zray.min_workers, cfg.zray.max_workers, cfg.zray.elastic) == (1, 1, False)
    assert cfg.zray.scale_interval_s == 5.0 and cfg.zray.replica_interval == 1
    assert cfg.zray.min_wait_s == 600.0
    el = cfg.elasticity
    assert el.enabled is False and el.max_train_batch_size is None and el.micro_batch_sizes is None
    assert (el.min_gpus, el.max_gpus, el.min_time, el.version) == (1, 10000, 0.0, 0.2)
    assert el.prefer_larger_batch is True and el.ignore_non_elastic_batch_info is False
    assert (el.num_gpus_per_node, el.model_parallel_size) == (1, 1)
    assert cfg.compute_dtype == torch.float32


def _full_config() -> dict[str, Any]:
    return {
        "train_batch_size": 64,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"total_num_steps": 100, "warmup_num_steps": 10},
        },
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "gradient_clipping": 1.0,
        "communication_data_type": "fp32",
        "activation_checkpointing": {"modules": ["Block"]},
        "tensor_parallel": {"tp_size": 2},
        "zray": {
            "model": "examples.tiny_gpt:build",
            "model_kwargs": {"n_layer": 2},
            "data": {"path": "tokens.parquet"},
            "num_workers": 4,
            "max_steps": 100,
            "checkpoint_dir": "/tmp/ckpt",
        },
    }


@pytest.mark.parametrize("raw", [{}, _full_config(), HF_ZERO3], ids=["empty", "full", "hf-zero3"])
def test_to_dict_round_trips_through_json(raw: dict[str, Any]) -> None:
    cfg = Config.from_dict(raw)
    text = json.dumps(cfg.to_dict())
    again = Config.from_dict(json.loads(text))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_full_config_values() -> None:
    cfg = Config.from_dict(_full_config())
    assert cfg.optimizer is not None and cfg.optimizer.type == "SGD"  # canonical spelling
    assert cfg.optimizer.to_dict()["params"] == {
        "lr": 0.1,
        "momentum": 0.9,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": True,
    }
    assert cfg.compute_dtype == torch.bfloat16
    assert cfg.activation_checkpointing.modules == ("Block",)
    assert cfg.resolve_batch(4) == BatchSizes(64, 8, 2)
    assert cfg.zero_optimization.offload_optimizer.enabled
    assert cfg.zray.model_kwargs == {"n_layer": 2}


def test_hugging_face_zero3_config_parses() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg = Config.from_dict(HF_ZERO3)
    # Hugging Face's standard ZeRO-3 file reads without a warning: every key it sets either
    # acts (stage3_gather_16bit_weights_on_model_save: Engine.save_16bit_model) or is at
    # DeepSpeed's default (overlap_comm true at stage 3, the sizes).
    got = _config_warnings(record)
    assert got == [], got
    assert not cfg.fp16.enabled and not cfg.bf16.enabled  # "auto" -> default
    assert cfg.optimizer is not None and cfg.optimizer.type == "AdamW"
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.betas == (0.9, 0.999)
    assert cfg.optimizer.decoupled_weight_decay
    assert cfg.scheduler is not None
    # warmup_max_lr "auto" means the optimizer's lr, as Hugging Face fills it in.
    assert cfg.scheduler.params == {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 1e-3,
        "warmup_num_steps": 1000,
        "warmup_type": "log",
    }
    zero = cfg.zero_optimization
    assert zero.stage == 3 and zero.overlap_comm is True
    assert zero.sub_group_size == 1_000_000_000 and type(zero.sub_group_size) is int
    assert zero.stage3_max_live_parameters == 1_000_000_000
    assert zero.reduce_bucket_size == 500_000_000  # "auto" -> DeepSpeed's default
    assert zero.offload_param.pin_memory and zero.offload_optimizer.device == "cpu"
    assert zero.stage3_gather_16bit_weights_on_model_save is True
    assert cfg.gradient_clipping == 0.0 and cfg.steps_per_print == 2000
    assert cfg.resolve_batch(2) == BatchSizes(2, 1, 1)


def test_from_file_json_and_yaml(tmp_path: Path) -> None:
    json_path = tmp_path / "ds.json"
    json_path.write_text(json.dumps(HF_ZERO3))
    yaml_path = tmp_path / "ds.yaml"
    # 5e8 without a dot is a string to PyYAML (YAML 1.1); zray reads it as the number meant.
    yaml_path.write_text(
        "zero_optimization:\n  stage: 2\n  reduce_bucket_size: 5e8\n"
        "train_micro_batch_size_per_gpu: 4\nzray:\n  seed: 7\n"
    )
    assert Config.from_file(json_path) == Config.from_dict(HF_ZERO3)
    assert Config.load(str(json_path)) == Config.load(json_path)
    cfg = Config.load(yaml_path)
    assert cfg.zero_optimization.reduce_bucket_size == 500_000_000
    assert cfg.train_micro_batch_size_per_gpu == 4 and cfg.zray.seed == 7
    (tmp_path / "empty.yml").write_text("")
    assert Config.load(tmp_path / "empty.yml") == Config()


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 8,,\n}')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 2"):
        Config.from_file(bad)
    dup = tmp_path / "dup.json"
    dup.write_text('{"zero_optimization": {"stage": 1, "stage": 2}}')
    with pytest.raises(ConfigError, match="stage: duplicate key; got 2"):
        Config.from_file(dup)


def test_config_pickles_for_workers() -> None:
    # Ray ships the config to every worker actor.
    cfg = Config.from_dict(_full_config())
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_load_accepts_config_dict_path_none_only() -> None:
    cfg = Config.from_dict({"train_batch_size": 8})
    assert Config.load(cfg) is cfg
    assert Config.load({"train_batch_size": 8}) == cfg
    with pytest.raises(ConfigError, match=r"config: got 3; allowed: a zray.Config, a dict"):
        Config.load(3)  # type: ignore[arg-type]


# ---- batch size resolution ------------------------------------------------------------------

WORLD_SIZES = [1, 2, 4]


@pytest.mark.parametrize("w", WORLD_SIZES)
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # (tbs, micro, gas) given -> (tbs, micro, gas) resolved; tbs scales with w as "8w".
        (("8w", 2, None), ("8w", 2, 4)),
        (("8w", None, 2), ("8w", 4, 2)),
        ((None, 2, 4), ("8w", 2, 4)),
        (("8w", 2, 4), ("8w", 2, 4)),
        (("8w", None, None), ("8w", 8, 1)),
        ((None, 3, None), ("3w", 3, 1)),
        ((None, None, None), ("1w", 1, 1)),
        (("auto", 2, "auto"), ("2w", 2, 1)),
    ],
)
def test_resolve_batch(w: int, given: tuple[Any, ...], expected: tuple[Any, ...]) -> None:
    def value(v: Any) -> Any:
        return int(v[:-1]) * w if isinstance(v, str) and v.endswith("w") else v

    tbs, micro, gas = (value(v) for v in given)
    cfg = Config.from_dict(
        {
            "train_batch_size": tbs,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": gas,
        }
    )
    got = cfg.resolve_batch(w)
    assert got == BatchSizes(*(value(v) for v in expected))
    assert got.train_batch_size == got.micro_batch_per_gpu * got.gradient_accumulation_steps * w


@pytest.mark.parametrize("w", WORLD_SIZES)
def test_resolve_batch_all_three_disagree(w: int) -> None:
    cfg = Config(
        train_batch_size=8 * w, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2
    )
    with pytest.raises(ConfigError) as err:
        cfg.resolve_batch(w)
    msg = str(err.value)
    assert f"train_batch_size ({8 * w}) != train_micro_batch_size_per_gpu (2)" in msg
    assert f"data-parallel world size ({w}) = {4 * w}" in msg
    assert err.value.key == "train_batch_size" and err.value.value == 8 * w


def test_resolve_batch_message_matches_deepspeed_rule() -> None:
    cfg = Config(
        train_batch_size=32, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2
    )
    assert cfg.resolve_batch(4) == BatchSizes(32, 4, 2)
    with pytest.raises(ConfigError) as err:
        cfg.resolve_batch(2)
    assert (
        "train_batch_size (32) != train_micro_batch_size_per_gpu (4) * "
        "gradient_accumulation_steps (2) * data-parallel world size (2) = 16"
    ) in str(err.value)


@pytest.mark.parametrize("w", WORLD_SIZES)
@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (
            {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4},
            "train_batch_size (10) is not divisible by train_micro_batch_size_per_gpu (4) * ",
        ),
        (
            {"train_batch_size": 12, "gradient_accumulation_steps": 5},
            "train_batch_size (12) is not divisible by gradient_accumulation_steps (5) * ",
        ),
    ],
)
def test_resolve_batch_not_divisible(w: int, raw: dict[str, int], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_dict(raw).resolve_batch(w)
    assert fragment in str(err.value)
    assert f"data-parallel world size ({w})" in str(err.value)


def test_resolve_batch_train_batch_only_not_divisible_by_world() -> None:
    cfg = Config(train_batch_size=6)
    assert cfg.resolve_batch(2) == BatchSizes(6, 3, 1)
    with pytest.raises(
        ConfigError, match=r"\(6\) is not divisible by data-parallel world size \(4\)"
    ):
        cfg.resolve_batch(4)


@pytest.mark.parametrize("w", [0, -1, True, 2.0])
def test_resolve_batch_rejects_bad_world_size(w: Any) -> None:
    with pytest.raises(ConfigError, match=f"dp_world_size: got {w!r}"):
        Config().resolve_batch(w)


# ---- malformed configs -------------------------------------------------------------------------

# fmt: off
MALFORMED: list[tuple[str, dict[str, Any], str, list[str]]] = [
    # (id, config, dotted key, further fragments the message must hold)
    ("stage-5", {"zero_optimization": {"stage": 5}},
     "zero_optimization.stage", ["got 5", "allowed: one of 0, 1, 2, 3"]),
    ("typo-stgae", {"zero_optimization": {"stgae": 2}},
     "zero_optimization.stgae", ["got 2", "unknown key (did you mean 'stage'?)"]),
    ("fp16-and-bf16", {"fp16": {"enabled": True}, "bf16": {"enabled": True}},
     "fp16.enabled", ["got True", "bf16.enabled"]),
    ("negative-clipping", {"gradient_clipping": -1.0},
     "gradient_clipping", ["got -1.0", "a number >= 0"]),
    ("optimizer-Adamm", {"optimizer": {"type": "Adamm"}},
     "optimizer.type", ["got 'Adamm'", "did you mean 'Adam'?", "one of Adam, AdamW, SGD"]),
    ("optimizer-type-auto", {"optimizer": {"type": "auto"}},
     "optimizer.type", ["got 'auto'", "one of Adam, AdamW, SGD"]),
    ("optimizer-missing-type", {"optimizer": {"params": {"lr": 0.1}}},
     "optimizer.type", ["required key is missing"]),
    ("unknown-optimizer-param", {"optimizer": {"type": "Adam", "params": {"momentum": 0.9}}},
     "optimizer.params.momentum", ["got 0.9", "unknown key", "lr, betas, eps"]),
    ("optimizer-param-typo", {"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}},
     "optimizer.params.weight_decy", ["got 0.1", "did you mean 'weight_decay'?"]),
    ("betas-length", {"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}},
     "optimizer.params.betas", ["got [0.9]", "a list of 2 numbers"]),
    ("adamw-not-decoupled", {"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}},
     "optimizer.params.adam_w_mode", ["got False"]),
    ("scheduler-missing-total", {"scheduler": {"type": "WarmupDecayLR", "params": {}}},
     "scheduler.params.total_num_steps", ["required by WarmupDecayLR and is missing"]),
    ("scheduler-param-typo", {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 5}}},
     "scheduler.params.warmup_num_step", ["got 5", "did you mean 'warmup_num_steps'?"]),
    ("scheduler-warmup-type", {"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cos"}}},
     "scheduler.params.warmup_type", ["got 'cos'", "one of log, linear"]),
    ("cosine-total-within-warmup",
     {"scheduler": {"type": "WarmupCosineLR",
                    "params": {"total_num_steps": 5, "warmup_num_steps": 10}}},
     "scheduler.params.total_num_steps", ["got 5", "> warmup_num_steps (10)"]),
    ("cosine-auto-total-within-warmup",
     {"scheduler": {"type": "WarmupCosineLR",
                    "params": {"total_num_steps": "auto", "warmup_num_steps": 10}},
      "zray": {"max_steps": 6}},
     "scheduler.params.total_num_steps", ["got 6", "zray.max_steps"]),
    ("scheduler-type", {"scheduler": {"type": "Cosine"}},
     "scheduler.type", ["got 'Cosine'", "WarmupCosineLR"]),
    ("bool-as-yes", {"fp16": {"enabled": "yes"}},
     "fp16.enabled", ["got 'yes'", "true or false"]),
    ("bool-as-int", {"wall_clock_breakdown": 1},
     "wall_clock_breakdown", ["got 1", "true or false"]),
    ("offload-nvme", {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
     "zero_optimization.offload_optimizer.device", ["got 'nvme'", "NVMe offload is not supported"]),
    ("offload-param-stage-2", {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "zero_optimization.offload_param.device", ["got 'cpu'", "stage is 2"]),
    ("offload-optimizer-stage-0", {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer.device", ["got 'cpu'", "stage is 0"]),
    ("offload-ratio", {"zero_optimization": {"stage": 3, "offload_optimizer": {"ratio": 1.5}}},
     "zero_optimization.offload_optimizer.ratio", ["got 1.5", ">= 0 and <= 1"]),
    ("train-batch-0", {"train_batch_size": 0},
     "train_batch_size", ["got 0", "an integer > 0"]),
    ("micro-negative", {"train_micro_batch_size_per_gpu": -2},
     "train_micro_batch_size_per_gpu", ["got -2"]),
    ("batch-as-string", {"train_batch_size": "32"},
     "train_batch_size", ["got '32'"]),
    ("size-not-integral", {"zero_optimization": {"reduce_bucket_size": 5.5}},
     "zero_optimization.reduce_bucket_size", ["got 5.5", "an integer > 0"]),
    ("unknown-top-level", {"gradient_cliping": 1.0},
     "gradient_cliping", ["got 1.0", "did you mean 'gradient_clipping'?"]),
    ("seed-at-top-level", {"seed": 42},
     "seed", ["got 42", "did you mean 'zray.seed'?"]),
    ("zray-workers-0", {"zray": {"num_workers": 0}},
     "zray.num_workers", ["got 0", "an integer >= 1"]),
    ("zray-workers-min-above-max", {"zray": {"num_workers": [3, 2]}},
     "zray.num_workers", ["min (3) is greater than max (2)", "got [3, 2]", "1 <= min <= max"]),
    ("zray-workers-min-0", {"zray": {"num_workers": [0, 2]}},
     "zray.num_workers", ["min (0) is below 1", "got [0, 2]", "a list [min, max]"]),
    ("zray-workers-string", {"zray": {"num_workers": "4"}},
     "zray.num_workers", ["got '4'", "an integer >= 1, or a list [min, max]"]),
    ("zray-workers-three", {"zray": {"num_workers": [1, 2, 3]}},
     "zray.num_workers", ["got [1, 2, 3]", "a list [min, max]"]),
    ("zray-workers-float-bound", {"zray": {"num_workers": [1.5, 4]}},
     "zray.num_workers", ["got [1.5, 4]", "a list [min, max] of integers"]),
    ("zray-workers-bool", {"zray": {"num_workers": True}},
     "zray.num_workers", ["got True"]),
    ("zray-scale-interval-0", {"zray": {"scale_interval_s": 0}},
     "zray.scale_interval_s", ["got 0", "a number > 0"]),
    ("zray-replica-interval-negative", {"zray": {"replica_interval": -1}},
     "zray.replica_interval", ["got -1", "an integer >= 0"]),
    ("zray-min-wait-0", {"zray": {"min_wait_s": 0.0}},
     "zray.min_wait_s", ["got 0.0", "a number > 0"]),
    ("elastic-micro-empty",
     {"elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": []}},
     "elasticity.micro_batch_sizes", ["got []", "a non-empty list of integers > 0"]),
    ("elastic-micro-zero",
     {"elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [2, 0]}},
     "elasticity.micro_batch_sizes", ["got [2, 0]", "0 is not > 0"]),
    ("elastic-micro-fraction",
     {"elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [2, 0.5]}},
     "elasticity.micro_batch_sizes[1]", ["got 0.5", "an integer"]),
    ("elastic-micro-scalar",
     {"elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": 5}},
     "elasticity.micro_batch_sizes", ["got 5", "a list of integers"]),
    ("elastic-micro-missing", {"elasticity": {"enabled": True, "max_train_batch_size": 8}},
     "elasticity.micro_batch_sizes", ["required when elasticity.enabled is true"]),
    ("elastic-max-missing", {"elasticity": {"enabled": True, "micro_batch_sizes": [2]}},
     "elasticity.max_train_batch_size", ["required when elasticity.enabled is true"]),
    ("elastic-max-below-micros",
     {"elasticity": {"enabled": True, "max_train_batch_size": 3, "micro_batch_sizes": [4, 8]}},
     "elasticity.max_train_batch_size",
     ["got 3", "micro-batch size 8 is larger than max_train_batch_size", "an integer >= 8"]),
    ("elastic-max-below-one-micro",
     {"elasticity": {"enabled": True, "max_train_batch_size": 6, "micro_batch_sizes": [4, 8]}},
     "elasticity.max_train_batch_size", ["got 6", "an integer >= 8"]),
    ("elastic-max-per-node",
     {"elasticity": {"enabled": True, "max_train_batch_size": 16, "micro_batch_sizes": [4, 8],
                     "num_gpus_per_node": 4}},
     "elasticity.max_train_batch_size",
     ["got 16", "// 4 ranks per node = 4", "an integer >= 32, the largest micro-batch size x 4"]),
    ("elastic-version", {"elasticity": {"version": 0.3}},
     "elasticity.version", ["got 0.3", "one of 0.1, 0.2"]),
    ("elastic-min-gpus-0", {"elasticity": {"min_gpus": 0}},
     "elasticity.min_gpus", ["got 0", "an integer >= 1"]),
    ("elastic-min-above-max",
     {"elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [2],
                     "min_gpus": 8, "max_gpus": 4}},
     "elasticity.min_gpus", ["got 8", "min_gpus (8) is greater than max_gpus (4)"]),
    ("elastic-min-time", {"elasticity": {"min_time": -1}},
     "elasticity.min_time", ["got -1", "a number >= 0"]),
    ("elastic-mp-v01",
     {"elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [2],
                     "version": 0.1, "model_parallel_size": 2, "num_gpus_per_node": 2}},
     "elasticity.version", ["got 0.1", "model_parallel_size 2 needs elasticity version 0.2"]),
    ("elastic-mp-per-node",
     {"elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [2],
                     "model_parallel_size": 4, "num_gpus_per_node": 6}},
     "elasticity.num_gpus_per_node", ["got 6", "not divisible by model_parallel_size (4)"]),
    ("elastic-with-batch-keys",
     {"train_batch_size": 32,
      "elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [2]}},
     "train_batch_size", ["got 32", "elasticity.enabled chooses",
                          "elasticity.ignore_non_elastic_batch_info: true"]),
    ("elastic-with-micro",
     {"train_micro_batch_size_per_gpu": 2,
      "elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [2]}},
     "train_micro_batch_size_per_gpu", ["got 2", "so train_micro_batch_size_per_gpu would not"]),
    ("zray-typo", {"zray": {"num_worker": 2}},
     "zray.num_worker", ["got 2", "did you mean 'num_workers'?"]),
    ("zray-model-spec", {"zray": {"model": "mymodel"}},
     "zray.model", ["got 'mymodel'"]),
    ("gas-alone", {"gradient_accumulation_steps": 4},
     "gradient_accumulation_steps", ["got 4", "also set train_batch_size or"]),
    ("inconsistent-triple",
     {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
     "train_batch_size", ["got 30", "(30) is not divisible by"]),
    ("checkpointing-modules", {"activation_checkpointing": {"modules": "Block"}},
     "activation_checkpointing.modules", ["got 'Block'", "'blocks'"]),
    ("comm-dtype", {"communication_data_type": "fp8"},
     "communication_data_type", ["got 'fp8'", "one of fp32, fp16, bf16"]),
    ("section-not-object", {"fp16": True},
     "fp16", ["got True", "an object with keys enabled"]),
    ("tp-conflict", {"autotp_size": 2, "tensor_parallel": {"tp_size": 4}},
     "autotp_size", ["got 2", "tensor_parallel.tp_size"]),
    ("tp-conflict-inside", {"tensor_parallel": {"autotp_size": 2, "tp_size": 4}},
     "tensor_parallel.autotp_size", ["got 2", "tensor_parallel.tp_size"]),
    ("tp-size-0", {"tensor_parallel": {"tp_size": 0}},
     "tensor_parallel.tp_size", ["got 0", "an integer > 0"]),
    ("tp-size-str", {"tensor_parallel": {"tp_size": "two"}},
     "tensor_parallel.tp_size", ["got 'two'", "an integer > 0"]),
    ("tp-size-bool", {"tensor_parallel": {"tp_size": True}},
     "tensor_parallel.tp_size", ["got True"]),
    ("autotp-negative", {"tensor_parallel": {"autotp_size": -1}},
     "tensor_parallel.autotp_size", ["got -1", "an integer >= 0 (0: off)"]),
    ("autotp-float", {"autotp_size": 1.5},
     "tensor_parallel.autotp_size", ["got 1.5", "an integer"]),
    ("cpu-offload-twice",
     {"zero_optimization": {"stage": 2, "cpu_offload": True, "offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.cpu_offload", ["got True"]),
    ("not-finite", {"gradient_clipping": float("inf")},
     "gradient_clipping", ["got inf"]),
]
# fmt: on


@pytest.mark.parametrize(
    ("raw", "key", "fragments"),
    [pytest.param(raw, key, frags, id=name) for name, raw, key, frags in MALFORMED],
)
def test_malformed_config_names_key_and_value(
    raw: dict[str, Any], key: str, fragments: list[str]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZrayConfigWarning)
        with pytest.raises(ConfigError) as err:
            Config.from_dict(raw)
    msg = str(err.value)
    assert msg.startswith(f"{key}: "), msg
    assert err.value.key == key
    for fragment in fragments:
        assert fragment in msg, msg
    if err.value.value is not NOT_GIVEN:
        assert "got " in msg


def test_config_error_type_attributes_and_pickle() -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"zero_optimization": {"stage": 5}})
    e = err.value
    assert isinstance(e, ValueError) and isinstance(e, ZrayError)
    assert (e.key, e.value, e.allowed) == ("zero_optimization.stage", 5, "one of 0, 1, 2, 3")
    assert str(e) == "zero_optimization.stage: got 5; allowed: one of 0, 1, 2, 3"
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is ConfigError and str(again) == str(e) and again.key == e.key
    missing = pickle.loads(pickle.dumps(ConfigError("a.b", NOT_GIVEN, "x", "required")))
    assert missing.value is NOT_GIVEN and str(missing) == "a.b: required; allowed: x"


def test_sections_built_in_python_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage: got 4"):
        ZeroConfig(stage=4)
    cfg = Config()
    with pytest.raises(ConfigError, match=r"gradient_clipping: got -0\.5"):
        dataclasses.replace(cfg, gradient_clipping=-0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gradient_clipping = 1.0  # type: ignore[misc]
    assert dataclasses.replace(
        cfg, zero_optimization=ZeroConfig(stage=3)
    ).zero_optimization.overlap_comm


# ---- individual sections --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "params", "decoupled"),
    [
        ("Adam", {}, True),  # DeepSpeed's Adam decouples weight decay by default
        ("adam", {"adam_w_mode": False}, False),
        ("ADAMW", {}, True),
        ("SGD", {"momentum": 0.9}, False),
    ],
)
def test_optimizer_decoupled_weight_decay(
    type_: str, params: dict[str, Any], decoupled: bool
) -> None:
    cfg = Config.from_dict({"optimizer": {"type": type_, "params": params}})
    assert cfg.optimizer is not None
    assert cfg.optimizer.type in ("Adam", "AdamW", "SGD")
    assert cfg.optimizer.decoupled_weight_decay is decoupled


def test_optimizer_params_auto_take_defaults() -> None:
    opt = OptimizerConfig(type="AdamW", lr="auto", betas="auto")  # type: ignore[arg-type]
    assert opt.lr == 1e-3 and opt.betas == (0.9, 0.999)
    assert opt.to_dict() == {
        "type": "AdamW",
        "params": {
            "lr": 1e-3,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "adam_w_mode": True,
            "bias_correction": True,
            "torch_adam": False,
        },
    }


def test_scheduler_defaults_filled_and_auto_resolved() -> None:
    cfg = Config.from_dict(
        {
            "optimizer": {"type": "Adam", "params": {"lr": 3e-4}},
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {"total_num_steps": "auto", "warmup_max_lr": "auto"},
            },
            "zray": {"max_steps": 500},
        }
    )
    assert cfg.scheduler is not None
    assert cfg.scheduler.resolved_params() == {
        "total_num_steps": 500,
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 3e-4,
        "warmup_num_steps": 1000,
        "warmup_type": "log",
    }
    one_cycle = SchedulerConfig(type="onecycle", params={"cycle_min_lr": 0.01, "cycle_max_lr": 0.1})
    assert one_cycle.type == "OneCycle"
    assert one_cycle.params["cycle_first_step_size"] == 2000
    assert one_cycle.params["cycle_second_step_size"] is None
    assert one_cycle.params["cycle_momentum"] is True
    cosine = SchedulerConfig(
        type="WarmupCosineLR", params={"total_num_steps": 10, "warmup_num_steps": 5}
    )
    assert cosine.params["cos_min_ratio"] == 0.0001 and cosine.params["warmup_min_ratio"] == 0.0


def test_scheduler_total_steps_auto_without_max_steps_is_deferred() -> None:
    cfg = Config.from_dict(
        {
            "scheduler": {
                "type": "WarmupCosineLR",
                "params": {"total_num_steps": "auto", "warmup_num_steps": 5},
            }
        }
    )
    assert cfg.scheduler is not None and cfg.scheduler.params["total_num_steps"] is None
    with pytest.raises(ConfigError, match=r"scheduler\.params\.total_num_steps: .*zray\.max_steps"):
        cfg.scheduler.resolved_params()
    later = dataclasses.replace(cfg, zray=dataclasses.replace(cfg.zray, max_steps=50))
    assert (
        later.scheduler is not None and later.scheduler.resolved_params()["total_num_steps"] == 50
    )


def test_compute_dtype() -> None:
    assert Config.from_dict({"fp16": {"enabled": True}}).compute_dtype == torch.float16
    assert Config.from_dict({"bf16": {"enabled": True}}).compute_dtype == torch.bfloat16
    assert Config.from_dict({"bf16": {"enabled": False}}).compute_dtype == torch.float32


def test_overlap_comm_follows_stage_unless_given() -> None:
    assert Config.from_dict({"zero_optimization": {"stage": 3}}).zero_optimization.overlap_comm
    assert not Config.from_dict({"zero_optimization": {"stage": 2}}).zero_optimization.overlap_comm
    given = {"zero_optimization": {"stage": 3, "overlap_comm": False}}
    assert Config.from_dict(given).zero_optimization.overlap_comm is False


def test_float_sizes_become_ints() -> None:
    zero = Config.from_dict(
        {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8, "sub_group_size": 1e9}}
    ).zero_optimization
    assert zero.reduce_bucket_size == 500_000_000 and type(zero.reduce_bucket_size) is int
    assert type(zero.sub_group_size) is int


def test_activation_checkpointing_modules() -> None:
    blocks = Config.from_dict({"activation_checkpointing": {"modules": "blocks"}})
    assert blocks.activation_checkpointing.modules == "blocks"
    named = Config.from_dict({"activation_checkpointing": {"modules": ["Block", "MLP"]}})
    assert named.activation_checkpointing.modules == ("Block", "MLP")


# ---- legacy spellings and ignored keys ------------------------------------------------------


def test_legacy_spellings() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg = Config.from_dict(
            {
                "bfloat16": {"enabled": True},
                "zero_optimization": {
                    "stage": 2,
                    "cpu_offload": True,
                    "cpu_offload_use_pin_memory": True,
                    "stage3_gather_fp16_weights_on_model_save": True,
                },
                "autotp_size": 2,
            }
        )
    assert cfg.bf16.enabled
    zero = cfg.zero_optimization
    assert zero.offload_optimizer.device == "cpu" and zero.offload_optimizer.pin_memory
    assert zero.stage3_gather_16bit_weights_on_model_save
    assert cfg.tensor_parallel.tp_size == 2
    messages = _config_warnings(record)
    assert any(m.startswith("bfloat16: deprecated spelling; write bf16") for m in messages)
    assert any(m.startswith("zero_optimization.cpu_offload: deprecated") for m in messages)
    with pytest.warns(ZrayConfigWarning, match="zero_optimization: boolean form is deprecated"):
        assert Config.from_dict({"zero_optimization": True}).zero_optimization.stage == 1
    assert Config.from_dict({"tensor_parallel": {"autotp_size": 0}}).tensor_parallel.tp_size == 1


def test_ignored_key_warns_exactly_once() -> None:
    raw = {"tensorboard": {"enabled": True, "output_path": "runs"}, "train_batch_size": 8}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = Config.from_dict(raw)
        Config.from_dict(raw)
        Config.load(dict(raw))
    messages = _config_warnings(record)
    assert messages == ["tensorboard: ignored by zray (use zray's Prometheus metrics)"]
    # The warning points at the caller, not at zray's parser.
    assert [w.filename for w in record] == [__file__]
    assert first.train_batch_size == 8


def test_ignored_keys_that_are_off_stay_silent() -> None:
    raw = {
        "wandb": {"enabled": False},
        "memory_breakdown": False,
        "zero_optimization": {"stage": 1, "ignore_unused_parameters": False},
        "activation_checkpointing": {"partition_activations": False, "number_checkpoints": None},
    }
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Config.from_dict(raw)
    assert _config_warnings(record) == []


def _nested(path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


@pytest.mark.parametrize("path", sorted(IGNORED_KEYS))
def test_every_ignored_key_is_accepted_with_a_warning(path: str) -> None:
    raw = _nested(path, True)
    if "optimizer" in raw:
        raw["optimizer"]["type"] = "Adam"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Config.from_dict(raw)
    assert _config_warnings(record) == [f"{path}: ignored by zray ({IGNORED_KEYS[path]})"]


# ---- elastic runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "lo", "hi", "elastic"),
    [(4, 4, 4, False), ([2, 8], 2, 8, True), ((2, 8), 2, 8, True), ([3, 3], 3, 3, False)],
    ids=["int", "list", "tuple", "min-equals-max"],
)
def test_num_workers_int_or_range(given: Any, lo: int, hi: int, elastic: bool) -> None:
    cfg = Config.from_dict({"zray": {"num_workers": given}})
    run = cfg.zray
    assert (run.min_workers, run.max_workers, run.elastic) == (lo, hi, elastic)
    written = cfg.to_dict()["zray"]["num_workers"]
    assert written == (list(given) if isinstance(given, list | tuple) else given)
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # Built in Python (as zray.fit does) the same rules hold.
    assert dataclasses.replace(Config().zray, num_workers=given).max_workers == hi


def test_elastic_run_settings() -> None:
    run = Config.from_dict(
        {"zray": {"scale_interval_s": 1, "replica_interval": 0, "min_wait_s": 30}}
    ).zray
    assert run.scale_interval_s == 1.0 and type(run.scale_interval_s) is float
    assert run.replica_interval == 0  # 0: no in-memory copies of a peer's optimizer shard
    assert run.min_wait_s == 30.0


# DeepSpeed's documented example block.
DS_ELASTICITY: dict[str, Any] = {
    "enabled": True,
    "max_train_batch_size": 2000,
    "micro_batch_sizes": [2, 4, 6],
    "min_gpus": 1,
    "max_gpus": 10000,
    "min_time": 20,
    "prefer_larger_batch": True,
    "ignore_non_elastic_batch_info": False,
    "version": 0.1,
}


def test_elasticity_block_parses_and_round_trips() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg = Config.from_dict({"elasticity": DS_ELASTICITY, "zray": {"num_workers": [1, 8]}})
    # Read, not ignored any more; min_time alone is zray's own decision (it is not read).
    got = _config_warnings(record)
    assert [w.split(":")[0] for w in got] == ["elasticity.min_time"], got
    el = cfg.elasticity
    assert el.enabled and el.max_train_batch_size == 2000 and el.micro_batch_sizes == (2, 4, 6)
    assert (el.min_time, el.version, el.dp_per_node) == (20.0, 0.1, 1)
    assert "elasticity" not in IGNORED_KEYS
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


@pytest.mark.parametrize(("written", "version"), [("0.2", 0.2), ("0.1", 0.1), (0.2, 0.2)])
def test_elasticity_version_as_deepspeed_reads_it(written: Any, version: float) -> None:
    # DeepSpeed reads the version with float(), so a JSON string works there and here.
    assert Config.from_dict({"elasticity": {"version": written}}).elasticity.version == version
    with pytest.raises(ConfigError, match=r"elasticity\.version: got 'latest'"):
        Config.from_dict({"elasticity": {"version": "latest"}})


def test_disabled_elasticity_leaves_the_batch_keys_alone() -> None:
    # Only an enabled block owns the batch sizes; a disabled one is not even cross-checked,
    # as DeepSpeed reads it only when enabled.
    raw = {"train_batch_size": 8, "elasticity": {"max_train_batch_size": 1, "min_gpus": 9}}
    cfg = Config.from_dict(raw)
    assert cfg.resolve_batch(2) == BatchSizes(8, 4, 1)


def test_elasticity_with_auto_batch_keys_is_no_conflict() -> None:
    raw = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "elasticity": {"enabled": True, "max_train_batch_size": 16, "micro_batch_sizes": [2, 4]},
        "zray": {"num_workers": [1, 4]},
    }
    assert Config.from_dict(raw).resolve_batch(2) == BatchSizes(16, 4, 2)


def test_ignore_non_elastic_batch_info_warns_and_overrides() -> None:
    raw = {
        "train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "elasticity": {
            "enabled": True,
            "max_train_batch_size": 16,
            "micro_batch_sizes": [2, 4],
            "ignore_non_elastic_batch_info": True,
        },
    }
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg = Config.from_dict(raw)
    assert _config_warnings(record) == [
        "train_batch_size: overridden by the elasticity plan (elasticity.enabled is true)",
        "gradient_accumulation_steps: overridden by the elasticity plan (elasticity.enabled is true)",
    ]
    assert cfg.resolve_batch(1) == BatchSizes(16, 4, 4)  # the plan, not train_batch_size 2


def test_tp_size_must_divide_the_world() -> None:
    """The mesh is world = dp x tp: a tp_size that does not divide the world names both."""
    from zray.parallel.context import ParallelContext

    ctx = ParallelContext.single_process("cpu")
    assert ctx.with_tensor_parallel(1) is ctx
    assert (ctx.tp_rank, ctx.tp_size, ctx.tp_group) == (0, 1, None)
    with pytest.raises(ConfigError) as err:
        ctx.with_tensor_parallel(2)
    assert err.value.key == "tensor_parallel.tp_size"
    assert "got 2" in str(err.value) and "a divisor of the world size (1)" in str(err.value)
    with pytest.raises(ConfigError, match=r"tensor_parallel.tp_size: .*got 0"):
        ctx.with_tensor_parallel(0)
    # Through deepspeed.initialize's door: one process cannot hold a tensor group of 2.
    import torch

    import zray

    with pytest.raises(ConfigError, match=r"world size \(1\)"):
        zray.initialize(model=torch.nn.Linear(2, 2), config={"autotp_size": 2})


def test_fit_refuses_tensor_parallel_with_elasticity() -> None:
    """DeepSpeed's elastic batch choice counts every worker as a data-parallel rank: with tensor
    slicing it would pick a wrong batch, so zray.fit refuses the pair, before Ray starts."""
    import zray

    cfg = {
        "tensor_parallel": {"tp_size": 2},
        "elasticity": {"enabled": True, "micro_batch_sizes": [2], "max_train_batch_size": 16},
        "zray": {"num_workers": [2, 4]},
    }
    with pytest.raises(ConfigError, match=r"tensor_parallel\.tp_size.*1 while elasticity"):
        zray.fit(model=lambda: None, data="unused", config=cfg)


def test_zray_zero_keys() -> None:
    """zray's own zero_optimization keys: defaults, and a bad value names the choices."""
    zero = Config.from_dict({"train_batch_size": 8}).zero_optimization
    assert zero.stage3_gather == "auto" and zero.overlap_param_gather is False
    cfg = {"train_batch_size": 8, "zero_optimization": {"stage": 3, "stage3_gather": "peer"}}
    with pytest.raises(
        ConfigError, match=r"zero_optimization.stage3_gather.*nccl, peer_copy, auto"
    ):
        Config.from_dict(cfg)


def test_overriding_max_steps_moves_an_auto_schedule(tmp_path: Path) -> None:
    """`zray fit --steps N` / `fit(max_steps=N)`: total_num_steps "auto" follows N, not the file's
    max_steps; a number written in the file stays."""
    raw = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": "auto", "warmup_num_steps": 5},
        },
        "zray": {"max_steps": 100},
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    for source in (raw, str(path), Config.from_dict(raw)):
        cfg = Config.load(source, zray={"max_steps": 30})
        assert cfg.zray.max_steps == 30
        assert (
            cfg.scheduler is not None and cfg.scheduler.resolved_params()["total_num_steps"] == 30
        )
    params = {"total_num_steps": 80, "warmup_num_steps": 5}
    fixed = {**raw, "scheduler": {"type": "WarmupCosineLR", "params": params}}
    cfg = Config.load(fixed, zray={"max_steps": 30})
    assert cfg.scheduler is not None and cfg.scheduler.resolved_params()["total_num_steps"] == 80
    assert Config.load(raw).zray.max_steps == 100  # no override: as written


def test_scheduler_sections_follow_the_schedules() -> None:
    """Each schedule's section declares exactly the constructor's params (bar the optimizer and
    the resume position), and its defaults are the constructor's: one place for defaults."""
    import inspect

    from zray import schedulers
    from zray.config.schedulers import SCHEDULER_TYPES

    assert set(SCHEDULER_TYPES) == set(schedulers.SCHEDULERS) - {"LRRangeTest"}
    for name, section in SCHEDULER_TYPES.items():
        signature = inspect.signature(schedulers.SCHEDULERS[name].__init__).parameters
        resume = ("self", "optimizer", "last_batch_iteration")
        taken = {k: p for k, p in signature.items() if k not in resume}
        fields = {f.name: f for f in dataclasses.fields(section)}
        assert set(fields) == set(taken), name
        for k, p in taken.items():
            if p.default is inspect.Parameter.empty:
                assert fields[k].default is dataclasses.MISSING, (name, k)
            else:
                assert fields[k].default == p.default, (name, k)

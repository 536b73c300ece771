"""One typed config tree that reads DeepSpeed's JSON config as DeepSpeed users write it.

    cfg = Config.load("ds_config.json")        # or a dict, a .yaml file, a Config, or None
    sizes = cfg.resolve_batch(dp_world_size=8)  # train_batch_size = micro * gas * world

Sections are frozen dataclasses named after DeepSpeed's keys (`cfg.zero_optimization.stage`,
`cfg.fp16.loss_scale`, ...), plus zray's own run section `cfg.zray`. Every value is checked when a
section is built, from JSON or in Python; a bad key or value raises `ConfigError` naming the
dotted key, the value and what is allowed. "auto" (written by Hugging Face) means "use the default
/ derive it". DeepSpeed keys zray knowingly ignores are listed in `IGNORED_KEYS` and warned about
once per process. Change a built config with `dataclasses.replace`, which re-runs the checks.

The package, one module per concept, imports pointing down:
    fields      how a section declares and checks its fields (the one way), "auto", warnings
    ignored     DeepSpeed keys zray knowingly ignores, and why
    schedulers  the learning-rate schedulers' parameters and defaults
    sections    DeepSpeed's sections (optimizer, fp16, bf16, zero_optimization, ...)
    run         zray's own `zray` section (workers, checkpoints, metrics) and `elasticity`
    batch       batch arithmetic for every world size (fixed batch and DeepSpeed elasticity)
    root        `Config`, the whole tree
"""

from __future__ import annotations

from zray.config.batch import BatchSizes
from zray.config.fields import AUTO, IGNORED_KEYS
from zray.config.root import Config
from zray.config.run import ElasticityConfig, RunConfig
from zray.config.schedulers import SCHEDULER_TYPES
from zray.config.sections import (
    OPTIMIZER_PARAMS,
    ActivationCheckpointingConfig,
    BF16Config,
    DataTypesConfig,
    FlopsProfilerConfig,
    FP16Config,
    OffloadConfig,
    OffloadOptimizerConfig,
    OffloadParamConfig,
    OptimizerConfig,
    SchedulerConfig,
    TensorParallelConfig,
    ZeroConfig,
)
from zray.errors import ConfigError, ZrayConfigWarning

__all__ = [
    "AUTO",
    "IGNORED_KEYS",
    "OPTIMIZER_PARAMS",
    "SCHEDULER_TYPES",
    "ActivationCheckpointingConfig",
    "BF16Config",
    "BatchSizes",
    "Config",
    "ConfigError",
    "DataTypesConfig",
    "ElasticityConfig",
    "FP16Config",
    "FlopsProfilerConfig",
    "OffloadConfig",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "OptimizerConfig",
    "RunConfig",
    "SchedulerConfig",
    "TensorParallelConfig",
    "ZeroConfig",
    "ZrayConfigWarning",
]

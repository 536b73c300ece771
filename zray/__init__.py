"""zray: DeepSpeed's training techniques (ZeRO 0-3, mixed precision, offload) on Ray.

The public API is what `__all__` lists; everything else is internal.
"""

__version__ = "0.1.0"

from zray import zero
from zray.config import Config
from zray.engine import Engine
from zray.errors import ConfigError, NonFiniteError, ZrayError
from zray.fit import FitResult, fit
from zray.initialize import add_config_arguments, init_distributed, initialize
from zray.parallel.context import ParallelContext

__all__ = [
    "Config",
    "ConfigError",
    "Engine",
    "FitResult",
    "NonFiniteError",
    "ParallelContext",
    "ZrayError",
    "__version__",
    "add_config_arguments",
    "fit",
    "init_distributed",
    "initialize",
    "zero",
]

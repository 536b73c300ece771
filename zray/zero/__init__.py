"""ZeRO: partitioned optimizer states (1), gradients (2) and parameters (3)."""

from zray.zero.gathered import GatheredParameters
from zray.zero.optimizer import ZeroOptimizer
from zray.zero.partition import StagePlan

__all__ = ["GatheredParameters", "StagePlan", "ZeroOptimizer"]

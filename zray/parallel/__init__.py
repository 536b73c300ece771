"""Process groups and meshes (data parallel now; tensor slicing later)."""

from zray.parallel.context import ParallelContext, init_distributed

__all__ = ["ParallelContext", "init_distributed"]

"""Process groups and the data x tensor mesh (`context`), and tensor slicing (`tensor`)."""

from zray.parallel.context import ParallelContext, init_distributed

__all__ = ["ParallelContext", "init_distributed"]

"""Checkpoints: atomic per-rank shards now; the resharding format comes with the Ray runtime."""

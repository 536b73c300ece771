"""Metrics: one registry of every metric, the Prometheus exporter, FLOPs / MFU accounting."""

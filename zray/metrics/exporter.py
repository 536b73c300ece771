"""The controller's Prometheus endpoint and JSONL log for a whole run.

A custom collector builds the metric families from the latest snapshot of every rank at scrape
time, so counters keep the workers' own running totals (a restarted worker's counter resets,
which Prometheus' rate() handles) and a rank that is gone stops being exported.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from zray.metrics.registry import METRICS, Kind, MetricSpec, Source

log = logging.getLogger("zray.metrics")

_PENDING_MAX = 10_000  # metrics log lines kept while the file cannot be written


def _append_whole(path: Path, data: bytes) -> None:
    """Append `data` to `path` entirely or not at all: a full disk can take part of a write,
    which is taken back (the log would otherwise hold half a line)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


class RunMetrics(Collector):
    """Latest values for one run: per rank (worker metrics) and the controller's own."""

    def __init__(self, run: str, jsonl: Path | None = None) -> None:
        self.run = run
        self._lock = threading.Lock()
        self._ranks: dict[int, tuple[str, str, dict[str, Any]]] = {}  # rank -> node, stage, vals
        self._controller: dict[str, Any] = {}
        self.jsonl = jsonl
        self._logged_step: dict[int, float] = {}
        # Lines not yet written (the disk was full or read-only): retried with the next line,
        # at most _PENDING_MAX kept. Observability never takes training down.
        self._pending: list[str] = []
        self.write_failures = 0
        self._warned: int | None = None  # the errno last warned about
        if jsonl is not None:
            try:
                jsonl.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self._failed(e)

    def update_rank(self, rank: int, node: str, stage: int, values: dict[str, Any]) -> None:
        with self._lock:
            self._ranks[rank] = (node, str(stage), values)
        step = values.get("zray_step")
        if self.jsonl is not None and step is not None and self._logged_step.get(rank) != step:
            self._logged_step[rank] = step
            line = {
                "time": time.time(),
                "run": self.run,
                "rank": rank,
                "node": node,
                "stage": stage,
                **values,
            }
            self._append(json.dumps(line, default=float) + "\n")

    def _append(self, text: str) -> None:
        assert self.jsonl is not None
        self._pending.append(text)
        del self._pending[:-_PENDING_MAX]
        try:
            _append_whole(self.jsonl, "".join(self._pending).encode())
        except OSError as e:
            self._failed(e)
            return
        if self._warned is not None:
            log.warning("metrics log %s: writing again", self.jsonl)
            self._warned = None
        self._pending.clear()

    def _failed(self, e: OSError) -> None:
        self.write_failures += 1
        if self._warned != e.errno:
            self._warned = e.errno
            log.warning(
                "metrics log %s: %s (errno %s); training goes on, the last %d lines are kept "
                "and written when the file can be written again",
                self.jsonl,
                e.strerror or e,
                e.errno,
                _PENDING_MAX,
            )

    def keep_ranks(self, ranks: set[int]) -> None:
        """Forget ranks that no longer exist (after a restart at a smaller size)."""
        with self._lock:
            for r in list(self._ranks):
                if r not in ranks:
                    del self._ranks[r]

    def update_controller(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._controller = dict(values)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            ranks = dict(self._ranks)
            controller = dict(self._controller)
        for spec in METRICS:
            family = _family(spec)
            if spec.source is Source.WORKER:
                for rank, (node, stage, values) in sorted(ranks.items()):
                    _add(family, spec, [self.run, str(rank), node, stage], values.get(spec.name))
            else:
                _add(family, spec, [self.run], controller.get(spec.name))
            yield family


def _family(spec: MetricSpec) -> Metric:
    name = spec.name.removesuffix("_total") if spec.kind is Kind.COUNTER else spec.name
    cls = CounterMetricFamily if spec.kind is Kind.COUNTER else GaugeMetricFamily
    return cls(name, spec.help, labels=list(spec.labels))


def _add(family: Metric, spec: MetricSpec, base: list[str], value: Any) -> None:
    if value is None:
        return
    if spec.extra_labels:
        for label, v in dict(value).items():
            if v is not None and not math.isnan(float(v)):
                family.add_metric([*base, str(label)], float(v))
    elif not math.isnan(float(value)):
        family.add_metric(base, float(value))


class Exporter:
    """Serves a RunMetrics on host:port (loopback by default; port 0 picks a free one)."""

    def __init__(self, metrics: RunMetrics, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(metrics)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or port == 0:
                raise
            # Another run (or program) holds the port: serve on a free one and say where.
            log.warning("metrics port %s:%d is in use (%s); serving on a free port", host, port, e)
            self.server, self.thread = start_http_server(0, addr=host, registry=self.registry)
        self.host, self.port = host, int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

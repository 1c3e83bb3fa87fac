"""Prometheus metrics, read from the batch store when scraped (so every runner counts).

Batches run in this process, in runners and in workers; what they did is in the store, so
``/metrics`` reads it there instead of counting in one process:

* ``batchops_batches{state}`` and ``batchops_items{state}`` — gauges over every batch;
  items are ``succeeded``, ``failed``, ``pending`` (of queued or processing batches) and
  ``skipped`` (never run: their batch was cancelled or failed);
* ``batchops_queue_age_seconds`` — how long the oldest queued batch has waited;
* ``batchops_item_latency_seconds`` — histogram of the time from a batch's submission to each
  item's result being recorded, for items recorded since this API process started (the store
  is tailed by chunk completion time at each scrape);
* ``batchops_item_retries_total`` — extra attempts items needed (``attempts - 1``), same tail;
* ``batchops_api_batches_submitted_total{mode}`` / ``batchops_api_operations_submitted_total``
  — batches this API process accepted.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from batchops.runtime import Runtime
from batchops.schemas import BatchState
from batchops.tables import batch_chunks, batches, utcnow

__all__ = ["ApiMetrics", "StoreCollector"]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
                   float("inf"))
# A chunk's transaction may commit a little after the completion time it records.
_TAIL_OVERLAP = timedelta(seconds=60)
_ACTIVE = (BatchState.QUEUED.value, BatchState.PROCESSING.value)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class StoreCollector(Collector):
    """Collects the store-derived metrics; ``runtime`` is read at each scrape."""

    def __init__(self, runtime: Callable[[], Runtime]) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self._since = utcnow()
        self._seen: dict[tuple[str, int, datetime], datetime] = {}
        self._buckets = [0] * len(LATENCY_BUCKETS)
        self._latency_sum = 0.0
        self._retries = 0

    def describe(self) -> Iterable[Metric]:
        return []  # no store access when registered

    def collect(self) -> Iterable[Metric]:
        runtime = self._runtime()
        with runtime.store.read() as conn:
            b = batches.c
            sums = [sa.func.coalesce(sa.func.sum(col), 0)
                    for col in (b.total, b.completed, b.succeeded, b.failed)]
            by_state = conn.execute(sa.select(b.status, sa.func.count(), *sums)
                                    .group_by(b.status)).all()
            oldest = conn.execute(sa.select(sa.func.min(batches.c.created_at)).where(
                batches.c.status == BatchState.QUEUED.value)).scalar()
            with self._lock:
                self._tail(conn)
                buckets, latency_sum, retries = list(self._buckets), self._latency_sum, \
                    self._retries

        batch_gauge = GaugeMetricFamily("batchops_batches", "Batches by state",
                                        labels=["state"])
        counts = {state.value: 0 for state in BatchState}
        items = {"succeeded": 0, "failed": 0, "pending": 0, "skipped": 0}
        for status, count, total, completed, succeeded, failed in by_state:
            counts[status] = counts.get(status, 0) + int(count)
            items["succeeded"] += int(succeeded)
            items["failed"] += int(failed)
            remaining = int(total) - int(completed)
            items["pending" if status in _ACTIVE else "skipped"] += max(remaining, 0)
        for state, count in counts.items():
            batch_gauge.add_metric([state], count)
        yield batch_gauge

        item_gauge = GaugeMetricFamily("batchops_items", "Items of all batches by state",
                                       labels=["state"])
        for state, count in items.items():
            item_gauge.add_metric([state], count)
        yield item_gauge

        age = (utcnow() - _aware(oldest)).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily("batchops_queue_age_seconds",
                                "Seconds the oldest queued batch has waited", value=age)

        cumulative, running = [], 0
        for bound, count in zip(LATENCY_BUCKETS, buckets, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
        yield HistogramMetricFamily(
            "batchops_item_latency_seconds",
            "Seconds from a batch's submission to each item's recorded result",
            buckets=cumulative, sum_value=latency_sum)
        yield CounterMetricFamily("batchops_item_retries",
                                  "Extra attempts items needed (attempts - 1)", value=retries)

    def _tail(self, conn: sa.Connection) -> None:
        """Observe the chunks recorded since the last scrape (called under the lock)."""
        c = batch_chunks.c
        latest = max(self._seen.values(), default=self._since)
        floor = max(self._since, latest - _TAIL_OVERLAP)
        rows = conn.execute(
            sa.select(c.batch_id, c.chunk_index, c.start, c.end, c.completed_at, c.results,
                      batches.c.created_at)
            .join(batches, batches.c.id == c.batch_id)
            .where(c.done.is_(True), c.completed_at >= floor)).all()
        for row in rows:
            completed_at = _aware(row.completed_at)
            key = (row.batch_id, row.chunk_index, completed_at)
            if key in self._seen or completed_at < self._since:
                continue
            self._seen[key] = completed_at
            items = row.end - row.start
            latency = max((completed_at - _aware(row.created_at)).total_seconds(), 0.0)
            for i, bound in enumerate(LATENCY_BUCKETS):
                if latency <= bound:
                    self._buckets[i] += items
                    break
            self._latency_sum += latency * items
            if row.results:
                self._retries += sum(max(int(r.get("attempts", 1)) - 1, 0)
                                     for r in json.loads(row.results))
        newest = max(self._seen.values(), default=self._since)
        self._seen = {k: v for k, v in self._seen.items() if v >= newest - _TAIL_OVERLAP}


class ApiMetrics:
    """The API process's registry: the store collector and what this process accepted."""

    def __init__(self, runtime: Callable[[], Runtime]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(runtime))
        self.batches_submitted = Counter(
            "batchops_api_batches_submitted", "Batches accepted by this API process",
            labelnames=["mode"], registry=self.registry)
        self.operations_submitted = Counter(
            "batchops_api_operations_submitted", "Operations accepted by this API process",
            registry=self.registry)

"""Metrics that live in shared memory, and the Prometheus collector that reads them.

Every metric value is a cell in the segment, so any worker can answer ``/metrics`` for
all of them: there are no per-process files to merge and nothing grows with restarts.
Label sets are fixed when the layout is built (routes and status classes below), which
is what makes a fixed-size segment possible.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from llmkit import cluster
from shm import Counter, Histogram, LayoutBuilder, WorkerSlot
from shm.layout import Layout
from shm.segment import Segment

ROUTES = ("chat", "embeddings", "models", "health", "metrics", "admin", "other")
STATUSES = (200, 400, 401, 403, 404, 405, 408, 413, 422, 429, 499, 500, 502, 503, 504)
DURATION_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
_ROUTE_INDEX = {name: i for i, name in enumerate(ROUTES)}
_STATUS_INDEX = {code: i for i, code in enumerate(STATUSES)}
_OTHER_STATUS = len(STATUSES)


def declare(builder: LayoutBuilder, worker_slots: int) -> None:
    """Add the metric regions and worker slots to a layout being built."""
    builder.add("workers", WorkerSlot.KIND, worker_slots, WorkerSlot.SIZE)
    builder.add("worker_restarts", Counter.KIND, 1, Counter.SIZE)
    builder.add("http_requests", Counter.KIND, len(ROUTES) * (len(STATUSES) + 1), Counter.SIZE)
    size = Histogram.size_for(DURATION_BOUNDS)
    builder.add("http_duration", Histogram.KIND, len(ROUTES), size, DURATION_BOUNDS)


def route_index(route: str) -> int:
    return _ROUTE_INDEX.get(route, _ROUTE_INDEX["other"])


def status_index(status: int) -> int:
    return _STATUS_INDEX.get(status, _OTHER_STATUS)


class Metrics:
    """Typed views over the metric regions of one segment."""

    def __init__(self, segment: Segment, layout: Layout) -> None:
        a = segment.atomics
        self.segment_bytes = segment.size
        self.workers = [WorkerSlot(a, off) for off in _offsets(layout, "workers")]
        self.worker_restarts = Counter(a, layout["worker_restarts"].offset)
        self.http_requests = [Counter(a, off) for off in _offsets(layout, "http_requests")]
        self.http_duration = [
            Histogram(a, off, DURATION_BOUNDS) for off in _offsets(layout, "http_duration")
        ]
        self.cluster = cluster.status_of(a, layout)

    def record_http(self, route: int, status: int, seconds: float) -> None:
        """Count one finished HTTP request; ``route`` from ``route_index``."""
        self.http_requests[route * (len(STATUSES) + 1) + status_index(status)].inc()
        self.http_duration[route].observe(seconds)

    def requests_by(self, route: str, status: int) -> int:
        index = route_index(route) * (len(STATUSES) + 1) + status_index(status)
        return self.http_requests[index].value()


def _offsets(layout: Layout, name: str) -> list[int]:
    region = layout[name]
    return [region.offset_of(i) for i in range(region.count)]


class ShmCollector(Collector):
    """A prometheus_client collector that reads every value straight from shm."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        yield self._http_requests()
        yield self._http_duration()
        yield from self._workers()
        if self._m.cluster is not None:
            yield from cluster.metric_families(self._m.cluster)

    def _http_requests(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "llmkit_http_requests", "HTTP requests finished, by route and status code.",
            labels=("route", "status"),
        )  # fmt: skip
        width = len(STATUSES) + 1
        for r, route in enumerate(ROUTES):
            for s, code in enumerate((*STATUSES, "other")):
                value = self._m.http_requests[r * width + s].value()
                if value:
                    family.add_metric((route, str(code)), value)
        return family

    def _http_duration(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "llmkit_http_request_duration_seconds",
            "Time from request received to response finished, by route.",
            labels=("route",),
        )
        for route, hist in zip(ROUTES, self._m.http_duration, strict=True):
            snap = hist.snapshot()
            if not snap.observations:
                continue
            bounds = [*(str(b) for b in hist.bounds), "+Inf"]
            family.add_metric((route,), list(zip(bounds, snap.cumulative, strict=True)), snap.sum)
        return family

    def _workers(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        restarts = CounterMetricFamily(
            "llmkit_worker_restarts", "Workers replaced after dying or stalling."
        )
        restarts.add_metric((), self._m.worker_restarts.value())
        yield restarts
        in_flight = GaugeMetricFamily(
            "llmkit_worker_in_flight", "Requests in flight, by worker slot.", labels=("slot",)
        )
        alive = 0
        for i, slot in enumerate(self._m.workers):
            if slot.pid:
                alive += 1
                in_flight.add_metric((str(i),), slot.in_flight)
        yield in_flight
        yield GaugeMetricFamily("llmkit_workers", "Worker processes alive.", value=alive)
        yield GaugeMetricFamily(
            "llmkit_shm_segment_bytes", "Size of the shared-memory segment.",
            value=self._m.segment_bytes,
        )  # fmt: skip

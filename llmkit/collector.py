"""The prometheus_client collector over shared memory, and how other modules join it.

``ShmCollector.collect`` reads every value straight from the segment at scrape time, so
any worker answers for all of them and a restarted worker resets nothing. Series whose
value is zero are left out (a fresh server exposes only what happened), except gauges
that describe the present (breaker state, workers, segment size).

Regions declared by other modules are exported through a ``MetricSource``: a pair of
``declare(builder, config)`` (called while the layout is built, so the region is part
of the layout hash) and ``collect(atomics, layout, config)`` (called on every scrape,
yielding prometheus_client metric families). List the source in
``llmkit.state.METRIC_SOURCES``; nothing registers itself at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from llmkit.breaker import BreakerCell
from llmkit.config import Config
from llmkit.metrics import (
    ATTEMPTS,
    COST,
    DIMENSIONS,
    ERROR_KINDS,
    ERRORS,
    FALLBACKS,
    LEVELS,
    MODEL_ROUTES,
    RETRIES,
    ROUTES,
    STATUS_CLASSES,
    STATUSES,
    TOKENS_IN,
    TOKENS_OUT,
    Metrics,
)
from shm import Atomics, BreakerWord, Histogram, LayoutBuilder
from shm.layout import Layout

TARGET_LABELS = ("model", "deployment", "provider")


@dataclass(frozen=True)
class MetricSource:
    """A shm region declared and exported by another module (the multiplexer ...)."""

    name: str
    declare: Callable[[LayoutBuilder, Config], None]
    collect: Callable[[Atomics, Layout, Config], Iterable[Metric]]


class ShmCollector(Collector):
    """A prometheus_client collector that reads every value straight from shm."""

    def __init__(self, metrics: Metrics, sources: Sequence[MetricSource] = ()) -> None:
        self._m = metrics
        self._sources = tuple(sources)
        self._labels = metrics.series.targets

    def collect(self) -> Iterator[Metric]:
        yield self._http_requests()
        yield self._http_duration()
        yield from self._workers()
        yield from self._targets()
        yield from self._histograms()
        yield from self._keys()
        yield self._refusals()
        yield from self._breakers()
        yield self._deployment_info()
        m = self._m
        for source in self._sources:
            yield from source.collect(m.atomics, m.layout, m.config)

    # -- HTTP and workers ---------------------------------------------------------

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
            _add_histogram(family, (route,), hist)
        return family

    def _workers(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "llmkit_worker_restarts", "Workers replaced after dying or stalling."
        )
        restarts.add_metric((), self._m.worker_restarts.value())
        yield restarts
        in_flight = GaugeMetricFamily(
            "llmkit_worker_in_flight", "Requests in flight, by worker slot.", labels=("slot",)
        )
        connections = GaugeMetricFamily(
            "llmkit_worker_connections",
            "HTTP connections held open, by worker slot (as of the worker's last count: at "
            "each accept on the shared socket and every heartbeat).",
            labels=("slot",),
        )
        alive = 0
        for i, slot in enumerate(self._m.workers):
            if slot.pid:
                alive += 1
                in_flight.add_metric((str(i),), slot.in_flight)
                connections.add_metric((str(i),), slot.connections)
        yield in_flight
        yield connections
        yield GaugeMetricFamily("llmkit_workers", "Worker processes alive.", value=alive)
        yield GaugeMetricFamily(
            "llmkit_shm_segment_bytes", "Size of the shared-memory segment.",
            value=self._m.segment_bytes,
        )  # fmt: skip

    # -- per target series --------------------------------------------------------

    def _targets(self) -> Iterator[Metric]:
        load, loadf = self._m.atomics.load_i64, self._m.atomics.load_f64
        requests = CounterMetricFamily(
            "llmkit_requests", "Model requests finished, by alias, deployment, provider, "
            "route and status class.", labels=(*TARGET_LABELS, "route", "status_class"),
        )  # fmt: skip
        tokens = CounterMetricFamily(
            "llmkit_tokens", "Tokens used (gen_ai.client.token.usage), by direction.",
            labels=(*TARGET_LABELS, "direction"),
        )  # fmt: skip
        cost = CounterMetricFamily(
            "llmkit_cost_usd", "Cost of answered requests in US dollars.", labels=TARGET_LABELS
        )
        simple = {
            RETRIES: CounterMetricFamily(
                "llmkit_retries", "Attempts repeated on the same deployment.", labels=TARGET_LABELS
            ),
            FALLBACKS: CounterMetricFamily(
                "llmkit_fallbacks",
                "Attempts that failed here and moved to the next deployment.",
                labels=TARGET_LABELS,
            ),  # fmt: skip
            ATTEMPTS: CounterMetricFamily(
                "llmkit_upstream_attempts", "Attempts sent upstream.", labels=TARGET_LABELS
            ),
        }
        errors = CounterMetricFamily(
            "llmkit_upstream_errors", "Failed upstream attempts, by kind.",
            labels=(*TARGET_LABELS, "kind"),
        )  # fmt: skip
        for index, labels in enumerate(self._labels):
            base = self._m.targets[index]
            for r, route in enumerate(MODEL_ROUTES):
                for c, status_class in enumerate(STATUS_CLASSES):
                    value = load(base + 8 * (3 * r + c))
                    if value:
                        requests.add_metric((*labels, route, status_class), value)
            for word, direction in ((TOKENS_IN, "input"), (TOKENS_OUT, "output")):
                value = load(base + word)
                if value:
                    tokens.add_metric((*labels, direction), value)
            spent = loadf(base + COST)
            if spent:
                cost.add_metric(labels, spent)
            for word, family in simple.items():
                value = load(base + word)
                if value:
                    family.add_metric(labels, value)
            for k, kind in enumerate(ERROR_KINDS):
                value = load(base + ERRORS + 8 * k)
                if value:
                    errors.add_metric((*labels, kind), value)
        yield from (requests, tokens, cost, *simple.values(), errors)

    def _histograms(self) -> Iterator[Metric]:
        duration = HistogramMetricFamily(
            "llmkit_request_duration_seconds",
            "Model request duration (gen_ai.server.request.duration), by serving deployment.",
            labels=TARGET_LABELS,
        )
        ttft = HistogramMetricFamily(
            "llmkit_time_to_first_token_seconds",
            "Time to first token of streams (gen_ai.server.time_to_first_token).",
            labels=TARGET_LABELS,
        )
        for labels, d, t in zip(self._labels, self._m.duration, self._m.ttft, strict=True):
            _add_histogram(duration, labels, d)
            _add_histogram(ttft, labels, t)
        yield duration
        yield ttft

    def _keys(self) -> Iterator[Metric]:
        load = self._m.atomics.load_i64
        requests = CounterMetricFamily(
            "llmkit_key_requests", "Model requests by virtual key name.", labels=("key",)
        )
        tokens = CounterMetricFamily(
            "llmkit_key_tokens", "Tokens used by virtual key name.", labels=("key", "direction")
        )
        cost = CounterMetricFamily(
            "llmkit_key_cost_usd", "Cost in US dollars by virtual key name.", labels=("key",)
        )
        for name, base in zip(self._m.series.keys, self._m.keys, strict=True):
            if load(base):
                requests.add_metric((name,), load(base))
            for word, direction in ((8, "input"), (16, "output")):
                if load(base + word):
                    tokens.add_metric((name, direction), load(base + word))
            spent = self._m.atomics.load_f64(base + 24)
            if spent:
                cost.add_metric((name,), spent)
        yield from (requests, tokens, cost)

    def _refusals(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "llmkit_rate_limit_refusals", "Requests refused by this gateway's rate limits.",
            labels=("level", "dimension"),
        )  # fmt: skip
        load, base = self._m.atomics.load_i64, self._m.refusals
        for li, level in enumerate(LEVELS):
            for di, dimension in enumerate(DIMENSIONS):
                value = load(base + 8 * (3 * li + di))
                if value:
                    family.add_metric((level, dimension), value)
        return family

    def _breakers(self) -> Iterator[Metric]:
        if "breaker.state" not in self._m.layout:
            return
        region = self._m.layout["breaker.state"]
        load = self._m.atomics.load_i64
        state = GaugeMetricFamily(
            "llmkit_breaker_state", "Circuit state per deployment: 0 closed, 1 open, "
            "2 half-open.", labels=TARGET_LABELS,
        )  # fmt: skip
        transitions = CounterMetricFamily(
            "llmkit_breaker_transitions", "Circuit state changes per deployment (the breaker "
            "word's generation; wraps after 2**22).", labels=TARGET_LABELS,
        )  # fmt: skip
        opened = CounterMetricFamily(
            "llmkit_breaker_opened", "Times a deployment's circuit opened.", labels=TARGET_LABELS
        )
        for i in range(region.count):
            off = region.offset_of(i)
            word = BreakerWord.unpack(load(off + BreakerCell.WORD))
            labels = self._labels[i]
            state.add_metric(labels, word.state)
            transitions.add_metric(labels, word.generation)
            opened.add_metric(labels, load(off + BreakerCell.OPENED))
        yield from (state, transitions, opened)

    def _deployment_info(self) -> InfoMetricFamily:
        info = InfoMetricFamily(
            "llmkit_deployment", "Configured deployments and the model each one asks for.",
            labels=TARGET_LABELS,
        )  # fmt: skip
        for labels, upstream in zip(self._labels, self._m.series.upstream_models, strict=False):
            info.add_metric(labels, {"upstream_model": upstream})
        return info


def _add_histogram(family: HistogramMetricFamily, labels: Sequence[str], hist: Histogram) -> None:
    snap = hist.snapshot()
    if not snap.observations:
        return
    bounds = [*(str(b) for b in hist.bounds), "+Inf"]
    family.add_metric(list(labels), list(zip(bounds, snap.cumulative, strict=True)), snap.sum)

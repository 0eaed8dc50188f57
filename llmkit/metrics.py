"""Metric definitions over shared memory: which series exist, where their words live, and
how one event becomes a few atomic adds.

Every label set is known when the layout is built. Series come from the configuration:

- target series ``0 .. D-1``: one per configured deployment (``Config.deployments()``
  order, labels ``model`` = alias, ``deployment`` = ``alias#i``, ``provider``);
- ``D .. D+P-1``: one per provider (``provider_names`` order) for direct
  ``provider/model`` requests, labelled ``model = deployment = "<provider>/*"``, so an
  unbounded model name never becomes a label;
- ``D+P``: ``none``, requests that never reached routing (401, 400, unknown model ...).

Key series: one per ``[[keys]]`` entry, then ``master``, then ``none`` (auth off).

Byte layouts (every word int64 unless marked f64; each cell starts its own 64-byte line):

``metrics.target`` (one ``TargetStats`` cell per target series, 19 words):
  ``+8*(3r+c)`` requests by route ``r`` (chat, embeddings) and status class ``c`` (2xx,
  4xx, 5xx; a client that went away counts as 4xx), ``+48`` input tokens, ``+56``
  output tokens, ``+64`` f64 cost in USD, ``+72`` retries, ``+80`` fallbacks (attempts
  that moved away from this deployment), ``+88`` attempts, ``+96 + 8k`` upstream errors
  of kind ``ERROR_KINDS[k]``.
``metrics.key`` (one cell per key series, 4 words): requests, input tokens, output
  tokens, f64 cost.
``metrics.refusals`` (one cell, 12 words): limiter refusals at ``+8*(3*level + dim)``,
  ``LEVELS`` x ``DIMENSIONS``.
``metrics.duration`` / ``metrics.ttft``: one ``shm.Histogram`` per target series.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmkit.config import Config
from llmkit.providers.registry import provider_names
from shm import Counter, Histogram, LayoutBuilder, WorkerSlot
from shm.layout import Layout
from shm.segment import Segment

if TYPE_CHECKING:
    from llmkit.pricing import Price
    from shm._atomics import RequestPlan

ROUTES = ("chat", "embeddings", "models", "health", "metrics", "admin", "other")
STATUSES = (200, 400, 401, 403, 404, 405, 408, 413, 422, 429, 499, 500, 502, 503, 504)
DURATION_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
TTFT_BOUNDS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
MODEL_ROUTES = ("chat", "embeddings")
STATUS_CLASSES = ("2xx", "4xx", "5xx")
ERROR_KINDS = ("timeout", "connect", "rate_limited", "server_error", "client_error",
               "protocol", "reset")  # fmt: skip
LEVELS = ("global", "key", "provider", "deployment")
DIMENSIONS = ("rpm", "tpm", "concurrency")
NONE = "none"

_ROUTE_INDEX = {name: i for i, name in enumerate(ROUTES)}
_STATUS_INDEX = {code: i for i, code in enumerate(STATUSES)}
_OTHER_STATUS = len(STATUSES)

# Word offsets inside a TargetStats cell.
TOKENS_IN, TOKENS_OUT, COST, RETRIES, FALLBACKS, ATTEMPTS, ERRORS = 48, 56, 64, 72, 80, 88, 96
TARGET_WORDS = 12 + len(ERROR_KINDS)
KEY_WORDS = 4
_PLANS_MAX = 65536
_STATUS_SPAN = 600  # statuses 0..599 index precomputed tables; above clips to 599 (5xx)


def route_index(route: str) -> int:
    return _ROUTE_INDEX.get(route, _ROUTE_INDEX["other"])


def status_index(status: int) -> int:
    return _STATUS_INDEX.get(status, _OTHER_STATUS)


def status_class(status: int) -> int:
    """0 for 2xx (and anything below 400), 1 for 4xx, 2 for 5xx."""
    return 0 if status < 400 else 1 if status < 500 else 2


@dataclass(frozen=True)
class Series:
    """The label sets of one config, numbered as the segment stores them."""

    targets: tuple[tuple[str, str, str], ...]  # (model, deployment, provider)
    upstream_models: tuple[str, ...]  # per configured deployment
    deployments: dict[str, int]  # "alias#i" -> target series
    providers: dict[str, int]  # provider name -> direct target series
    keys: tuple[str, ...]
    key_index: dict[str, int]

    @property
    def unrouted(self) -> int:
        return len(self.targets) - 1

    @property
    def no_key(self) -> int:
        return len(self.keys) - 1

    @classmethod
    def of(cls, config: Config) -> Series:
        targets: list[tuple[str, str, str]] = []
        deployments: dict[str, int] = {}
        upstream: list[str] = []
        for model in config.models:
            for i, d in enumerate(model.deployments):
                deployments[f"{model.name}#{i}"] = len(targets)
                targets.append((model.name, f"{model.name}#{i}", d.provider))
                upstream.append(d.model)
        providers: dict[str, int] = {}
        for name in provider_names(config):
            providers[name] = len(targets)
            targets.append((f"{name}/*", f"{name}/*", name))
        targets.append((NONE, NONE, NONE))
        keys = (*(k.name for k in config.keys), "master", NONE)
        key_index = {name: i for i, name in enumerate(keys)}
        return cls(tuple(targets), tuple(upstream), deployments, providers, keys, key_index)

    def target_of(self, deployment: str, provider: str) -> int:
        """The series of an attempt at ``deployment`` (``alias#i``, or a direct model)."""
        index = self.deployments.get(deployment)
        if index is None:
            index = self.providers.get(provider, self.unrouted)
        return index

    def key_of(self, name: str | None) -> int:
        return self.no_key if name is None else self.key_index.get(name, self.no_key)


def declare(builder: LayoutBuilder, config: Config, worker_slots: int) -> None:
    """Add the metric regions and worker slots to a layout being built."""
    series = Series.of(config)
    builder.add("workers", WorkerSlot.KIND, worker_slots, WorkerSlot.SIZE)
    builder.add("worker_restarts", Counter.KIND, 1, Counter.SIZE)
    builder.add("http_requests", Counter.KIND, len(ROUTES) * (len(STATUSES) + 1), Counter.SIZE)
    size = Histogram.size_for(DURATION_BOUNDS)
    builder.add("http_duration", Histogram.KIND, len(ROUTES), size, DURATION_BOUNDS)
    targets = len(series.targets)
    builder.add("metrics.target", "target_stats", targets, 8 * TARGET_WORDS)
    builder.add("metrics.key", "key_stats", len(series.keys), 8 * KEY_WORDS)
    builder.add("metrics.refusals", "refusals", 1, 8 * len(LEVELS) * len(DIMENSIONS))
    builder.add("metrics.duration", Histogram.KIND, targets, size, DURATION_BOUNDS)
    ttft_size = Histogram.size_for(TTFT_BOUNDS)
    builder.add("metrics.ttft", Histogram.KIND, targets, ttft_size, TTFT_BOUNDS)


class Metrics:
    """Typed views over the metric regions of one segment, and the recording calls.

    Recording is a few batched C calls at precomputed offsets; nothing allocates.
    ``record_model_request`` is the one call a finished chat or embeddings request
    makes: every offset it needs comes from a list indexed by ``route * 600 + status``
    or by series number, and one bucket search (in C) serves both duration histograms.
    """

    def __init__(self, segment: Segment, layout: Layout, config: Config) -> None:
        a = segment.atomics
        self.atomics = a
        self.layout = layout
        self.config = config
        self.series = Series.of(config)
        self.segment_bytes = segment.size
        self.workers = [WorkerSlot(a, off) for off in _offsets(layout, "workers")]
        self.worker_restarts = Counter(a, layout["worker_restarts"].offset)
        self.http_requests = [Counter(a, off) for off in _offsets(layout, "http_requests")]
        self.http_duration = [
            Histogram(a, off, DURATION_BOUNDS) for off in _offsets(layout, "http_duration")
        ]
        self.targets = _offsets(layout, "metrics.target")
        self.keys = _offsets(layout, "metrics.key")
        self.refusals = layout["metrics.refusals"].offset
        self.duration = [
            Histogram(a, o, DURATION_BOUNDS) for o in _offsets(layout, "metrics.duration")
        ]
        self.ttft = [Histogram(a, o, TTFT_BOUNDS) for o in _offsets(layout, "metrics.ttft")]
        self._add = a.add_i64
        self._addf = a.add_f64
        self._http_counter = [
            self.http_requests[route * (len(STATUSES) + 1) + status_index(status)].offset
            for route in range(len(ROUTES))
            for status in range(_STATUS_SPAN)
        ]
        self._class_word = [
            8 * (3 * route + status_class(status))
            for route in range(len(MODEL_ROUTES))
            for status in range(_STATUS_SPAN)
        ]
        self._http_hist = [h.offset for h in self.http_duration]
        self._duration = [h.offset for h in self.duration]
        self._ttft = [h.offset for h in self.ttft]
        # Per model route, by status (0-599): the http_requests word, and the status class
        # word inside a TargetStats cell (Atomics.record_request's tables).
        self._statuses = [
            status_table(
                self._http_counter[route * _STATUS_SPAN : (route + 1) * _STATUS_SPAN],
                self._class_word[route * _STATUS_SPAN : (route + 1) * _STATUS_SPAN],
            )
            for route in range(len(MODEL_ROUTES))
        ]
        self.plans: dict[tuple[int, int, int, bool], RequestPlan] = {}

    # -- recording (hot) ----------------------------------------------------------

    def record_http(self, route: int, status: int, seconds: float, *ones: int) -> None:
        """Count one finished HTTP request; ``route`` from ``route_index``; each of
        ``ones`` gains 1 too (a worker slot's served count ...)."""
        a = self.atomics
        a.add_ones(self._http_counter[route * _STATUS_SPAN + min(status, _STATUS_SPAN - 1)], *ones)
        a.observe(DURATION_BOUNDS, seconds, self._http_hist[route])

    def record_model_request(
        self, route: int, status: int, seconds: float, target: int, key: int,
        tokens_in: int, tokens_out: int, cost: float, ttft: float | None,
        words: Sequence[int] | None, ones: Sequence[int] = (),
    ) -> None:  # fmt: skip
        """Everything a finished model request (``route`` 0 chat, 1 embeddings) counts,
        ``record_http`` included, in one C call (``Atomics.record_request``). ``words``
        are its tries' counters (attempts, retries, fallbacks, errors) that gain 1; None
        is the usual case, one attempt at ``target`` that did not fail. Each of ``ones``
        gains 1 too."""
        plan = self.plans.get((route, target, key, words is None))
        if plan is None:
            plan = self.plan(route, target, key, words is None)
        self.atomics.record_request(plan, status, seconds, tokens_in, tokens_out, cost, ttft,
                                    *(words or ()), *ones)  # fmt: skip

    def plan(
        self,
        route: int,
        target: int,
        key: int,
        attempted: bool,
        price: Price | None = None,
        ones: tuple[int, ...] = (),
    ) -> RequestPlan:
        """The words a model request of ``route`` at ``target`` by ``key`` adds to
        (``Atomics.record_request``), with its one attempt's when ``attempted`` and each
        of ``ones``, and the ``price`` its cost is computed from
        (``Atomics.record_finished``). Kept in ``plans`` when it has neither, so a
        request looks its plan up with one dict probe."""
        stats, key_stats = self.targets[target], self.keys[key]
        plan = self.atomics.plan(
            pack_plan(
                ones=(key_stats, stats + ATTEMPTS, *ones) if attempted else (key_stats, *ones),
                hists=(self._http_hist[route], self._duration[target]),
                io=(stats + TOKENS_IN, stats + TOKENS_OUT, key_stats + 8, key_stats + 16),
                costs=(stats + COST, key_stats + 24),
                second_hist=self._ttft[target],
                class_base=stats,
                price=price,
            ),
            self._statuses[route],
        )
        if price is not None or ones:
            return plan
        if len(self.plans) >= _PLANS_MAX:  # a bound, for configs with very many keys
            self.plans.clear()
        self.plans[route, target, key, attempted] = plan
        return plan

    def record_request(
        self, target: int, route: int, status: int, seconds: float, key: int
    ) -> None:
        """One finished model request (``route`` 0 chat, 1 embeddings) of a target series."""
        self._add(self.targets[target] + 8 * (3 * route + status_class(status)), 1)
        self.duration[target].observe(seconds)
        self._add(self.keys[key], 1)

    def record_usage(
        self, target: int, key: int, tokens_in: int, tokens_out: int, cost: float
    ) -> None:
        base, key_base, add = self.targets[target], self.keys[key], self._add
        add(base + TOKENS_IN, tokens_in)
        add(base + TOKENS_OUT, tokens_out)
        add(key_base + 8, tokens_in)
        add(key_base + 16, tokens_out)
        if cost:
            self._addf(base + COST, cost)
            self._addf(key_base + 24, cost)

    def record_ttft(self, target: int, seconds: float) -> None:
        self.ttft[target].observe(seconds)

    def record_attempt(self, target: int) -> None:
        self._add(self.targets[target] + ATTEMPTS, 1)

    def record_error(self, target: int, kind: int) -> None:
        self._add(self.targets[target] + ERRORS + 8 * kind, 1)

    def record_retry(self, target: int) -> None:
        self._add(self.targets[target] + RETRIES, 1)

    def record_fallback(self, target: int) -> None:
        self._add(self.targets[target] + FALLBACKS, 1)

    def record_refusal(self, level: int, dimension: int) -> None:
        self._add(self.refusals + 8 * (3 * level + dimension), 1)

    # -- reading ------------------------------------------------------------------

    def requests_by(self, route: str, status: int) -> int:
        index = route_index(route) * (len(STATUSES) + 1) + status_index(status)
        return self.http_requests[index].value()

    def target_word(self, target: int, word: int) -> int:
        return self.atomics.load_i64(self.targets[target] + word)

    def target_cost(self, target: int) -> float:
        return self.atomics.load_f64(self.targets[target] + COST)


def pack_plan(
    ones: Sequence[int],
    hists: Sequence[int],
    io: Sequence[int],
    costs: Sequence[int],
    second_hist: int,
    class_base: int,
    price: Price | None = None,
) -> bytes:
    """A request plan's words (``Plan`` in ``shm/_atomics.c`` gives the layout): 1 at
    each of ``ones``, the duration into each of ``hists`` (``DURATION_BOUNDS``), time to
    first token into ``second_hist`` (``TTFT_BOUNDS``), tokens at ``io`` (in, out, in,
    out ...), cost at ``costs``, the status class word from ``class_base``."""
    cached = price.cached_input if price is not None else None
    head = struct.pack(
        "=8q3dq", len(ones), len(hists), len(io), len(costs), len(DURATION_BOUNDS),
        len(TTFT_BOUNDS), second_hist, class_base, price.input if price else 0.0,
        price.output if price else 0.0, cached or 0.0, cached is not None,
    )  # fmt: skip
    offsets = (*ones, *hists, *io, *costs)
    bounds = (*DURATION_BOUNDS, *TTFT_BOUNDS)
    return head + struct.pack(f"={len(offsets)}q{len(bounds)}d", *offsets, *bounds)


def status_table(words: Sequence[int], classes: Sequence[int]) -> bytes:
    """A plan's statuses: the word status ``s`` adds 1 to, then its class word (from
    the plan's ``class_base``), for ``s`` in ``0..len(words) - 1``."""
    return struct.pack(f"={2 * len(words)}q", *words, *classes)


def _offsets(layout: Layout, name: str) -> list[int]:
    region = layout[name]
    return [region.offset_of(i) for i in range(region.count)]


def level_of(spec_names: Sequence[str]) -> list[int]:
    """The ``LEVELS`` index of each limiter entity, from its spec name (``key:team-a``)."""
    return [LEVELS.index(name.partition(":")[0]) for name in spec_names]

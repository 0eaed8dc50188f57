"""Sampled tracing: the head-sampling decision, W3C ``traceparent``, spans as plain data.

Sampling is decided once per request, at the start, with one call to a seeded
``random.Random``: an incoming ``traceparent`` decides by its sampled flag (what OTel's
``ParentBased`` sampler does), otherwise ``random() < trace_sample_rate``. A request
that is not sampled records nothing, and with tracing off (rate 0, or no exporter
configured) nothing here runs past one attribute check.

The request path never touches the OpenTelemetry SDK: a sampled request draws its ids
from the same RNG, reads ``time.time_ns()`` at span edges, and appends each finished
span as one ``SpanData`` tuple to a deque. An export thread drains the deque, turns the
tuples into OTLP/HTTP protobuf itself (``llmkit.otlp``) and posts them, or, when an SDK
``SpanExporter`` is given (tests, embedding), into ``ReadableSpan``s for it. The SDK is
imported only in that second case, so it is an optional extra (``llmkit[tracing]``).
Measured in ``bench/observability_bench.py``: building spans with the SDK's tracer cost
~250 µs per trace on the event loop; a tuple per span costs about 2 µs there.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from llmkit.config import ObservabilityConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("llmkit.tracing")

TRACEPARENT = "traceparent"
_HEX = frozenset("0123456789abcdef")
INTERNAL, SERVER, CLIENT = 0, 1, 2  # opentelemetry.trace.SpanKind values
BATCH = 512  # spans per export call; a full batch wakes the export thread early
EXPORT_INTERVAL_S = 1.0
MAX_QUEUED = 16 * 1024  # spans kept when the exporter falls behind; the rest are dropped


class SpanData(NamedTuple):
    """One finished span as the request path records it (timestamps in epoch ns;
    ``parent`` 0 for a root; ``error`` the ``error.type`` of a failed span)."""

    trace_id: int
    span_id: int
    parent: int
    remote_parent: bool
    name: str
    kind: int
    start: int
    end: int
    attributes: Mapping[str, Any]
    error: str | None


class TraceContext(NamedTuple):
    """A sampled request's root span: its ids and its parent's (0: a new trace)."""

    trace_id: int
    span_id: int
    parent: int
    remote_parent: bool


def parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``; None if invalid.

    Version ``00`` must be exactly 55 characters; a later version may append fields
    (the spec says to parse the first four). Version ``ff`` and all-zero ids are invalid.
    """
    value = value.strip().lower()
    if len(value) < 55 or (len(value) > 55 and value[55] != "-"):
        return None
    version, trace_id, span_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    if version == "ff" or (version == "00" and len(value) != 55):
        return None
    if not _HEX.issuperset(version + trace_id + span_id + flags):
        return None
    trace, span = int(trace_id, 16), int(span_id, 16)
    if not trace or not span:
        return None
    return trace, span, bool(int(flags, 16) & 1)


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


class Tracing:
    """One worker's sampler and span queue. ``enabled`` is False when tracing is off;
    then ``sample`` is never called and no OpenTelemetry module is imported."""

    def __init__(
        self,
        rate: float,
        export: Callable[[Sequence[SpanData]], None] | None,
        shutdown: Callable[[], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.enabled = export is not None and rate > 0
        self.rate = rate
        rng = rng or random.Random()
        self._random = rng.random
        self._bits = rng.getrandbits
        self._export = export
        self._shutdown = shutdown
        self._queue: deque[SpanData] = deque()
        self.dropped = 0  # spans not queued because the exporter fell behind
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one drain at a time (thread, flush, shutdown)
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def off(cls) -> Tracing:
        return cls(0.0, None)

    # -- request path ---------------------------------------------------------------

    def sample(self, traceparent: str | None) -> TraceContext | None:
        """The root span of a sampled request, or None: not sampled."""
        if traceparent:
            parent = parse_traceparent(traceparent)
            if parent is not None:
                if not parent[2]:
                    return None
                return TraceContext(parent[0], self.span_id(), parent[1], True)
        if self._random() >= self.rate:
            return None
        return TraceContext(self._bits(128) or 1, self.span_id(), 0, False)

    def span_id(self) -> int:
        return self._bits(64) or 1

    def record(self, span: SpanData) -> None:
        """Queue a finished span for export (the export thread starts on first use, so
        a worker forked after ``build_tracing`` still gets its own)."""
        queue = self._queue
        if len(queue) >= MAX_QUEUED:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) == BATCH or self._thread is None:
            self._kick()

    # -- export ---------------------------------------------------------------------

    def _kick(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(
                target=self._run, name="llmkit-span-export", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(EXPORT_INTERVAL_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Export every queued span now (tests; the export thread; shutdown)."""
        export = self._export
        if export is None:
            return
        with self._lock:
            queue = self._queue
            while queue:
                batch: list[SpanData] = []
                while queue and len(batch) < BATCH:
                    batch.append(queue.popleft())
                export(batch)

    def shutdown(self) -> None:
        """Flush and stop the exporter (worker exit)."""
        self._stopping = True
        thread = self._thread
        if thread is not None:
            self._wake.set()
            thread.join(timeout=10)
        self.flush()
        if self.dropped:
            log.warning("tracing dropped %d spans: the exporter fell behind", self.dropped)
        if self._shutdown is not None:
            self._shutdown()


def now_ns() -> int:
    """Span timestamps: wall-clock epoch nanoseconds, as OpenTelemetry wants them."""
    return time.time_ns()


def build_tracing(
    config: ObservabilityConfig,
    exporter: SpanExporter | None = None,
    rng: random.Random | None = None,
) -> Tracing:
    """The worker's tracing: off unless the rate is above 0 and spans have somewhere to go:
    ``otlp_endpoint`` (OTLP/HTTP protobuf, encoded by ``llmkit.otlp``, no SDK needed), or
    an SDK ``exporter`` (tests, embedding), which gets ``ReadableSpan``s."""
    if config.trace_sample_rate <= 0 or (not config.otlp_endpoint and exporter is None):
        return Tracing.off()
    if exporter is None:
        from llmkit.otlp import OtlpHttpExporter

        otlp = OtlpHttpExporter(config.otlp_endpoint, config.service_name)
        return Tracing(config.trace_sample_rate, otlp.export, otlp.shutdown, rng)
    from opentelemetry.sdk.resources import Resource

    to_sdk = sdk_spans(Resource.create({"service.name": config.service_name}))
    sink = exporter

    def export(batch: Sequence[SpanData]) -> None:
        sink.export(to_sdk(batch))

    return Tracing(config.trace_sample_rate, export, sink.shutdown, rng)


def sdk_spans(resource: Any) -> Callable[[Sequence[SpanData]], list[ReadableSpan]]:
    """The converter from ``SpanData`` to the SDK's ``ReadableSpan`` (export thread)."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    scope = InstrumentationScope("llmkit")
    sampled = TraceFlags(TraceFlags.SAMPLED)
    kinds = {INTERNAL: SpanKind.INTERNAL, SERVER: SpanKind.SERVER, CLIENT: SpanKind.CLIENT}
    ok, failed = Status(StatusCode.UNSET), Status(StatusCode.ERROR)

    def convert(batch: Sequence[SpanData]) -> list[ReadableSpan]:
        spans = []
        for s in batch:
            context = SpanContext(s.trace_id, s.span_id, False, sampled)
            parent = None
            if s.parent:
                parent = SpanContext(s.trace_id, s.parent, s.remote_parent, sampled)
            attributes = s.attributes
            if s.error is not None:
                attributes = {**attributes, "error.type": s.error}
            spans.append(ReadableSpan(
                s.name, context, parent, resource, attributes, kind=kinds[s.kind],
                status=failed if s.error is not None else ok, start_time=s.start,
                end_time=s.end, instrumentation_scope=scope,
            ))  # fmt: skip
        return spans

    return convert

"""Sampled tracing: the head-sampling decision, W3C ``traceparent``, spans as plain data.

Sampling is decided once per request, at the start, with one call to a seeded
``random.Random``: an incoming ``traceparent`` decides by its sampled flag (what OTel's
``ParentBased`` sampler does), otherwise ``random() < trace_sample_rate``. A request
that is not sampled records nothing, and with tracing off (rate 0, or no exporter
configured) nothing here runs past one attribute check.

The request path never touches the OpenTelemetry SDK: a sampled request draws its ids
from the same RNG, reads ``time.time_ns()`` at span edges, keeps each finished span as
one ``SpanData`` tuple and, at the request's end, appends its spans to a deque. Every
64 traces (or after a second), the deque is drained on the event loop, between
requests, a batch per callback: written as OTLP/HTTP protobuf (``llmkit.otlp``) and
posted asynchronously, or, when an SDK ``SpanExporter`` is given (tests, embedding),
turned into ``ReadableSpan``s for it; the SDK is imported only then, so it stays an
optional extra (``llmkit[tracing]``).
Measured (``bench/observability_bench.py``): the SDK's tracer cost ~250 µs per sampled
trace on the event loop; tuples cost a few µs, and encoding ~15 µs per four-span trace.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from llmkit.config import ObservabilityConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("llmkit.tracing")

TRACEPARENT = "traceparent"
_HEX = frozenset("0123456789abcdef")
INTERNAL, SERVER, CLIENT = 0, 1, 2  # opentelemetry.trace.SpanKind values
BATCH = 256  # spans per export call: about 1 ms of encoding on the loop
BATCH_TRACES = 64  # queued traces that are exported at once, not at the interval
EXPORT_INTERVAL_S = 1.0
MAX_QUEUED = 4096  # traces kept when the exporter falls behind; later ones are dropped


# One finished span as the request path records it: (trace id, span id, parent span id
# (0 for a root), parent is remote, name, kind, start ns, end ns (epoch), attributes,
# error type or None). A plain tuple: a NamedTuple costs ~0.3 µs more per span to build.
SpanData = tuple[int, int, int, bool, str, int, int, int, Mapping[str, Any], "str | None"]


class SharedAttributes(dict[str, Any]):
    """Span attributes that many spans share (an attempt's target, a route's order):
    built once, never changed after, so the OTLP encoder can keep their bytes by
    identity. A span's attributes may also be a ``ChainMap`` of a per-request dict and
    these."""


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
    then ``sample`` is never called and no OpenTelemetry module is imported.

    Export runs on the worker's event loop, between requests: a batch at a time, each
    a callback of its own, so no request waits behind more than one batch's encoding.
    A thread was measured first: its work was cheap alone, but contending for the GIL
    with the loop made each sampled trace cost the worker several times more CPU.
    """

    def __init__(
        self,
        rate: float,
        export: Callable[[Sequence[SpanData]], None] | None,
        shutdown: Callable[[], None] | None = None,
        rng: random.Random | None = None,
        send: Callable[[Sequence[SpanData]], Coroutine[Any, Any, None]] | None = None,
        aclose: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.enabled = export is not None and rate > 0
        self.rate = rate
        rng = rng or random.Random()
        self.random = rng.random  # the head-sampling draw: random() < rate
        self._bits = rng.getrandbits
        self._export = export  # synchronous: flush() and shutdown
        self._send = send  # asynchronous, on the loop; None: ``export`` there too
        self._shutdown = shutdown
        self._aclose = aclose
        self._queue: deque[list[SpanData]] = deque()
        self.dropped = 0  # traces not queued because the exporter fell behind
        self._scheduled = False
        self._sending: dict[asyncio.Task[None], list[SpanData]] = {}

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
        if self.random() >= self.rate:
            return None
        return self.root()

    def root(self) -> TraceContext:
        """A new trace's root span (the request was drawn for sampling)."""
        return TraceContext(self._bits(128) or 1, self.span_id(), 0, False)

    def span_id(self) -> int:
        return self._bits(64) or 1

    def record(self, spans: list[SpanData]) -> None:
        """Queue one request's finished spans; they leave within ``EXPORT_INTERVAL_S``,
        or as soon as a batch is full (few objects stay alive for the GC to walk)."""
        queue = self._queue
        if len(queue) >= MAX_QUEUED:
            self.dropped += 1
            return
        queue.append(spans)
        if len(queue) == BATCH_TRACES:
            self._schedule(0)
        elif not self._scheduled:
            self._scheduled = self._schedule(EXPORT_INTERVAL_S)

    # -- export ---------------------------------------------------------------------

    def _schedule(self, delay: float) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False  # no event loop (a script): the spans wait for flush()
        loop.call_later(delay, self._export_batch)
        return True

    def _export_batch(self) -> None:
        self._scheduled = False
        batch = self._take()
        if not batch:
            return
        if self._send is None:
            assert self._export is not None
            self._export(batch)
        else:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending[task] = batch
            task.add_done_callback(self._sending.pop)
        if len(self._queue) >= BATCH_TRACES:
            self._schedule(0)

    def _take(self) -> list[SpanData]:
        queue = self._queue
        batch: list[SpanData] = []
        while queue and len(batch) < BATCH:
            batch += queue.popleft()
        return batch

    def flush(self) -> None:
        """Export every queued span now, synchronously (tests; shutdown)."""
        if self._export is None:
            return
        while batch := self._take():
            self._export(batch)

    def shutdown(self) -> None:
        """Flush and stop the exporter (worker exit): batches still being sent are sent
        again synchronously, since the loop will not finish them."""
        for task, batch in list(self._sending.items()):
            if not task.done():
                task.cancel()
                if self._export is not None:
                    self._export(batch)
        self._sending.clear()
        self.flush()
        if self.dropped:
            log.warning("tracing dropped %d traces: the exporter fell behind", self.dropped)
        if self._shutdown is not None:
            self._shutdown()

    async def aclose(self) -> None:
        """``shutdown``, then release what the loop held (the exporter's session)."""
        self.shutdown()
        if self._aclose is not None:
            await self._aclose()


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
        return Tracing(
            config.trace_sample_rate, otlp.export, otlp.shutdown, rng, otlp.send, otlp.aclose
        )
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
        for trace_id, span_id, parent_id, remote, name, kind, start, end, attrs, error in batch:
            context = SpanContext(trace_id, span_id, False, sampled)
            parent = SpanContext(trace_id, parent_id, remote, sampled) if parent_id else None
            if error is not None:
                attrs = {**attrs, "error.type": error}
            elif attrs.__class__ is not dict:
                attrs = dict(attrs)
            spans.append(ReadableSpan(
                name, context, parent, resource, attrs, kind=kinds[kind],
                status=failed if error is not None else ok, start_time=start, end_time=end,
                instrumentation_scope=scope,
            ))  # fmt: skip
        return spans

    return convert

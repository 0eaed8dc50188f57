"""Sampled tracing: the head-sampling decision, W3C ``traceparent``, the span queue.

Sampling is decided once per request, at the start: an incoming ``traceparent`` decides
by its sampled flag (what OTel's ``ParentBased`` sampler does), otherwise each request
is sampled with probability ``trace_sample_rate``, independently. That is done as a
countdown (``Tracing.draw``): one ``random()`` per *sampled* request draws how many
requests go unsampled before the next (geometric, which is exactly what independent
draws per request give), and a request in between costs one decrement. A request that
is not sampled records nothing, and with tracing off (rate 0, or no exporter
configured) nothing here runs past one attribute check.

The request path never touches the OpenTelemetry SDK: a sampled request draws its ids
from the same RNG, reads ``time.time_ns()`` at span edges and writes each finished span
straight into OTLP protobuf (``llmkit.otlp``), so a finished trace is one ``bytes``
object, queued here (no object for the garbage collector to walk). Batches leave on the event loop,
between requests, when ``BATCH_BYTES`` are queued or ``EXPORT_INTERVAL_S`` after the
first: posted asynchronously over OTLP/HTTP or, when an SDK ``SpanExporter`` is given
(tests, embedding), decoded back into ``ReadableSpan``s for it, so it sees exactly the
bytes a collector would; the SDK is imported only then, so it stays an optional extra
(``llmkit[tracing]``).

Measured (``bench/observability_bench.py --instructions``, proxied requests of ~740K
instructions, mean of ``PYTHONHASHSEED`` 0-3): a sampled request costs ~64K instructions
more than metrics only with callgrind's small batches, ~58K with one POST (~500K) per
500 traces as at full speed; ~8K of that is the upstream ``traceparent`` (formatting it,
and aiohttp sending one more header). An unsampled one costs one header probe and a
decrement (~0.85K counted in-process by ``bench/_hooks_callgrind.py``, within the ~2K
that code layout moves a whole request). In-process, a sampled request's hooks, spans
and queueing cost ~51K. Before: the SDK's tracer ~250 µs per trace; span tuples encoded
at export ~200K; spans written at hook time with a random id each, the recorder's every
field set at ``begin``, a ``random()`` per request: ~60K in-process, ~67K per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from llmkit.config import ObservabilityConfig
from llmkit.otlp import CLIENT, INTERNAL, SERVER

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["CLIENT", "INTERNAL", "SERVER", "TRACEPARENT", "Tracing", "build_tracing"]

log = logging.getLogger("llmkit.tracing")

TRACEPARENT = "traceparent"
_HEX = frozenset("0123456789abcdef")
# A batch is what is queued when it reaches BATCH_BYTES (~280 four-span traces, one POST
# every ~0.6 s at 10% of 5,000 requests/s: the POST's cost spread over that many) or
# EXPORT_INTERVAL_S after its first trace, whichever comes first.
BATCH_BYTES = 1024 * 1024
EXPORT_INTERVAL_S = 1.0
MAX_QUEUED_BYTES = 4 * 1024 * 1024  # kept when the exporter falls behind; then dropped

# A sampled request's trace is (its trace id: 16 bytes, its root span's id, its remote
# parent span's id or None). Span ids are 64-bit ints, written little-endian everywhere
# (``llmkit.otlp``, ``traceparent``): struct's fast path, where big-endian bytes cost a
# per-byte loop. Bit 0 is set so that no id is all zeros (invalid): 63 random bits per
# span id, 127 per trace id.


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
    a callback of its own, so no request waits behind more than one batch. A thread was
    measured first: its work was cheap alone, but contending for the GIL with the loop
    made each sampled trace cost the worker several times more CPU.
    """

    def __init__(
        self,
        rate: float,
        export: Callable[[Sequence[bytes]], None] | None,
        shutdown: Callable[[], None] | None = None,
        rng: random.Random | None = None,
        send: Callable[[Sequence[bytes]], Coroutine[Any, Any, None]] | None = None,
        aclose: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.enabled = export is not None and rate > 0
        self.rate = rate
        rng = rng or random.Random()
        self.random = rng.random
        self.bits = rng.getrandbits  # ids: bits(64) | 1, as span_id (callers inline it)
        # draw(): log(1 - random()) / log(1 - rate) rounded down is geometric: the
        # failures before the next success of a Bernoulli(rate) trial per request.
        self.gap_scale = 1 / math.log1p(-rate) if 0 < rate < 1 else 0.0
        self._export = export  # synchronous: flush() and shutdown
        self._send = send  # asynchronous, on the loop; None: ``export`` there too
        self._shutdown = shutdown
        self._aclose = aclose
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes in the queue
        self.dropped = 0  # traces not queued because the exporter fell behind
        self._timer: asyncio.TimerHandle | None = None
        self._due = False  # a full batch's export is scheduled
        self._sending: dict[asyncio.Task[None], list[bytes]] = {}

    @classmethod
    def off(cls) -> Tracing:
        return cls(0.0, None)

    # -- request path ---------------------------------------------------------------

    def draw(self) -> int:
        """How many requests go unsampled before the next one that is: head sampling as
        a countdown (``Observability.countdown``), so that a request not drawn costs one
        decrement instead of a ``random()`` call. The gaps of independent draws with
        probability ``rate`` are geometric, so counting down one drawn gap at a time
        samples exactly as a draw per request would (each request, independently, with
        probability ``rate``). Tracing off: never (no request counts down that far)."""
        if not self.enabled:
            return sys.maxsize
        if self.gap_scale == 0.0:  # rate 1: every request
            return 0
        return int(math.log(1.0 - self.random()) * self.gap_scale)

    def sample(self, traceparent: str, drawn: bool) -> tuple[bytes, int, bytes | None] | None:
        """A request with a ``traceparent``: its trace (trace id, root span id, parent span
        id; see above), or None when it is not sampled. A valid parent decides by its
        sampled flag (OTel's ``ParentBased``); an invalid one is ignored and ``drawn``, the
        request's own head sampling, decides."""
        parent = parse_traceparent(traceparent)
        if parent is not None:
            if not parent[2]:
                return None
            return parent[0].to_bytes(16, "big"), self.span_id(), parent[1].to_bytes(8, "big")
        if not drawn:
            return None
        return (*self.root(), None)

    def root(self) -> tuple[bytes, int]:
        """A new trace's id and root span id: the request was drawn for sampling."""
        bits = self.bits
        return (bits(128) | 1).to_bytes(16, "little"), bits(64) | 1

    def span_id(self) -> int:
        return self.bits(64) | 1

    def record(self, trace: bytes) -> None:
        """Queue one request's finished spans (``llmkit.otlp``: its ``ScopeSpans.spans``
        fields); they leave within ``EXPORT_INTERVAL_S``, or once a batch is full."""
        queued = self._queued + len(trace)
        if queued > MAX_QUEUED_BYTES:
            self.dropped += 1
            return
        self._queue.append(trace)
        self._queued = queued
        if queued >= BATCH_BYTES:
            if not self._due:
                self._due = self._schedule(0) is not None
        elif self._timer is None:
            self._timer = self._schedule(EXPORT_INTERVAL_S)

    # -- export ---------------------------------------------------------------------

    def _schedule(self, delay: float) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # no event loop (a script): the spans wait for flush()
        return loop.call_later(delay, self._export_batch)

    def _export_batch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = False
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
        if self._queued >= BATCH_BYTES:
            self._due = self._schedule(0) is not None
        elif self._queue:
            self._timer = self._schedule(EXPORT_INTERVAL_S)

    def _take(self) -> list[bytes]:
        """Up to ``BATCH_BYTES`` of queued traces (at least one, if any)."""
        queue = self._queue
        if self._queued <= BATCH_BYTES:
            taken = list(queue)
            queue.clear()
            self._queued = 0
            return taken
        taken, size = [], 0
        while queue and size < BATCH_BYTES:
            trace = queue.popleft()
            taken.append(trace)
            size += len(trace)
        self._queued -= size
        return taken

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
        from llmkit.otlp import OtlpHttpExporter, env_cafile, env_headers

        otlp = OtlpHttpExporter(
            config.otlp_endpoint, config.service_name, headers=env_headers(), cafile=env_cafile()
        )
        return Tracing(
            config.trace_sample_rate, otlp.export, otlp.shutdown, rng, otlp.send, otlp.aclose
        )
    from opentelemetry.sdk.resources import Resource

    to_sdk = sdk_spans(Resource.create({"service.name": config.service_name}))
    sink = exporter

    def export(batch: Sequence[bytes]) -> None:
        sink.export(to_sdk(batch))

    return Tracing(config.trace_sample_rate, export, sink.shutdown, rng)


def sdk_spans(resource: Any) -> Callable[[Sequence[bytes]], list[ReadableSpan]]:
    """The converter from queued traces (OTLP ``ScopeSpans.spans`` fields) to the SDK's
    ``ReadableSpan``s: decoded with the protobuf classes (``opentelemetry-proto``, which
    the SDK's OTLP exporter brings), so an SDK exporter sees what a collector would."""
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    scope = InstrumentationScope("llmkit")
    sampled = TraceFlags(TraceFlags.SAMPLED)
    ok, failed = Status(StatusCode.UNSET), Status(StatusCode.ERROR)

    def value(any_value: Any) -> Any:
        which = any_value.WhichOneof("value")
        if which == "array_value":
            return tuple(value(v) for v in any_value.array_value.values)
        return getattr(any_value, which)

    def convert(batch: Sequence[bytes]) -> list[ReadableSpan]:
        spans = []
        for span in ScopeSpans.FromString(b"".join(batch)).spans:
            trace_id = int.from_bytes(span.trace_id, "big")
            context = SpanContext(trace_id, int.from_bytes(span.span_id, "big"), False, sampled)
            parent = None
            if span.parent_span_id:
                remote = bool(span.flags & 0x200)
                parent_id = int.from_bytes(span.parent_span_id, "big")
                parent = SpanContext(trace_id, parent_id, remote, sampled)
            spans.append(ReadableSpan(
                span.name, context, parent, resource,
                {kv.key: value(kv.value) for kv in span.attributes},
                kind=SpanKind(span.kind - 1), status=failed if span.status.code == 2 else ok,
                start_time=span.start_time_unix_nano, end_time=span.end_time_unix_nano,
                instrumentation_scope=scope,
            ))  # fmt: skip
        return spans

    return convert

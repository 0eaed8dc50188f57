"""Sampled OpenTelemetry tracing: the head-sampling decision, W3C ``traceparent``, spans.

Sampling is decided once per request, at the start, with one call to a seeded
``random.Random``: an incoming ``traceparent`` decides by its sampled flag (what OTel's
``ParentBased`` sampler does), otherwise ``random() < trace_sample_rate``. A request
that is not sampled creates no span object at all, and with tracing off (rate 0, or no
exporter configured) nothing here runs past one attribute check. The OpenTelemetry SDK
is imported only when tracing is on, so it is an optional extra (``llmkit[tracing]``).

Spans are started with explicit timestamps, so a stage can be timed with two clock
reads and turned into a span only when the request is sampled.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from llmkit.config import ConfigError, ObservabilityConfig

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

TRACEPARENT = "traceparent"
_HEX = frozenset("0123456789abcdef")


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
    """One worker's tracer. ``enabled`` is False when tracing is off; then ``sample``
    is never called and no OpenTelemetry module is imported."""

    def __init__(
        self, rate: float, tracer: Tracer | None, shutdown: Callable[[], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:  # fmt: skip
        self.enabled = tracer is not None and rate > 0
        self.rate = rate
        self._tracer = tracer
        self._shutdown = shutdown
        self._random = (rng or random.Random()).random

    @classmethod
    def off(cls) -> Tracing:
        return cls(0.0, None)

    def sample(self, traceparent: str | None) -> Context | None:
        """The parent context of a sampled request's root span, or None: not sampled."""
        if traceparent:
            parent = parse_traceparent(traceparent)
            if parent is not None:
                return _remote_parent(*parent) if parent[2] else None
        if self._random() >= self.rate:
            return None
        from opentelemetry.context import Context

        return Context()  # an empty context: the root span starts a new trace

    def start(
        self,
        name: str,
        parent: Context,
        start_ns: int,
        attributes: Mapping[str, Any],
        server: bool = False,
    ) -> Span:
        """A span started at ``start_ns`` (epoch ns) under ``parent``."""
        from opentelemetry.trace import SpanKind

        assert self._tracer is not None
        kind = SpanKind.SERVER if server else SpanKind.INTERNAL
        return self._tracer.start_span(
            name, context=parent, kind=kind, attributes=attributes, start_time=start_ns
        )

    def child(
        self, name: str, parent: Span, start_ns: int, attributes: Mapping[str, Any],
        client: bool = False,
    ) -> Span:  # fmt: skip
        """A span under ``parent``; a CLIENT span when it calls an upstream."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        assert self._tracer is not None
        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        return self._tracer.start_span(
            name, context=set_span_in_context(parent), kind=kind, attributes=attributes,
            start_time=start_ns,
        )  # fmt: skip

    def shutdown(self) -> None:
        """Flush and stop the exporter (worker exit)."""
        if self._shutdown is not None:
            self._shutdown()


def traceparent_of(span: Span) -> str:
    context = span.get_span_context()
    return format_traceparent(context.trace_id, context.span_id, True)


def ids_of(span: Span) -> tuple[int, int]:
    context = span.get_span_context()
    return context.trace_id, context.span_id


def _remote_parent(trace_id: int, span_id: int, sampled: bool) -> Context:
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        TraceFlags,
        set_span_in_context,
    )

    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)
    return set_span_in_context(NonRecordingSpan(context))


def build_tracing(
    config: ObservabilityConfig,
    exporter: SpanExporter | None = None,
    rng: random.Random | None = None,
) -> Tracing:
    """The worker's tracing: off unless the rate is above 0 and spans have somewhere to go
    (``otlp_endpoint``, or ``exporter``, which tests use). Raises ConfigError when an
    endpoint is set but the SDK is not installed."""
    if config.trace_sample_rate <= 0 or (not config.otlp_endpoint and exporter is None):
        return Tracing.off()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
    except ImportError as exc:
        raise ConfigError(
            "observability.otlp_endpoint needs the OpenTelemetry SDK: pip install 'llmkit[tracing]'"
        ) from exc
    resource = Resource.create({"service.name": config.service_name})
    provider = TracerProvider(sampler=ALWAYS_ON, resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        otlp = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=5)
        provider.add_span_processor(BatchSpanProcessor(otlp, schedule_delay_millis=1000))
    tracer = provider.get_tracer("llmkit")
    return Tracing(config.trace_sample_rate, tracer, provider.shutdown, rng)


def now_ns() -> int:
    """Span timestamps: wall-clock epoch nanoseconds, as OpenTelemetry wants them."""
    return time.time_ns()

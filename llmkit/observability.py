"""Observability of every request: shared-memory metrics, sampled tracing, the access log.

The pieces live in their own modules: ``llmkit.metrics`` (series, shm layout, recording),
``llmkit.collector`` (the prometheus_client collector, ``MetricSource`` for regions
declared elsewhere), ``llmkit.tracing`` (sampling, ``traceparent``, spans) and
``llmkit.accesslog``. This module ties them to one request: the HTTP surface calls
``Observability.begin`` and gets a ``RequestObs`` (or None when everything is off, so
the pipeline pays one ``is not None`` test per hook), which the gateway, the run and
its attempts feed with one call per event, and ``finish`` turns into metric updates, a
log line and the root span's end.

Hooks (who calls what): the HTTP surface ``begin`` / ``answered`` / ``finish``;
``Gateway._run`` ``mark`` + ``routed``; ``Run.admit`` ``mark`` + ``admitted``;
``Run._open`` ``attempt_started``; ``Attempt._settle`` ``attempt_settled``;
``Attempt.first_byte`` ``first_token``; ``Run.close`` ``settled``; the multiplexer
``multiplexer_role``.

Metric names and the OpenTelemetry GenAI semantic conventions (Prometheus names carry
``_total`` on counters; every series also has ``model``, ``deployment``, ``provider``)::

    llmkit_tokens_total{direction=input|output}   gen_ai.client.token.usage
                                                  {gen_ai.token.type=input|output}
                                                  (a counter here, a histogram there)
    llmkit_request_duration_seconds               gen_ai.server.request.duration
    llmkit_upstream_attempts_total                count of gen_ai.client.operation.duration
    llmkit_time_to_first_token_seconds            gen_ai.server.time_to_first_token
    label model (alias or "<provider>/*")         gen_ai.request.model
    label provider                                gen_ai.provider.name (gen_ai.system
                                                  before semconv 1.37)
    llmkit_upstream_errors_total{kind}            error.type
    llmkit_requests_total{route=chat|embeddings}  gen_ai.operation.name=chat|embeddings

Spans (sampled requests only): ``{operation} {model}`` SERVER span (``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.provider.name``, ``gen_ai.response.model``,
``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``, ``http.request.method``, ``http.response.status_code``,
``llmkit.key`` (the key's name), ``llmkit.multiplexer.role``), with children
``llmkit.router``, ``llmkit.limiter`` and one ``{operation} {upstream model}`` CLIENT
span per upstream attempt (``llmkit.deployment``, ``llmkit.attempt``, ``error.type``).
The upstream request carries the attempt span's ``traceparent``; an unsampled request
passes the caller's ``traceparent`` through unchanged. Prompts and keys never go into
metrics or spans; prompts reach the access log only with ``log_prompts``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp

from llmkit.accesslog import AccessLog
from llmkit.collector import MetricSource, ShmCollector
from llmkit.config import Config
from llmkit.errors import (
    BadUpstreamResponseError,
    LLMKitError,
    RateLimitError,
    UpstreamTimeoutError,
)
from llmkit.metrics import (
    DURATION_BOUNDS,
    ERROR_KINDS,
    MODEL_ROUTES,
    ROUTES,
    STATUSES,
    Metrics,
    Series,
    declare,
    route_index,
    status_index,
)
from llmkit.tracing import Tracing, build_tracing, now_ns, traceparent_of
from llmkit.upstream import UpstreamStatus

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from llmkit.providers.base import Call, Target
    from llmkit.types import Usage

__all__ = [
    "DURATION_BOUNDS",
    "ERROR_KINDS",
    "ROUTES",
    "STATUSES",
    "MetricSource",
    "Metrics",
    "Observability",
    "RequestObs",
    "ShmCollector",
    "declare",
    "error_kind",
    "route_index",
    "status_index",
]

(TIMEOUT, CONNECT, RATE_LIMITED, SERVER_ERROR, CLIENT_ERROR, PROTOCOL, RESET) = range(
    len(ERROR_KINDS)
)
_MODEL_ROUTES = len(MODEL_ROUTES)  # route indexes below this carry a model


def error_kind(error: BaseException) -> int:
    """The ``ERROR_KINDS`` index of a failed upstream attempt, from the error and what
    caused it (``llmkit.upstream`` chains the aiohttp failure or ``UpstreamStatus``)."""
    if isinstance(error, RateLimitError):
        return RATE_LIMITED
    cause = error.__cause__
    if isinstance(cause, UpstreamStatus):
        return SERVER_ERROR if cause.status >= 500 else CLIENT_ERROR
    if isinstance(cause, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return TIMEOUT
    if isinstance(cause, aiohttp.ClientConnectorError):
        return CONNECT
    if isinstance(cause, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                          ConnectionError)):  # fmt: skip
        return RESET
    if isinstance(error, UpstreamTimeoutError):
        return TIMEOUT
    if isinstance(error, BadUpstreamResponseError) or isinstance(cause, aiohttp.ClientError):
        return PROTOCOL
    status = error.status if isinstance(error, LLMKitError) else 500
    return SERVER_ERROR if status >= 500 else CLIENT_ERROR


class Observability:
    """One worker's metrics, tracing and access log, configured once at boot."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics | None,
        tracing: Tracing | None = None,
        access: AccessLog | None = None,
    ) -> None:
        self.metrics = metrics if config.observability.metrics else None
        self.series = metrics.series if metrics is not None else Series.of(config)
        self.tracing = tracing or Tracing.off()
        self.access = access
        self.active = self.metrics is not None or self.tracing.enabled or access is not None

    @classmethod
    def build(
        cls, config: Config, metrics: Metrics | None, exporter: SpanExporter | None = None
    ) -> Observability:
        """From ``[observability]``; ``exporter`` replaces OTLP export (tests)."""
        settings = config.observability
        access = None
        if settings.access_log:
            access = AccessLog(settings.access_log_path, settings.log_prompts)
        return cls(config, metrics, build_tracing(settings, exporter), access)

    def begin(
        self, route: int, method: str, path: str, request_id: str, traceparent: str | None
    ) -> RequestObs | None:
        """A request's recorder; None when metrics, tracing and the log are all off."""
        if not self.active:
            return None
        parent = None
        if self.tracing.enabled and route < _MODEL_ROUTES:  # no traces of /health, /metrics
            parent = self.tracing.sample(traceparent)
        return RequestObs(self, route, method, path, request_id, parent)

    def close(self) -> None:
        self.tracing.shutdown()
        if self.access is not None:
            self.access.close()


class RequestObs:
    """One request's observations; every hook is cheap and allocation-free unless the
    request is sampled for tracing."""

    __slots__ = (
        "_o", "route", "method", "path", "request_id", "started", "model", "key", "series",
        "target", "attempts", "usage", "finish_reasons", "error_kind", "role", "ttft",
        "messages", "span", "_attempt_span",
    )  # fmt: skip

    def __init__(
        self,
        obs: Observability,
        route: int,
        method: str,
        path: str,
        request_id: str,
        parent: Context | None,
    ) -> None:
        self._o = obs
        self.route = route
        self.method = method
        self.path = path
        self.request_id = request_id
        self.started = time.perf_counter()
        self.model: str | None = None
        self.key: str | None = None
        self.series = obs.series.unrouted
        self.target: Target | None = None
        self.attempts = 0
        self.usage: Usage | None = None
        self.finish_reasons: list[str] | None = None
        self.error_kind: int | None = None
        self.role: str | None = None
        self.ttft: float | None = None
        self.messages: Any = None
        self._attempt_span: Span | None = None
        self.span: Span | None = None
        if parent is not None:
            attributes = {"http.request.method": method, "url.path": path,
                          "llmkit.request_id": request_id}  # fmt: skip
            name = f"{method} {ROUTES[route]}"
            self.span = obs.tracing.start(name, parent, now_ns(), attributes, server=True)

    @property
    def sampled(self) -> bool:
        return self.span is not None

    def mark(self) -> int:
        """A span start time when sampled, else 0 (no clock read)."""
        return now_ns() if self.span is not None else 0

    # -- pipeline hooks -------------------------------------------------------------

    def routed(self, call: Call, targets: Sequence[Target], mark: int) -> None:
        """The model resolved to ``targets`` (ordered by the router when ``mark``)."""
        self.model = call.request.model
        self.key = call.key
        if targets:
            first = targets[0]
            self.series = self._o.series.target_of(first.deployment, first.provider.name)
        access = self._o.access
        if access is not None and access.log_prompts:
            self.messages = call.request.messages
        if self.span is not None:
            operation = MODEL_ROUTES[self.route] if self.route < _MODEL_ROUTES else "chat"
            self.span.update_name(f"{operation} {self.model}")
            self.span.set_attributes({
                "gen_ai.operation.name": operation, "gen_ai.request.model": self.model,
                "llmkit.key": self.key or "",
            })  # fmt: skip
            if mark:
                candidates = [t.deployment for t in targets]
                self._stage("llmkit.router", mark, {"llmkit.router.order": candidates})

    def admitted(self, mark: int, refused: bool) -> None:
        """The request's own limits (global, key) admitted or refused it."""
        if self.span is not None and mark:
            self._stage("llmkit.limiter", mark, {"llmkit.limiter.refused": refused})

    def attempt_started(self, target: Target, call: Call) -> None:
        """An admitted try at ``target`` is about to go upstream."""
        series = self._o.series.target_of(target.deployment, target.provider.name)
        metrics = self._o.metrics
        if metrics is not None:
            if self.attempts and self.target is not None:
                if self.target.deployment == target.deployment:
                    metrics.record_retry(series)
                else:
                    metrics.record_fallback(self.series)
            metrics.record_attempt(series)
        self.attempts += 1
        self.target = target
        self.series = series
        if self.span is not None:
            operation = MODEL_ROUTES[self.route] if self.route < _MODEL_ROUTES else "chat"
            attributes = {
                "gen_ai.operation.name": operation, "gen_ai.request.model": target.model,
                "gen_ai.provider.name": target.provider.name,
                "llmkit.deployment": target.deployment, "llmkit.attempt": self.attempts,
            }  # fmt: skip
            span = self._o.tracing.child(
                f"{operation} {target.model}", self.span, now_ns(), attributes, client=True
            )
            self._attempt_span = span
            call.headers["traceparent"] = traceparent_of(span)

    def attempt_settled(self, ok: bool | None, error: BaseException | None) -> None:
        """The current try ended: answered (``ok``), failed, or abandoned (None)."""
        if error is not None:
            kind = error_kind(error)
            self.error_kind = kind
            if self._o.metrics is not None:
                self._o.metrics.record_error(self.series, kind)
        span = self._attempt_span
        if span is not None:
            self._attempt_span = None
            if error is not None:
                _fail(span, ERROR_KINDS[error_kind(error)])
            span.set_attribute("llmkit.outcome", _OUTCOMES[ok])
            span.end(now_ns())

    def first_token(self) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started

    def settled(self, usage: Usage | None) -> None:
        """The tokens the serving upstream reported (None: unknown)."""
        if usage is not None:
            self.usage = usage

    def answered(self, finish_reasons: list[str]) -> None:
        self.finish_reasons = finish_reasons

    def multiplexer_role(self, role: str) -> None:
        """``leader`` or ``follower``: set by the multiplexer for deduplicated requests."""
        self.role = role
        if self.span is not None:
            self.span.set_attribute("llmkit.multiplexer.role", role)

    def finish(self, status: int) -> None:
        """The response is complete: update metrics, write the log line, end the span."""
        elapsed = time.perf_counter() - self.started
        o = self._o
        metrics = o.metrics
        cost = self._cost()
        if metrics is not None:
            metrics.record_http(self.route, status, elapsed)
            if self.route < _MODEL_ROUTES:
                key = o.series.key_of(self.key)
                metrics.record_request(self.series, self.route, status, elapsed, key)
                usage = self.usage
                if usage is not None:
                    metrics.record_usage(self.series, key, usage.prompt_tokens,
                                         usage.completion_tokens, cost)  # fmt: skip
                if self.ttft is not None:
                    metrics.record_ttft(self.series, self.ttft)
        if o.access is not None:
            o.access.write(self._record(status, elapsed, cost))
        if self.span is not None:
            self._end_root(status, cost)

    # -- helpers ----------------------------------------------------------------------

    def _cost(self) -> float:
        target, usage = self.target, self.usage
        if target is None or usage is None or target.price is None:
            return 0.0
        return target.price.cost(usage)

    def _stage(self, name: str, mark: int, attributes: dict[str, Any]) -> None:
        assert self.span is not None
        self._o.tracing.child(name, self.span, mark, attributes).end(now_ns())

    def _record(self, status: int, elapsed: float, cost: float) -> dict[str, object]:
        target, usage = self.target, self.usage
        record: dict[str, object] = {
            "time": round(time.time(), 3), "request_id": self.request_id,
            "method": self.method, "path": self.path, "status": status,
            "duration_ms": round(elapsed * 1000, 3), "model": self.model,
            "deployment": target.deployment if target else None,
            "provider": target.provider.name if target else None, "key": self.key,
            "tokens_in": usage.prompt_tokens if usage else None,
            "tokens_out": usage.completion_tokens if usage else None,
            "cost_usd": cost if usage else None, "attempts": self.attempts,
            "dedup_role": self.role,
            "error_kind": ERROR_KINDS[self.error_kind] if self.error_kind is not None else None,
        }  # fmt: skip
        if self.span is not None:
            record["trace_id"] = f"{self.span.get_span_context().trace_id:032x}"
        if self.messages is not None:
            record["messages"] = self.messages
        return record

    def _end_root(self, status: int, cost: float) -> None:
        span = self.span
        assert span is not None
        attributes: dict[str, Any] = {"http.response.status_code": status,
                                      "llmkit.attempts": self.attempts}  # fmt: skip
        target, usage = self.target, self.usage
        if target is not None:
            attributes["gen_ai.provider.name"] = target.provider.name
            attributes["gen_ai.response.model"] = target.model
            attributes["llmkit.deployment"] = target.deployment
        if usage is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
            attributes["llmkit.cost_usd"] = cost
        if self.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = self.finish_reasons
        span.set_attributes(attributes)
        if status >= 400:
            kind = self.error_kind
            _fail(span, ERROR_KINDS[kind] if kind is not None and status >= 500 else str(status))
        if self._attempt_span is not None:  # a stream the client left mid-way
            self._attempt_span.end(now_ns())
        span.end(now_ns())


_OUTCOMES = {True: "ok", False: "failed", None: "released"}


def _fail(span: Span, error_type: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR))

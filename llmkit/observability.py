"""Observability of every request: shared-memory metrics, sampled tracing, the access log.

The pieces live in their own modules: ``llmkit.metrics`` (series, shm layout, recording),
``llmkit.collector`` (the prometheus_client collector, ``MetricSource`` for regions
declared elsewhere), ``llmkit.tracing`` (sampling, ``traceparent``, spans) and
``llmkit.accesslog``. This module ties them to one request.

Metrics cost no per-request object and no hook call: the pipeline already keeps what
they need for its own books (``Call.run`` is the request's ``attempts.Run``: its tries,
their targets and errors, the first byte's time, the usage), so when a request is over
the HTTP surface calls ``Observability.count`` once, which reads those and makes one C
call: every add of the request at offsets packed once per kind of request (a *plan*:
route, deployment, key), the worker slot's ``served`` among them, with the duration,
time to first token and cost computed in C from the clock and the plan's prices
(``Atomics.record_finished``; ``record_request`` for the rarer kinds). Measured with
``bench/observability_bench.py --instructions``: this and the request's arrival time
(read by ``WorkerSlot.enter``, in the call that counts it in flight) are all that
metrics add to a request.

Tracing and the access log do need a recorder: the surface calls ``Observability.begin``,
which returns a ``TracedRequest`` for a request that is sampled (a countdown, see
``llmkit.tracing``), a ``RequestObs`` for one only logged, and None for any other, so an
unsampled request pays one ``is not None`` test per hook. A sampled request's hooks note
span ids and times, and ``finish`` writes its trace as OTLP bytes (``TracedRequest``).
Hooks (who calls what): the HTTP surface ``begin`` / ``answered`` / ``finish``;
``Gateway._run`` ``mark`` + ``routed``; ``Run.admit`` ``mark`` + ``admitted``;
``Run._open`` ``attempt_started``; ``Attempt._settle`` ``attempt_settled``;
``Run.close`` ``settled``; the multiplexer ``multiplexer_role``.

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
from collections.abc import Callable, Sequence
from time import monotonic_ns, time_ns
from typing import TYPE_CHECKING, Any, TypeVar

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
    ATTEMPTS,
    DURATION_BOUNDS,
    ERROR_KINDS,
    ERRORS,
    FALLBACKS,
    MODEL_ROUTES,
    RETRIES,
    ROUTES,
    STATUSES,
    Metrics,
    Series,
    declare,
    route_index,
    status_index,
)
from llmkit.otlp import (
    CHILD_HEAD,
    CLIENT,
    DOUBLE,
    END_TAG,
    FLAGS,
    INTERNAL,
    SERVER,
    SPAN_ID,
    START_TAG,
    IntAttribute,
    child_prefix,
    child_shape,
    children_pack,
    double_prefix,
    key_field,
    span_tail,
    string_attribute,
    trace_spans,
)
from llmkit.pricing import cached_tokens
from llmkit.tracing import TRACEPARENT, Tracing, build_tracing
from llmkit.upstream import UpstreamStatus

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from llmkit.attempts import Attempt
    from llmkit.providers.base import Call, Target
    from llmkit.types import Choice, Usage
    from shm._atomics import RequestPlan
    from shm.cells import WorkerSlot

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
    "TracedRequest",
    "declare",
    "error_kind",
    "route_index",
    "status_index",
]

(TIMEOUT, CONNECT, RATE_LIMITED, SERVER_ERROR, CLIENT_ERROR, PROTOCOL, RESET) = range(
    len(ERROR_KINDS)
)
_MODEL_ROUTES = len(MODEL_ROUTES)  # route indexes below this carry a model
_SERIES_MAX = 8192
_SHAPES_MAX = 4096
_TraceShape = tuple[bytes, Callable[..., bytes], tuple[bytes, ...]]
_Shape = TypeVar("_Shape", tuple[bytes, bytes], _TraceShape)


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
        self.counting = self.metrics is not None
        self.detailed = self.tracing.enabled or access is not None
        self.active = self.counting or self.detailed
        self._traced = self.tracing.enabled
        self.logging = access is not None
        self.log_prompts = access is not None and access.log_prompts
        # Head sampling (``Tracing.draw``): the requests left before the next one drawn.
        # The HTTP surface counts it down inline; ``begin`` draws the next when it is < 0.
        self._draw, self._new_trace = self.tracing.draw, self.tracing.root
        self.countdown = self._draw()
        self.bits = self.tracing.bits  # attempt span ids, as ``Tracing.span_id`` draws them
        # Encoded span parts many requests share, by what they are made of (``keep``).
        self.shapes: dict[Any, Any] = {}
        self._deployments = self.series.deployments
        self._series = dict(self._deployments)  # deployment name -> series, see series_of
        self._unrouted = self.series.unrouted
        self._no_key = self.series.no_key
        self.key_index: dict[str | None, int] = {None: self._no_key}
        self.key_index.update(self.series.key_index)
        # Words every counted request adds 1 to as well (``count_served``).
        self._served: tuple[int, ...] = ()
        # The usual request's plan by model route, deployment and key name: see ``count``.
        self._finished: list[dict[str, dict[str | None, RequestPlan]]] = [
            {} for _ in range(_MODEL_ROUTES)
        ]
        if self.metrics is not None:
            self._record = self.metrics.atomics.record_finished

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
        self,
        route: int,
        method: str,
        path: str,
        request_id: str,
        traceparent: str | None,
        counted: bool = False,
    ) -> RequestObs | None:
        """The recorder of a request that is sampled or logged; None for any other (its
        metrics are counted by ``count``, from the pipeline's own objects). ``counted``:
        the caller has counted this request down already (``countdown``): the HTTP
        surface calls this only for a request with a ``traceparent``, the one drawn or
        an access log, so the others pay one header probe and one decrement."""
        if not counted:
            self.countdown -= 1
        drawn = self.countdown < 0
        if drawn:
            self.countdown = self._draw()  # the next gap
        if route < _MODEL_ROUTES and self._traced:  # no traces of /health, /metrics
            if traceparent is None:
                if drawn:
                    trace, root = self._new_trace()
                    return TracedRequest(self, route, method, path, request_id, trace, root, None)
            else:
                sampled = self.tracing.sample(traceparent, drawn)
                if sampled is not None:
                    return TracedRequest(self, route, method, path, request_id, *sampled)
        if self.access is None:
            return None
        return RequestObs(self, route, method, path, request_id)

    def count_served(self, slot: WorkerSlot) -> None:
        """Make every ``count`` also count ``slot``'s request as served (``leave``), in
        the same C call as its metrics; the caller then does not ``leave`` itself."""
        self._served = (slot.served_offset,)
        self._finished = [{} for _ in range(_MODEL_ROUTES)]  # plans made before lack it

    def count(self, route: int, status: int, started_ns: int, call: Call | None) -> None:
        """Count a finished request (only when ``counting``): ``started_ns`` is when it
        arrived (``time.monotonic_ns``), ``call`` its chat call if one was decoded. The
        call's run knows the rest: its tries, the tokens, the first byte.

        The usual request (one attempt that did not fail, a plan made for its route,
        deployment and key) costs a few attribute reads, one dict probe and one C call,
        which reads the clock and prices the tokens itself (``record_finished``); any
        other goes the long way, and plans the usual one's kind for next time."""
        if call is not None and (run := call.run) is not None and len(run.attempts) == 1:
            attempt = run.attempts[0]
            try:  # nested dicts: cheaper than hashing a tuple of the three
                plan = self._finished[route][attempt.target.deployment][call.key]
            except KeyError:
                plan = None
            if plan is not None and attempt.error is None:
                usage = run.usage
                if usage is None:
                    self._record(plan, status, started_ns, attempt.first_byte_ns, 0, 0, 0)
                    return
                cached = 0 if usage.prompt_tokens_details is None else cached_tokens(usage)
                self._record(plan, status, started_ns, attempt.first_byte_ns,
                             usage.prompt_tokens, usage.completion_tokens, cached)  # fmt: skip
                return
        self._count_other(route, status, (monotonic_ns() - started_ns) / 1e9, started_ns, call)

    def _count_other(
        self, route: int, status: int, seconds: float, started_ns: int, call: Call | None
    ) -> None:
        """``count`` for all but the usual request; also plans the usual one's words."""
        metrics = self.metrics
        assert metrics is not None
        if route >= _MODEL_ROUTES:
            metrics.record_http(route, status, seconds, *self._served)
            return
        run = call.run if call is not None else None
        if run is None:  # refused before routing (400, 401, 404) or a multiplexer follower
            metrics.record_model_request(
                route, status, seconds, self._unrouted, self._no_key, 0, 0, 0.0, None, (),
                self._served,
            )  # fmt: skip
            return
        assert call is not None
        key = self.key_index.get(call.key, self._no_key)
        attempts, ttft = run.attempts, None
        words: Sequence[int] | None = None  # None: one attempt, at target, that did not fail
        if attempts:
            last = attempts[-1]
            target: Target | None = last.target
            series = self.series_of(last.target)
            if len(attempts) > 1 or last.error is not None:
                words = self._attempt_words(metrics, attempts)
            if last.first_byte_ns:
                ttft = (last.first_byte_ns - started_ns) / 1e9
        else:  # every deployment refused by a limit or an open breaker
            target = run.targets[0] if run.targets else None
            series = self.series_of(target) if target is not None else self._unrouted
            words = ()
        usage, cost, tokens_in, tokens_out = run.usage, 0.0, 0, 0
        if usage is not None:
            tokens_in, tokens_out = usage.prompt_tokens, usage.completion_tokens
            if target is not None and target.price is not None:
                cost = target.price.cost(usage)
        metrics.record_model_request(
            route, status, seconds, series, key, tokens_in, tokens_out, cost, ttft, words,
            self._served,
        )  # fmt: skip
        if words is None and target is not None:  # the usual kind: ``count``'s from now on
            plan = metrics.plan(route, series, key, True, target.price, self._served)
            self._plan_usual(route, target, call.key, plan)

    def _plan_usual(self, route: int, target: Target, key: str | None, plan: RequestPlan) -> None:
        """Keep ``plan`` for ``count``: route -> deployment -> key name (bounded)."""
        by_deployment = self._finished[route]
        if len(by_deployment) >= _SERIES_MAX:  # direct provider/model names are unbounded
            by_deployment.clear()
        by_key = by_deployment.setdefault(target.deployment, {})
        if len(by_key) >= _SERIES_MAX:  # so are key names, in principle
            by_key.clear()
        by_key[key] = plan

    def _attempt_words(self, metrics: Metrics, attempts: Sequence[Attempt]) -> list[int]:
        """The words a run's tries add 1 to: attempts, errors by kind, and each later
        try a retry (same deployment) or a fallback (of the one it moved away from)."""
        words: list[int] = []
        previous: tuple[str, int] | None = None
        for attempt in attempts:
            target = attempt.target
            stats = metrics.targets[self.series_of(target)]
            words.append(stats + ATTEMPTS)
            if previous is not None:
                if previous[0] == target.deployment:
                    words.append(stats + RETRIES)
                else:
                    words.append(previous[1] + FALLBACKS)
            if attempt.error is not None:
                words.append(stats + ERRORS + 8 * error_kind(attempt.error))
            previous = (target.deployment, stats)
        return words

    def keep(self, key: tuple[Any, ...], shape: _Shape) -> _Shape:
        """``shape`` (encoded span parts) as the one for ``key`` in ``shapes``."""
        if len(self.shapes) >= _SHAPES_MAX:
            self.shapes.clear()
        self.shapes[key] = shape
        return shape

    def series_of(self, target: Target) -> int:
        """The metric series of an attempt at ``target`` (``Series.target_of``), kept
        by deployment name for ``count`` (direct ``provider/model`` names included)."""
        index = self._deployments.get(target.deployment)
        if index is None:
            index = self.series.target_of("", target.provider.name)
        if len(self._series) >= _SERIES_MAX:  # direct names are unbounded: bound the memo
            self._series = dict(self._deployments)
        self._series[target.deployment] = index
        return index

    def close(self) -> None:
        """Flush and stop tracing and the access log (no event loop needed)."""
        self.tracing.shutdown()
        if self.access is not None:
            self.access.close()

    async def aclose(self) -> None:
        """``close``, from the worker's event loop: its sessions are closed too."""
        await self.tracing.aclose()
        if self.access is not None:
            self.access.close()


class RequestObs:
    """A request written to the access log but not sampled: keeps what the log line says.
    Its hooks count nothing (``Observability.count`` does that for every request alike),
    and ``mark()`` reads no clock. A sampled request's recorder is ``TracedRequest``."""

    __slots__ = ("_o", "route", "method", "path", "request_id", "started", "key", "model",
                 "target", "attempts", "usage", "error_kind", "role", "finish_reasons",
                 "messages")  # fmt: skip

    trace: bytes | None = None  # a sampled request's trace id field (``TracedRequest``)
    # A span start time when sampled, else 0: ``int()``, a C call like ``time_ns()``, so
    # the pipeline's ``obs.mark()`` costs no Python frame either way.
    mark: Callable[[], int] = int

    def __init__(self, obs: Observability, route: int, method: str, path: str,
                 request_id: str) -> None:  # fmt: skip
        self._o = obs
        self.route = route
        self.method = method
        self.path = path
        self.request_id = request_id
        self.started = time_ns()
        self.key: str | None = None
        self.model: str | None = None
        self.target: Target | None = None
        self.attempts = 0
        self.usage: Usage | None = None
        self.error_kind: int | None = None
        self.role: str | None = None
        self.finish_reasons: tuple[str, ...] | None = None
        self.messages: Any = None

    @property
    def sampled(self) -> bool:
        return self.trace is not None

    # -- pipeline hooks -------------------------------------------------------------

    def routed(self, call: Call, targets: Sequence[Target], mark: int) -> None:
        """The model resolved to ``targets`` (ordered by the router when ``mark``)."""
        self.key = call.key
        self.model = call.request.model
        if self._o.log_prompts:
            self.messages = call.request.messages

    def admitted(self, mark: int, refused: bool) -> None:
        """The request's own limits (global, key) admitted or refused it."""

    def attempt_started(self, target: Target, headers: dict[str, str]) -> None:
        """An admitted try at ``target`` is about to go upstream with ``headers``."""
        self.attempts += 1
        self.target = target

    def attempt_settled(self, ok: bool | None, error: BaseException | None) -> None:
        """The current try ended: answered (``ok``), failed, or abandoned (None)."""
        if error is not None:
            self.error_kind = error_kind(error)

    def settled(self, usage: Usage | None) -> None:
        """The tokens the serving upstream reported (None: unknown)."""
        if usage is not None:
            self.usage = usage

    def answered(self, choices: Sequence[Choice]) -> None:
        """A sampled request's answer: its choices' finish reasons go on the root span."""
        if len(choices) == 1:
            reason = choices[0].finish_reason
            self.finish_reasons = (reason,) if reason else None
        else:
            self.finish_reasons = tuple([c.finish_reason for c in choices if c.finish_reason])

    def multiplexer_role(self, role: str) -> None:
        """``leader`` or ``follower``: set by the multiplexer for deduplicated requests."""
        self.role = role

    def finish(self, status: int) -> None:
        """The response is complete: write the log line."""
        self.log(status)

    def log(self, status: int) -> None:
        access = self._o.access
        if access is not None:
            elapsed_ms = (time_ns() - self.started) / 1e6
            access.write(self._record(status, elapsed_ms, self._cost()))

    def _cost(self) -> float:
        target, usage = self.target, self.usage
        if target is None or usage is None or target.price is None:
            return 0.0
        return target.price.cost(usage)

    def _record(self, status: int, elapsed_ms: float, cost: float) -> dict[str, object]:
        target, usage = self.target, self.usage
        record: dict[str, object] = {
            "time": round(time.time(), 3), "request_id": self.request_id,
            "method": self.method, "path": self.path, "status": status,
            "duration_ms": round(elapsed_ms, 3), "model": self.model,
            "deployment": target.deployment if target else None,
            "provider": target.provider.name if target else None, "key": self.key,
            "tokens_in": usage.prompt_tokens if usage else None,
            "tokens_out": usage.completion_tokens if usage else None,
            "cost_usd": cost if usage else None, "attempts": self.attempts,
            "dedup_role": self.role,
            "error_kind": ERROR_KINDS[self.error_kind] if self.error_kind is not None else None,
        }  # fmt: skip
        if self.trace is not None:
            record["trace_id"] = self.trace.hex()
        if self.messages is not None:
            record["messages"] = self.messages
        return record


class TracedRequest(RequestObs):
    """A request sampled for tracing (and maybe logged too). Its hooks note ids and times
    in slots; ``finish`` writes the trace as OTLP protobuf (``llmkit.otlp``): the child
    spans (router, limiter, the last attempt) in one ``struct`` pack between bytes cached
    per shape of trace (``children_pack``), the root span from cached parts and the
    request's own id, tokens and cost. An attempt that another follows is written when
    the next one starts.

    Ids: the trace id and root span id are drawn at ``begin``, each attempt span's id
    when it starts (it leaves in the upstream ``traceparent``). The router and limiter
    spans, which never leave the process, take the root's id XOR a constant
    (``_ROUTER_ID``, ``_LIMITER_ID``): unique within the trace, as unpredictable as the
    root's, never zero (the root is odd, the constants even), and two draws cheaper.

    Times are epoch nanoseconds (``time_ns``); 0 is "not yet". ``started`` is the root
    span's start, which the access log's duration reads as well. A child span is in the
    trace when its hook ran: the router's when ``_order`` is set, the limiter's when
    ``_refused`` is, an attempt's when ``attempts`` counts it."""

    __slots__ = ("trace", "_root", "_parent", "_order", "_routed", "_routed_end", "_refused",
                 "_admitted", "_admitted_end", "_span", "_span_start", "_span_end", "_ok",
                 "_kind", "_spans")  # fmt: skip

    trace: bytes
    mark: Callable[[], int] = time_ns

    def __init__(self, obs: Observability, route: int, method: str, path: str,
                 request_id: str, trace: bytes, root: int, parent: bytes | None
                 ) -> None:  # fmt: skip
        self._o = obs
        self.route = route
        self.method = method
        self.path = path
        self.request_id = request_id
        self.key = self.model = self.target = self.usage = self.error_kind = None
        self.role = self.finish_reasons = self.messages = None
        self.attempts = 0
        # The trace id field, root span id and remote parent (``tracing``).
        self.trace = trace
        self._root = root
        self._parent = parent
        # The router's order (a deployment, or their tuple), the limiter's verdict, times.
        self._order: str | tuple[str, ...] | None = None
        self._refused: bool | None = None
        self._routed = self._routed_end = self._admitted = self._admitted_end = 0
        # The last attempt's span: id (0: none yet), times, outcome and error kind.
        self._span = self._span_start = self._span_end = 0
        self._ok: bool | None = None
        self._kind: int | None = None
        self._spans: list[bytes] = []  # spans written already: earlier attempts
        self.started = time_ns()

    def routed(self, call: Call, targets: Sequence[Target], mark: int) -> None:
        self.key = call.key
        self.model = call.request.model
        if self._o.log_prompts:
            self.messages = call.request.messages
        if mark:
            # One deployment: its name is the shape's key (no tuple built and hashed).
            self._order = targets[0].deployment if len(targets) == 1 else tuple(
                [target.deployment for target in targets])  # fmt: skip
            self._routed = mark
            self._routed_end = time_ns()

    def admitted(self, mark: int, refused: bool) -> None:
        self._refused = refused
        self._admitted = mark
        self._admitted_end = time_ns()

    def attempt_started(self, target: Target, headers: dict[str, str]) -> None:
        if self._span:  # an earlier attempt: its span is written now, the last at finish
            if not self._span_end:
                self.attempt_settled(None, None)
            self._spans.append(self._attempt_span())
        self.attempts += 1
        self.target = target
        self._span = span_id = self._o.bits(64) | 1
        self._span_start = time_ns()
        self._span_end = 0
        headers[TRACEPARENT] = f"00-{self.trace.hex()}-{SPAN_ID(span_id).hex()}-01"

    def attempt_settled(self, ok: bool | None, error: BaseException | None) -> None:
        kind = None
        if error is not None:
            kind = self.error_kind = error_kind(error)
        if self._span and not self._span_end:  # the open attempt
            self._span_end = time_ns()
            self._ok = ok
            self._kind = kind

    def finish(self, status: int) -> None:
        """The response is complete: write the log line, record the trace."""
        if self._o.access is not None:
            self.log(status)
        if self._span and not self._span_end:  # a stream the client left mid-way
            self.attempt_settled(None, None)
        target, usage, parent, root = self.target, self.usage, self._parent, self._root
        # All of the trace but ids, times, the request id, tokens and cost: the root's
        # attributes (status, attempts and error kind take a few values, and so with
        # the rest are one cached part) and the shapes of its child spans.
        key = (self.route, self.path, self.model, self.key,
               target.deployment if target is not None else None, self.finish_reasons,
               self.role, status, self.attempts, self.error_kind, parent is None,
               self._order, self._refused, self._ok, self._kind)  # fmt: skip
        shape = self._o.shapes.get(key) or self._o.keep(key, self._trace_shape(status))
        shared, pack, runs = shape
        prefix = child_prefix(self.trace, root)
        # The usual trace (router, limiter, an attempt): the arguments ``_children`` builds.
        if self._order is not None and self._refused is not None and self.attempts:
            first, second, third, last = runs
            self._spans.append(pack(
                first, prefix, root ^ _ROUTER_ID, START_TAG, self._routed, END_TAG,
                self._routed_end,
                second, prefix, root ^ _LIMITER_ID, START_TAG, self._admitted, END_TAG,
                self._admitted_end,
                third, prefix, self._span, START_TAG, self._span_start, END_TAG, self._span_end,
                last))  # fmt: skip
        else:
            self._spans.append(pack(*self._children(runs, prefix)))
        request_id = self.request_id.encode()
        if len(request_id) < len(_REQUEST_IDS):
            tail = [b"", shared, _REQUEST_IDS[len(request_id)], request_id]
        else:
            tail = [b"", shared, string_attribute(_REQUEST_ID, self.request_id)]
        if usage is not None:
            price = target.price if target is not None else None
            cost = 0.0
            if price is not None:  # Price.cost, inline: the same arithmetic, bit for bit
                if usage.prompt_tokens_details is None:
                    cost = (usage.prompt_tokens * price.input
                            + usage.completion_tokens * price.output) / 1_000_000  # fmt: skip
                else:
                    cost = price.cost(usage)
            tail += (_TOKENS_IN[usage.prompt_tokens], _TOKENS_OUT[usage.completion_tokens],
                     _COST, DOUBLE(cost))  # fmt: skip
        self._o.tracing.record(trace_spans(self.trace, root, parent, self.started, time_ns(),
                                           tail, self._spans))  # fmt: skip

    def _children(self, runs: tuple[bytes, ...], prefix: bytes) -> list[Any]:
        """``children_pack``'s arguments for whichever child spans this trace has."""
        spans = []
        if self._order is not None:
            spans.append((self._root ^ _ROUTER_ID, self._routed, self._routed_end))
        if self._refused is not None:
            spans.append((self._root ^ _LIMITER_ID, self._admitted, self._admitted_end))
        if self.attempts:
            spans.append((self._span, self._span_start, self._span_end))
        args: list[Any] = [runs[0]]
        for (span_id, start, end), run in zip(spans, runs[1:], strict=True):
            args += (prefix, span_id, START_TAG, start, END_TAG, end, run)
        return args

    def _trace_shape(self, status: int) -> _TraceShape:
        """The root's cached part (``_root_tail``) and its children's pack and runs."""
        shapes = []
        if self._order is not None:
            shapes.append(router_shape(self._order))
        if self._refused is not None:
            shapes.append(_LIMITER[self._refused])
        if self.attempts:
            assert self.target is not None
            shapes.append(self._attempt_shape(self.target, self.attempts, self._ok, self._kind))
        return (self._root_tail(status), *children_pack(shapes))

    def _attempt_span(self) -> bytes:
        """The last attempt's span, whole (one that another attempt follows)."""
        target = self.target
        assert target is not None
        key = (self.route, target.deployment, self.attempts, self._ok, self._kind)
        head, tail = self._o.shapes.get(key) or self._o.keep(
            key, self._attempt_shape(target, self.attempts, self._ok, self._kind)
        )
        prefix = child_prefix(self.trace, self._root)
        return head + CHILD_HEAD(prefix, self._span, START_TAG, self._span_start, END_TAG,
                                 self._span_end) + tail  # fmt: skip

    def _attempt_shape(
        self, target: Target, number: int, ok: bool | None, kind: int | None
    ) -> tuple[bytes, bytes]:
        operation = self._operation()
        values = {
            "gen_ai.operation.name": operation, "gen_ai.request.model": target.model,
            "gen_ai.provider.name": target.provider.name,
            "llmkit.deployment": target.deployment, "llmkit.attempt": number,
        }  # fmt: skip
        if _OUTCOMES[ok] is not None:
            values["llmkit.outcome"] = _OUTCOMES[ok]
        error = ERROR_KINDS[kind] if kind is not None else None
        return child_shape(f"{operation} {target.model}", CLIENT, values, error)

    def _operation(self) -> str:
        return MODEL_ROUTES[self.route] if self.route < _MODEL_ROUTES else "chat"

    def _root_tail(self, status: int) -> bytes:
        """The root span's name, kind, flags and the attributes many requests share."""
        operation = self._operation() if self.model is not None else None
        values: dict[str, Any] = {"http.request.method": self.method, "url.path": self.path}
        if operation is not None:
            values["gen_ai.operation.name"] = operation
            values["gen_ai.request.model"] = self.model
            values["llmkit.key"] = self.key or ""
        target = self.target
        if target is not None:
            values["gen_ai.provider.name"] = target.provider.name
            values["gen_ai.response.model"] = target.model
            values["llmkit.deployment"] = target.deployment
        if self.finish_reasons:
            values["gen_ai.response.finish_reasons"] = list(self.finish_reasons)
        if self.role is not None:
            values["llmkit.multiplexer.role"] = self.role
        values["http.response.status_code"] = status
        values["llmkit.attempts"] = self.attempts
        error = None
        if status >= 400:
            kind = self.error_kind
            error = ERROR_KINDS[kind] if kind is not None and status >= 500 else str(status)
        name = f"{operation} {self.model}" if operation else f"{self.method} {ROUTES[self.route]}"
        return span_tail(name, SERVER, values, error) + FLAGS[self._parent is not None]


def router_shape(order: str | tuple[str, ...]) -> tuple[bytes, bytes]:
    deployments = [order] if isinstance(order, str) else list(order)
    return child_shape("llmkit.router", INTERNAL, {"llmkit.router.order": deployments})


# Span ids of the router and limiter spans: the root's XOR these (``TracedRequest``).
# Distinct, even (an odd root stays odd) and not zero.
_ROUTER_ID, _LIMITER_ID = 0x5F3759DF_9E3779B8, 0x2545F491_4F6CDD1E
_OUTCOMES = {True: "ok", False: "failed", None: "released"}
_LIMITER = {refused: child_shape("llmkit.limiter", INTERNAL, {"llmkit.limiter.refused": refused})
            for refused in (False, True)}  # fmt: skip
_REQUEST_ID = key_field("llmkit.request_id")
# A request id's KeyValue up to the id's bytes, by the id's length: one byte per length.
_REQUEST_IDS = [bytes((0x4A, size + 23)) + _REQUEST_ID + bytes((0x12, size + 2, 0x0A, size))
                for size in range(105)]  # fmt: skip
_COST = double_prefix("llmkit.cost_usd")
_TOKENS_IN = IntAttribute("gen_ai.usage.input_tokens")
_TOKENS_OUT = IntAttribute("gen_ai.usage.output_tokens")

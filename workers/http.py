"""The HTTP surface (aiohttp's low-level ``web.Server``): routes, SSE framing, the one
error mapping.

Requests enter through ``HttpSurface.handle``, one coroutine that dispatches on
``(path, method)`` from a dict and owns the accounting every request needs on every
path (success, error, client gone): the worker's in-flight cell, the request counter
and the latency histogram in shared memory. ``web.Application`` would add a router,
match-info objects and a handler chain per request; measured here, that was a tenth
of a proxied request's CPU, so the surface dispatches by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from llmkit import observability
from llmkit.errors import (
    BodyTooLargeError,
    HeaderTooLargeError,
    InternalError,
    InvalidRequestError,
    LLMKitError,
    MethodNotAllowedError,
    NotFoundError,
    PermissionDeniedError,
)
from llmkit.gateway import Gateway
from llmkit.multiplexer import HEADER as DEDUP_HEADER
from llmkit.observability import Metrics, Observability, RequestObs, ShmCollector
from llmkit.providers.base import PROPAGATED_HEADERS, SSE_DONE, Call, Target
from llmkit.state import METRIC_SOURCES
from llmkit.tracing import TRACEPARENT
from llmkit.types import encoder
from shm import WorkerSlot
from workers import request_ids

log = logging.getLogger("llmkit.http")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
JSON_TYPE = {"Content-Type": "application/json"}
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
CLIENT_GONE = 499
OTHER_ROUTE = observability.route_index("other")
# Client headers ``chat`` passes on (``traceparent`` is one, read by ``handle``).
FORWARDED_HEADERS = (*[name for name in PROPAGATED_HEADERS if name != TRACEPARENT],
                     DEDUP_HEADER)  # fmt: skip


class HttpSurface:
    """Routes for one worker over one ``Gateway``."""

    def __init__(
        self,
        gateway: Gateway,
        metrics: Metrics,
        slot: WorkerSlot,
        observability: Observability | None = None,
    ) -> None:
        self._gateway = gateway
        self._metrics = metrics
        self._observe = observability or Observability.build(gateway.config, metrics)
        self._observe.count_served(slot)
        self._slot = slot
        self._max_body = gateway.config.server.max_body_bytes
        self._health = encoder.encode({"status": "ok", "pid": os.getpid()})
        self._request_ids = request_ids()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(ShmCollector(metrics, METRIC_SOURCES))
        self._table = self._routes()
        # Each request in flight by id(request): a dict probe costs less than aiohttp's
        # request mapping, whose Python-level item access raises and catches on a miss.
        self._live: dict[int, _InFlight] = {}

    def server(self, **kwargs: object) -> GatewayServer:
        """The low-level aiohttp server; ``kwargs`` go to its protocol (size limits ...)."""
        max_body, loop = self._max_body, asyncio.get_running_loop()

        def make_request(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any
        ) -> web.BaseRequest:
            # The one change from aiohttp's default factory: the body size limit.
            return web.BaseRequest(
                message, payload, protocol, writer, task, loop, client_max_size=max_body
            )

        return GatewayServer(self.handle, request_factory=make_request, **kwargs)  # type: ignore[arg-type]

    def _routes(self) -> dict[str, dict[str, tuple[int, Handler]]]:
        """path -> method -> (route index for metrics, handler)."""
        chat = (observability.route_index("chat"), self.chat)
        embeddings = (observability.route_index("embeddings"), self.embeddings)
        models = (observability.route_index("models"), self.models)
        return {
            "/v1/chat/completions": {"POST": chat},
            "/chat/completions": {"POST": chat},
            "/v1/embeddings": {"POST": embeddings},
            "/embeddings": {"POST": embeddings},
            "/v1/models": {"GET": models},
            "/models": {"GET": models},
            "/health": {"GET": (observability.route_index("health"), self.health)},
            "/metrics": {"GET": (observability.route_index("metrics"), self.prometheus)},
            "/admin/state": {"GET": (observability.route_index("admin"), self.admin_state)},
        }

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request: dispatch, answer errors, and account for it in shm."""
        request_id = request.headers.get("x-request-id", "")[:128] or next(self._request_ids)
        route, handler = self._dispatch(request)
        observe = self._observe
        started = self._slot.enter()
        obs = None
        # Read once, here: tracing continues it, and ``chat`` forwards it upstream.
        traceparent = request.headers.get(TRACEPARENT)
        if observe.detailed:  # tracing or an access log: most requests stop at the count
            observe.countdown -= 1  # head sampling: this one is drawn when it goes below 0
            if traceparent is not None or observe.countdown < 0 or observe.logging:
                obs = observe.begin(
                    route, request.method, request.path, request_id, traceparent, True
                )
        status = 500
        live = self._live[id(request)] = _InFlight(request_id, obs, traceparent)
        try:
            # The handler is awaited here, not through a helper coroutine: every
            # resumption of a request walks each coroutine frame between it and the loop.
            try:
                response = await handler(request)
            except LLMKitError as exc:
                response = error_response(exc)
            except web.HTTPException:
                raise
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.path)
                response = error_response(InternalError("internal error; see the server log"))
            gone = isinstance(response, _EventStream) and response.client_gone
            status = CLIENT_GONE if gone else response.status
            if not response.prepared:
                response.headers["x-request-id"] = request_id
            return response
        finally:
            del self._live[id(request)]
            if observe.counting:  # the slot's leave() is one of the words it adds to
                observe.count(route, status, started, live.call)
            else:
                self._slot.leave()
            if obs is not None:
                obs.finish(status)

    def _dispatch(self, request: web.BaseRequest) -> tuple[int, Handler]:
        methods = self._table.get(request.path)
        if methods is None:
            return OTHER_ROUTE, self.not_found
        found = methods.get(request.method)
        if found is None:
            return OTHER_ROUTE, self.method_not_allowed
        return found

    async def chat(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await self._read_body(request)
        key = self._gateway.authenticate(request.headers.get("Authorization"))
        call = self._gateway.decode_chat(body)
        call.key = key
        live = self._live[id(request)]
        live.call = call
        call.obs = obs = live.obs
        call.profile = request.headers.get("x-llmkit-route-profile")
        call.headers["x-request-id"] = live.request_id
        if live.traceparent is not None:
            call.headers[TRACEPARENT] = live.traceparent
        headers = request.headers
        for name in FORWARDED_HEADERS:
            value = headers.get(name)
            if value is not None:
                call.headers[name] = value
        if call.request.stream:
            target, chunks = await self._gateway.stream(call)
            return await self._send_stream(request, target, chunks, call.response_headers)
        target, completion = await self._gateway.chat(call)
        if obs is not None and obs.trace is not None:  # sampled
            obs.answered(completion.choices)
        # All headers in one dict: aiohttp builds its multidict once from it.
        answer = {**JSON_TYPE, "x-llmkit-provider": target.provider.name,
                  "x-llmkit-deployment": target.deployment, **call.response_headers}  # fmt: skip
        if target.price is not None and completion.usage is not None:
            answer["x-llmkit-cost-usd"] = f"{target.price.cost(completion.usage):.8f}"
        return web.Response(body=encoder.encode(completion), headers=answer)

    async def embeddings(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await self._read_body(request)
        key = self._gateway.authenticate(request.headers.get("Authorization"))
        headers = dict(JSON_TYPE)
        embedding = self._gateway.decode_embeddings(body)
        live = self._live[id(request)]
        call = live.call = self._gateway.embedding_call(embedding, key, headers, live.obs)
        target, result = await self._gateway.embed(embedding, call=call)
        response = web.Response(body=encoder.encode(result), headers=headers)
        _target_headers(response, target)
        return response

    async def models(self, request: web.BaseRequest) -> web.StreamResponse:
        self._gateway.authenticate(request.headers.get("Authorization"))
        body = encoder.encode(self._gateway.models())
        return web.Response(body=body, headers=JSON_TYPE)

    async def health(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=self._health, headers=JSON_TYPE)

    async def prometheus(self, request: web.BaseRequest) -> web.StreamResponse:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encode(self._registry))
        response.headers["Content-Type"] = content_type
        return response

    async def admin_state(self, request: web.BaseRequest) -> web.StreamResponse:
        """Breakers, limit buckets and workers as every process sees them (master key)."""
        if self._gateway.authenticate(request.headers.get("Authorization")) != "master":
            raise PermissionDeniedError(
                "the admin API needs the master key (set server.master_key_env)"
            )
        state = self._gateway.state(time.monotonic_ns())
        state["workers"] = [
            {"slot": i, "pid": w.pid, "state": w.state, "in_flight": w.in_flight,
             "served": w.served, "incarnation": w.incarnation}
            for i, w in enumerate(self._metrics.workers) if w.pid
        ]  # fmt: skip
        return web.Response(body=encoder.encode(state), headers=JSON_TYPE)

    async def not_found(self, request: web.BaseRequest) -> web.StreamResponse:
        raise NotFoundError(f"no route {request.method} {request.path}", code="unknown_url")

    async def method_not_allowed(self, request: web.BaseRequest) -> web.StreamResponse:
        allowed = ", ".join(self._table[request.path])
        raise MethodNotAllowedError(f"{request.method} {request.path}: use {allowed}")

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        if request.content_length is not None and request.content_length > self._max_body:
            raise _too_large(self._max_body)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(self._max_body) from None

    async def _send_stream(
        self,
        request: web.BaseRequest,
        target: Target,
        chunks: AsyncIterator[bytes],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        # All headers in one dict: aiohttp builds its multidict once from it.
        response = _EventStream(headers={
            **SSE_HEADERS, "x-llmkit-provider": target.provider.name,
            "x-llmkit-deployment": target.deployment, **headers,
            "x-request-id": self._live[id(request)].request_id,
        })  # fmt: skip
        tail = SSE_DONE
        try:
            await response.prepare(request)
            async for events in chunks:
                if events.endswith(SSE_DONE):  # the end came with these: one write for both
                    tail = b""
                    await response.write_eof(events)
                else:
                    await response.write(events)
        except LLMKitError as exc:
            # Headers are gone already: the error becomes the stream's last event.
            tail = b"data: " + encoder.encode(exc.body()) + b"\n\n"
        except ConnectionResetError:
            response.client_gone = True
            return response
        finally:
            await _close(chunks)
        await response.write_eof(tail)
        return response


class _InFlight:
    """What the surface keeps of one request while it runs: its id, its recorder when
    sampled or logged, its caller's ``traceparent`` (read once, by ``handle``), and its
    call once decoded (metrics read the run from there)."""

    __slots__ = ("request_id", "obs", "traceparent", "call")

    def __init__(self, request_id: str, obs: RequestObs | None, traceparent: str | None) -> None:
        self.request_id = request_id
        self.obs = obs
        self.traceparent = traceparent
        self.call: Call | None = None


class _EventStream(web.StreamResponse):
    """An SSE response whose headers leave with its first events, in one write.

    A stream is prepared only once its first chunk is in hand, so holding the headers
    back delays nothing; aiohttp's plain ``Response`` does the same.
    """

    _send_headers_immediately = False
    client_gone = False  # the client hung up before the stream's end


class _ProtocolErrors(RequestHandler):
    """aiohttp's connection handler, answering unparseable requests OpenAI-style.

    aiohttp answers a request it cannot parse (a header over ``max_header_bytes``, a
    broken request line) before any handler runs, in plain text; this gives the same
    JSON error body every other failure gets.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        # Never the exception's text: aiohttp quotes the offending bytes in it, and an
        # oversized header may well be an Authorization header.
        log.info("refused a malformed request (%s)", type(exc).__name__ if exc else status)
        response = error_response(_protocol_error(exc))
        response.force_close()
        return response


def _protocol_error(exc: BaseException | None) -> LLMKitError:
    if isinstance(exc, LineTooLong):
        return HeaderTooLargeError(
            "request line or header too large: the limit is server.max_header_bytes"
        )
    kind = type(exc).__name__ if exc is not None else "unparseable request"
    return InvalidRequestError(f"malformed HTTP request ({kind})")


class GatewayServer(web.Server):
    """``web.Server`` whose connections answer protocol errors with JSON bodies, and
    that counts the connections it holds open (the worker puts the count in its slot:
    ``llmkit_worker_connections``, and ``workers.accept`` shares a burst out by it)."""

    open_connections = 0

    def __call__(self) -> RequestHandler:
        return _ProtocolErrors(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1


def error_response(exc: LLMKitError) -> web.Response:
    """The one place an ``LLMKitError`` becomes an HTTP response."""
    response = web.Response(status=exc.status, body=encoder.encode(exc.body()), headers=JSON_TYPE)
    response.headers.update(exc.headers)
    retry_after = exc.retry_after_header()
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def _too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"request body is larger than the limit of {limit} bytes")


def _target_headers(response: web.StreamResponse, target: Target) -> None:
    response.headers["x-llmkit-provider"] = target.provider.name
    response.headers["x-llmkit-deployment"] = target.deployment


async def _close(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()

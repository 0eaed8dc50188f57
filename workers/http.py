"""The HTTP surface (aiohttp.web): routes, SSE framing and the one error mapping.

Every handler is wrapped by ``_instrumented``, which owns the accounting every request
needs on every path (success, error, client gone): the worker's in-flight cell, the
request counter and the latency histogram in shared memory.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from llmkit import observability
from llmkit.errors import BodyTooLargeError, InternalError, LLMKitError, NotFoundError
from llmkit.gateway import Gateway
from llmkit.observability import Metrics, ShmCollector
from llmkit.providers.base import Target
from llmkit.types import ChatCompletionChunk, encoder
from shm import WorkerSlot

log = logging.getLogger("llmkit.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"
CLIENT_GONE = 499
CLIENT_GONE_KEY = web.ResponseKey("llmkit.client_gone", bool)
REQUEST_ID = web.RequestKey("llmkit.request_id", str)


class HttpSurface:
    """Routes for one worker over one ``Gateway``."""

    def __init__(self, gateway: Gateway, metrics: Metrics, slot: WorkerSlot) -> None:
        self._gateway = gateway
        self._metrics = metrics
        self._slot = slot
        self._max_body = gateway.config.server.max_body_bytes
        self._health = encoder.encode({"status": "ok", "pid": os.getpid()})
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(ShmCollector(metrics))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body)
        route = self._instrumented
        app.router.add_post("/v1/chat/completions", route("chat", self.chat))
        app.router.add_post("/chat/completions", route("chat", self.chat))
        app.router.add_post("/v1/embeddings", route("embeddings", self.embeddings))
        app.router.add_post("/embeddings", route("embeddings", self.embeddings))
        app.router.add_get("/v1/models", route("models", self.models))
        app.router.add_get("/models", route("models", self.models))
        app.router.add_get("/health", route("health", self.health))
        app.router.add_get("/metrics", route("metrics", self.prometheus))
        app.router.add_route("*", "/{tail:.*}", route("other", self.not_found))
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request)
        self._gateway.authenticate(request.headers.get("Authorization"))
        call = self._gateway.decode_chat(body)
        call.headers["x-request-id"] = request[REQUEST_ID]
        if call.request.stream:
            target, chunks = await self._gateway.stream(call)
            return await self._send_stream(request, target, chunks)
        target, completion = await self._gateway.chat(call)
        response = web.Response(body=encoder.encode(completion), content_type="application/json")
        _target_headers(response, target)
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request)
        self._gateway.authenticate(request.headers.get("Authorization"))
        target, result = await self._gateway.embed(self._gateway.decode_embeddings(body))
        response = web.Response(body=encoder.encode(result), content_type="application/json")
        _target_headers(response, target)
        return response

    async def models(self, request: web.Request) -> web.StreamResponse:
        self._gateway.authenticate(request.headers.get("Authorization"))
        body = encoder.encode(self._gateway.models())
        return web.Response(body=body, content_type="application/json")

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._health, content_type="application/json")

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encode(self._registry))
        response.headers["Content-Type"] = content_type
        return response

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        raise NotFoundError(f"no route {request.method} {request.path}", code="unknown_url")

    async def _read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self._max_body:
            raise _too_large(self._max_body)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(self._max_body) from None

    async def _send_stream(
        self, request: web.Request, target: Target, chunks: AsyncIterator[ChatCompletionChunk]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        response.headers["x-request-id"] = request[REQUEST_ID]
        _target_headers(response, target)
        try:
            await response.prepare(request)
            async for chunk in chunks:
                await response.write(b"data: " + encoder.encode(chunk) + b"\n\n")
            await response.write(DONE)
        except LLMKitError as exc:
            # Headers are gone already: the error becomes the stream's last event.
            await response.write(b"data: " + encoder.encode(exc.body()) + b"\n\n")
        except ConnectionResetError:
            response[CLIENT_GONE_KEY] = True
            return response
        finally:
            await _close(chunks)
        await response.write_eof()
        return response

    def _instrumented(self, route: str, handler: Handler) -> Handler:
        route_index = observability.route_index(route)
        metrics, slot = self._metrics, self._slot

        async def instrumented(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            request_id = request.headers.get("x-request-id", "")[:128] or secrets.token_hex(8)
            request[REQUEST_ID] = request_id
            status = 500
            slot.add_in_flight(1)
            try:
                response = await _answer(handler, request)
                status = CLIENT_GONE if response.get(CLIENT_GONE_KEY) else response.status
                if not response.prepared:
                    response.headers["x-request-id"] = request_id
                return response
            finally:
                slot.add_in_flight(-1)
                slot.add_served()
                metrics.record_http(route_index, status, time.perf_counter() - started)

        return instrumented


async def _answer(handler: Handler, request: web.Request) -> web.StreamResponse:
    try:
        return await handler(request)
    except LLMKitError as exc:
        return error_response(exc)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(InternalError("internal error; see the server log"))


def error_response(exc: LLMKitError) -> web.Response:
    """The one place an ``LLMKitError`` becomes an HTTP response."""
    response = web.Response(
        status=exc.status, body=encoder.encode(exc.body()), content_type="application/json"
    )
    retry_after = exc.retry_after_header()
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def _too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"request body is larger than the limit of {limit} bytes")


def _target_headers(response: web.StreamResponse, target: Target) -> None:
    response.headers["x-llmkit-provider"] = target.provider.name
    response.headers["x-llmkit-deployment"] = target.deployment


async def _close(chunks: AsyncIterator[ChatCompletionChunk]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()

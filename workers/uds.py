"""The Unix-socket surface: ``llmkit.frames`` over the same ``Gateway`` as HTTP.

One ``FrameConnection`` per accepted socket reads frames in a loop and runs each
request as its own task, so one connection carries many concurrent requests. Replies
are whole frames written with one ``write`` each, so frames of different requests
interleave but never tear. Every request is counted in shared memory as an HTTP
request of the same route ("chat", "embeddings", "models", "health") is, by the same
``Observability.count``: a chat or embeddings call's model, deployment, key, tokens,
cost and tries included. It is sampled for tracing and written to the access log as
that HTTP request too (``OP_REQUESTS``: its method and path), under a request id of
this worker's own, since a frame's id is only unique on its connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator

from llmkit import frames, observability
from llmkit.errors import BodyTooLargeError, InternalError, InvalidRequestError, LLMKitError
from llmkit.frames import (
    Cancel,
    Chunk,
    End,
    FrameError,
    FrameTooLargeError,
    Hello,
    Request,
    Result,
    Welcome,
)
from llmkit.gateway import Gateway
from llmkit.observability import Observability, RequestObs
from llmkit.providers.base import SSE_DONE, Call
from shm import WorkerSlot
from workers import request_ids

log = logging.getLogger("llmkit.uds")

HELLO_TIMEOUT_S = 10.0
DONE_EVENT = SSE_DONE.rstrip()  # the client's stream ends with the End frame instead
CLIENT_GONE = 499
ROUTES = {op: observability.route_index(op) for op in ("chat", "embeddings", "models", "health")}
# The HTTP request each operation stands for, in spans and access-log lines.
OP_REQUESTS = {"chat": ("POST", "/v1/chat/completions"), "embeddings": ("POST", "/v1/embeddings"),
               "models": ("GET", "/v1/models"), "health": ("GET", "/health")}  # fmt: skip


class FrameServer:
    """Accepts connections on the supervisor's Unix socket and serves frames on them."""

    def __init__(self, gateway: Gateway, slot: WorkerSlot, observe: Observability) -> None:
        self.gateway = gateway
        self.slot = slot
        self.observe = observe
        if observe.counting:
            observe.count_served(slot)
        self.max_frame = gateway.config.server.max_body_bytes + frames.ENVELOPE_BYTES
        self._request_ids = request_ids()
        self._server: asyncio.Server | None = None
        self._connections: set[FrameConnection] = set()

    def begin(self, op: frames.Operation) -> RequestObs | None:
        """The recorder of a request that is sampled or logged (``Observability.begin``),
        else None; called only when tracing or the access log is on."""
        observe = self.observe
        observe.countdown -= 1  # head sampling: this one is drawn when it goes below 0
        if observe.countdown < 0 or observe.logging:
            method, path = OP_REQUESTS[op]
            request_id = next(self._request_ids)
            return observe.begin(ROUTES[op], method, path, request_id, None, True)
        return None

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._accept, sock=sock, backlog=2048)

    def close(self) -> None:
        """Stop accepting; connections already open keep being served."""
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> None:
        """Let in-flight requests finish for up to ``timeout`` seconds, then disconnect."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            pending = [task for conn in self._connections for task in conn.requests.values()]
            if not pending:
                break
            await asyncio.wait(pending, timeout=left)
        for conn in list(self._connections):
            conn.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = FrameConnection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.serve()
        finally:
            self._connections.discard(conn)


class FrameConnection:
    """One client connection: hello, then a read loop spawning one task per request."""

    def __init__(
        self, server: FrameServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._gateway = server.gateway
        self._reader = reader
        self._writer = writer
        self._key: str | None = None
        self.requests: dict[int, asyncio.Task[None]] = {}

    async def serve(self) -> None:
        try:
            await self._greet()
            while True:
                frame = frames.decode_client(await self._read_frame())
                self._dispatch(frame)
        except FrameTooLargeError as exc:
            self._send(_error_frame(0, BodyTooLargeError(str(exc))))
        except FrameError as exc:
            self._send(_error_frame(0, InvalidRequestError(str(exc), code="bad_frame")))
        except LLMKitError as exc:
            self._send(_error_frame(0, exc))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            for task in self.requests.values():
                task.cancel()
            self.close()

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()

    async def _greet(self) -> None:
        payload = await asyncio.wait_for(self._read_frame(), HELLO_TIMEOUT_S)
        hello = frames.decode_client(payload)
        if not isinstance(hello, Hello):
            raise FrameError("the first frame must be hello")
        if hello.version != frames.PROTOCOL_VERSION:
            raise InvalidRequestError(
                f"client speaks frame protocol {hello.version}; "
                f"this server speaks {frames.PROTOCOL_VERSION}",
                code="protocol_version",
            )
        bearer = None if hello.api_key is None else f"Bearer {hello.api_key}"
        self._key = self._gateway.authenticate(bearer)
        welcome = Welcome(
            version=frames.PROTOCOL_VERSION, pid=os.getpid(), max_frame=self._server.max_frame
        )
        self._send(welcome)

    async def _read_frame(self) -> bytes:
        header = await self._reader.readexactly(frames.HEADER.size)
        length = frames.frame_length(header, self._server.max_frame)
        return await self._reader.readexactly(length)

    def _dispatch(self, frame: frames.ClientFrame) -> None:
        if isinstance(frame, Request):
            if frame.id <= 0 or frame.id in self.requests:
                raise FrameError(f"request id {frame.id} is not positive or already in use")
            task = asyncio.create_task(self._answer(frame))
            self.requests[frame.id] = task
        elif isinstance(frame, Cancel):
            cancelled = self.requests.get(frame.id)
            if cancelled is not None:
                cancelled.cancel()
        else:
            raise FrameError("hello may only be the first frame")

    def _send(self, frame: frames.ServerFrame) -> None:
        if not self._writer.is_closing():
            self._writer.write(frames.encode(frame))

    async def _answer(self, request: Request) -> None:
        """Run one request and account for it like the HTTP surface does."""
        slot, observe, status = self._server.slot, self._server.observe, 500
        started = slot.enter()  # time.monotonic_ns, read as the request is counted in
        live = _Live()
        if observe.detailed:  # tracing or an access log: most requests stop at the draw
            live.obs = self._server.begin(request.op)
        try:
            await self._run(request, live)
            status = 200
        except (asyncio.CancelledError, ConnectionError):
            status = CLIENT_GONE
        except LLMKitError as exc:
            status = exc.status
            self._send(_error_frame(request.id, exc))
        except Exception:
            log.exception("unhandled error on frame op %s", request.op)
            self._send(_error_frame(request.id, InternalError("internal error; see the log")))
        finally:
            del self.requests[request.id]
            if observe.counting:  # the slot's leave() is one of the words it adds to
                observe.count(ROUTES[request.op], status, started, live.call)
            else:
                slot.leave()
            if live.obs is not None:
                live.obs.finish(status)

    async def _run(self, request: Request, live: _Live) -> None:
        gateway, rid = self._gateway, request.id
        if request.op == "chat":
            call = live.call = gateway.decode_chat(request.body)
            call.key, call.obs = self._key, live.obs
            if call.request.stream:
                _, chunks = await gateway.stream(call)
                await self._stream(rid, chunks)
                return
            _, result = await gateway.chat(call)
            if live.obs is not None and live.obs.sampled:
                live.obs.answered(result.choices)
            self._send(Result(id=rid, body=frames.encode_body(result)))
        elif request.op == "embeddings":
            embedding = gateway.decode_embeddings(request.body)
            call = live.call = gateway.embedding_call(embedding, self._key, {}, live.obs)
            _, embedded = await gateway.embed(embedding, self._key, call=call)
            self._send(Result(id=rid, body=frames.encode_body(embedded)))
        elif request.op == "models":
            self._send(Result(id=rid, body=frames.encode_body(gateway.models())))
        else:
            health = {"status": "ok", "pid": os.getpid()}
            self._send(Result(id=rid, body=frames.encode_body(health)))
        await self._writer.drain()

    async def _stream(self, rid: int, chunks: AsyncIterator[bytes]) -> None:
        try:
            async for events in chunks:
                for event in events.split(b"\n\n"):
                    if event and event != DONE_EVENT:  # "data: <json>": the frame carries the JSON
                        self._send(Chunk(id=rid, json=event[6:]))
                await self._writer.drain()
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        self._send(End(id=rid))


class _Live:
    """What ``_answer`` counts a request by, once ``_run`` has decoded its call, and its
    recorder when it is sampled or logged."""

    __slots__ = ("call", "obs")

    def __init__(self) -> None:
        self.call: Call | None = None
        self.obs: RequestObs | None = None


def _error_frame(rid: int, exc: LLMKitError) -> frames.Error:
    """The one place an ``LLMKitError`` becomes an error frame."""
    return frames.Error(
        id=rid, status=exc.status, type=exc.type, code=exc.code, message=exc.message,
        param=exc.param, retry_after=exc.retry_after,
    )  # fmt: skip

"""Mock upstreams: real aiohttp servers on 127.0.0.1, one per wire format.

A mock runs in a background thread with its own event loop, so synchronous SDK clients,
async tests and ``llmkit-serve`` subprocesses can all reach it over a real socket. It
records every request it receives and plays scripted faults:

====================  ===========================================================
``Fault("status", status=429, retry_after=2)``   answer that status with the wire's error body
``Fault("latency", seconds=0.5)``                wait, then answer normally
``Fault("timeout", seconds=30)``                 wait far longer than the client will
``Fault("reset", after_chunks=2)``               stream N chunks, then drop the connection
``Fault("malformed")``                           a body (or a stream chunk) that is not JSON
====================  ===========================================================

Faults are consumed in order, one per request (``times`` repeats one); with none
queued the mock answers normally.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web


@dataclass
class Fault:
    kind: str  # status | latency | timeout | reset | malformed
    status: int = 500
    retry_after: float | None = None
    seconds: float = 0.0
    after_chunks: int = 1
    times: int = 1


FAULT = web.RequestKey("llmkit.mock.fault", Fault | None)


@dataclass
class Recorded:
    """One request as the mock saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class MockUpstream:
    """Base: subclasses add their routes in ``routes()`` and their error body shape."""

    requests: list[Recorded] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    delay_s: float = 0.0  # added to every answer: a steadily slow upstream
    in_flight: int = 0
    max_in_flight: int = 0  # the most requests it was ever answering at once
    disconnects: int = 0  # answers cut short because the client went away

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread.start()
        self._ready.wait(10)

    # -- to override --------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """The wire's error JSON for ``status``; OpenAI's shape by default."""
        return {"error": {"message": message, "type": "mock_error", "code": str(status)}}

    # -- helpers for subclasses ---------------------------------------------------

    def handler(
        self, answer: Callable[[web.Request, Recorded], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Wrap a route: record the request, then play the next fault or ``answer``."""

        async def handle(request: web.Request) -> web.StreamResponse:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await play(request)
            except (ConnectionResetError, asyncio.CancelledError):
                self.disconnects += 1
                raise
            finally:
                self.in_flight -= 1

        async def play(request: web.Request) -> web.StreamResponse:
            recorded = Recorded(
                request.method, request.path, dict(request.query),
                {k.lower(): v for k, v in request.headers.items()}, await request.read(),
            )  # fmt: skip
            self.requests.append(recorded)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            fault = self.next_fault()
            if fault is not None and fault.kind in ("status", "latency", "timeout"):
                early = await self.play_early_fault(fault)
                if early is not None:
                    return early
            request[FAULT] = fault
            return await answer(request, recorded)

        return handle

    def next_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        fault.times -= 1
        if fault.times <= 0:
            self.faults.popleft()
        return fault

    async def play_early_fault(self, fault: Fault) -> web.Response | None:
        if fault.kind == "status":
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            body = self.error_body(fault.status, f"mock upstream says {fault.status}")
            return web.json_response(body, status=fault.status, headers=headers)
        await asyncio.sleep(fault.seconds)
        return None

    @staticmethod
    def fault_of(request: web.Request) -> Fault | None:
        return request.get(FAULT)

    @staticmethod
    async def reset(request: web.Request) -> None:
        """Drop the connection without finishing the response."""
        transport = request.transport
        if transport is not None:
            transport.abort()

    # -- lifecycle ----------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.SockSite(self._runner, self._sock)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The upstream transport: one pooled aiohttp client session per worker.

Keep-alive connections, connect and read timeouts, TLS verification on, response size
limits, and the one place where aiohttp's exceptions become ``llmkit.errors``
(``map_client_errors``). Also the SSE parser every streaming wire format shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn

import aiohttp

from llmkit.errors import (
    BadUpstreamResponseError,
    LLMKitError,
    ServiceUnavailableError,
    UpstreamTimeoutError,
)

MAX_RESPONSE_BYTES = 32 * 1024 * 1024
MAX_EVENT_BYTES = 4 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024

ErrorMapper = Callable[[int, bytes, Mapping[str, str]], LLMKitError]


class UpstreamStatus(Exception):
    """The cause chained to an error mapped from an upstream's non-2xx answer, so
    metrics can tell an upstream 502 from a malformed answer (``error_kind``)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered HTTP {status}")
        self.status = status


class Upstream:
    """A lazily created ``aiohttp.ClientSession`` with the gateway's limits."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 10.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        pool_size: int = 1000,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_response_bytes = max_response_bytes
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, bool], aiohttp.ClientTimeout] = {}

    def session(self) -> aiohttp.ClientSession:
        """The worker's session; created on first use, inside the running loop."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._pool_size, ttl_dns_cache=300, keepalive_timeout=30
            )
            # The default User-Agent replaces aiohttp's own as it is; no skip_auto_headers,
            # which would send every request down aiohttp's slow header path (a sorted
            # copy of the skip list and of the request's headers, per request).
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, headers={"User-Agent": "llmkit"}
            )
        return self._session

    def open(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float,
        stream: bool,
        on_error: ErrorMapper,
        provider: str,
    ) -> Exchange:
        """Send one request; ``async with`` it gives the response once a 2xx status
        arrives.

        A non-2xx answer is read (bounded) and raised through ``on_error``. For a
        stream, ``timeout_s`` bounds each read; otherwise the whole exchange.
        """
        request = self.session().request(
            method, url, data=body, headers=headers, timeout=self._timeout(timeout_s, stream)
        )
        return Exchange(request, on_error, provider, timeout_s)

    async def fetch(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float,
        on_error: ErrorMapper,
        provider: str,
    ) -> bytes:
        """POST and return the whole 2xx body: ``open`` + ``read`` without the generator.

        The non-streaming hot path of every adapter, so it is one coroutine with one
        ``try``; behaviour and errors are exactly those of ``open`` then ``read``.
        """
        try:
            async with self.session().request(
                "POST", url, data=body, headers=headers, timeout=self._timeout(timeout_s, False)
            ) as response:
                if response.status >= 300:
                    payload = await response.content.read(MAX_ERROR_BYTES)
                    raise on_error(response.status, payload, response.headers) from UpstreamStatus(
                        response.status
                    )
                return await self._read(response, provider)
        except Exception as exc:
            raise_client_error(exc, provider, timeout_s)

    async def read(self, response: aiohttp.ClientResponse, provider: str) -> bytes:
        """The whole body, refusing more than ``max_response_bytes``."""
        with map_client_errors(provider, None):
            return await self._read(response, provider)

    async def _read(self, response: aiohttp.ClientResponse, provider: str) -> bytes:
        limit = self.max_response_bytes
        length = response.content_length
        if length is not None:
            if length > limit:
                raise BadUpstreamResponseError(f"{provider} sent a response over {limit} bytes")
            return await response.read()
        body = await response.content.read(limit + 1)
        while len(body) <= limit and not response.content.at_eof():
            more = await response.content.read(limit + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > limit:
            raise BadUpstreamResponseError(f"{provider} sent a response over {limit} bytes")
        return body

    def _timeout(self, timeout_s: float, stream: bool) -> aiohttp.ClientTimeout:
        """One ``ClientTimeout`` per distinct setting, not one per request."""
        timeout = self._timeouts.get((timeout_s, stream))
        if timeout is None:
            # A whole exchange needs one timer (total); a stream needs one per read.
            timeout = aiohttp.ClientTimeout(
                total=None if stream else timeout_s,
                sock_connect=self.connect_timeout_s,
                sock_read=timeout_s if stream else None,
            )
            self._timeouts[timeout_s, stream] = timeout
        return timeout

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Exchange:
    """One upstream request as an async context manager (``Upstream.open``).

    Entering gives the 2xx response, or raises the mapped error of a non-2xx one (its
    body read, bounded, for the message). aiohttp failures while entering or inside
    the block leave as ``llmkit.errors``, like ``map_client_errors``. A class rather
    than ``contextlib.asynccontextmanager``: every stream opens one, and the generator
    machinery cost more than the rest of opening it.
    """

    __slots__ = ("_request", "_on_error", "_provider", "_timeout_s")

    def __init__(
        self,
        request: AbstractAsyncContextManager[aiohttp.ClientResponse],
        on_error: ErrorMapper,
        provider: str,
        timeout_s: float,
    ) -> None:
        self._request = request
        self._on_error = on_error
        self._provider = provider
        self._timeout_s = timeout_s

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            response = await self._request.__aenter__()
            if response.status < 300:
                return response
            try:
                payload = await response.content.read(MAX_ERROR_BYTES)
            finally:
                await self._request.__aexit__(None, None, None)
        except Exception as exc:
            raise_client_error(exc, self._provider, self._timeout_s)
        status = response.status
        raise self._on_error(status, payload, response.headers) from UpstreamStatus(status)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await self._request.__aexit__(kind, exc, traceback)
        except Exception as failure:
            raise_client_error(failure, self._provider, self._timeout_s)
        if isinstance(exc, Exception):
            mapped = client_error(exc, self._provider, self._timeout_s)
            if mapped is not exc:  # else the block's own error goes on as it is
                raise mapped from exc


@contextlib.contextmanager
def map_client_errors(provider: str, timeout_s: float | None) -> Iterator[None]:
    """aiohttp's failures as the most specific ``llmkit.errors`` error."""
    try:
        yield
    except Exception as exc:
        raise_client_error(exc, provider, timeout_s)


def raise_client_error(exc: Exception, provider: str, timeout_s: float | None) -> NoReturn:
    """Raise ``client_error``'s mapping of ``exc`` (chained to it), or ``exc`` itself
    when nothing maps it; for ``except`` clauses around aiohttp calls."""
    mapped = client_error(exc, provider, timeout_s)
    if mapped is exc:
        raise exc
    raise mapped from exc


def client_error(exc: Exception, provider: str, timeout_s: float | None) -> Exception:
    """The ``llmkit.errors`` error for an aiohttp failure; anything else (an
    ``LLMKitError`` included) unchanged."""
    if isinstance(exc, LLMKitError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        after = f" after {timeout_s:g} s" if timeout_s else ""
        return UpstreamTimeoutError(f"{provider} did not answer{after}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ServiceUnavailableError(f"cannot connect to {provider}: {exc.strerror}")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return BadUpstreamResponseError(f"{provider} closed the connection early")
    if isinstance(exc, (aiohttp.ClientError, ConnectionError)):
        return BadUpstreamResponseError(f"{provider}: {type(exc).__name__}")
    return exc


def retry_after_from(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms``, ``retry-after`` (seconds or HTTP date), or None."""
    millis = headers.get("retry-after-ms")
    if millis:
        with contextlib.suppress(ValueError):
            return max(0.0, float(millis) / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(slots=True)
class SSEEvent:
    """One server-sent event: its ``event:`` name ("" if none) and joined ``data:``."""

    event: str
    data: str


async def iter_sse(
    response: aiohttp.ClientResponse, provider: str, max_event_bytes: int = MAX_EVENT_BYTES
) -> AsyncIterator[SSEEvent]:
    """Parse an SSE body into events, as the WHATWG spec frames them.

    Comment lines (``:``) are skipped; an event with no data is skipped. A stream
    cut before its final blank line raises ``BadUpstreamResponseError``.
    """
    framing = SSEFraming(provider, max_event_bytes)
    with map_client_errors(provider, None):
        async for piece in response.content.iter_any():
            for raw in framing.feed(piece):
                event = _parse_event(raw)
                if event is not None:
                    yield event
    for raw in framing.rest():
        event = _parse_event(raw)
        if event is not None:
            yield event


class SSEFraming:
    """SSE framing, fed one upstream read at a time: blank-line separated events,
    CRLF folded, each event bounded.

    Plain code a reader calls per read (``iter_sse``, and the OpenAI passthrough,
    which reads the body itself) rather than an async generator it iterates: each
    upstream read then resumes one coroutine chain, not two.
    """

    __slots__ = ("_buffer", "_provider", "_limit")

    def __init__(self, provider: str, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._provider = provider
        self._limit = max_event_bytes

    def feed(self, piece: bytes) -> list[bytes]:
        """The raw events this read completed (possibly none)."""
        buffer = self._buffer + piece if self._buffer else piece
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        if len(self._buffer) > self._limit:
            raise BadUpstreamResponseError(f"{self._provider} sent an event over {self._limit} B")
        return events

    def rest(self) -> list[bytes]:
        """What is left when the body ends: its last event, if it has one."""
        return [self._buffer] if self._buffer.strip() else []


def sse_data(raws: list[bytes]) -> list[bytes]:
    """The ``data`` of each raw event that has one, as bytes: the common one-line
    ``data: ...`` event is sliced, never decoded."""
    batch = []
    for raw in raws:
        # The common one-line event, sliced (a slice compare: on 3.11 startswith
        # parses its arguments the slow way, and this runs once per event).
        if raw[:6] == b"data: " and b"\n" not in raw:
            batch.append(raw[6:])
        elif (data := _event_data(raw)) is not None:
            batch.append(data)
    return batch


def _event_data(raw: bytes) -> bytes | None:
    event = _parse_event(raw)
    return None if event is None else event.data.encode()


def _parse_event(raw: bytes) -> SSEEvent | None:
    name = ""
    data: list[str] = []
    for line in raw.decode("utf-8", "replace").split("\n"):
        if not line or line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
    if not data:
        return None
    return SSEEvent(name, "\n".join(data))

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
from dataclasses import dataclass

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

    def session(self) -> aiohttp.ClientSession:
        """The worker's session; created on first use, inside the running loop."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._pool_size, ttl_dns_cache=300, keepalive_timeout=30
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "llmkit"},
            )
        return self._session

    @contextlib.asynccontextmanager
    async def open(
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
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request and yield the response once a 2xx status arrives.

        A non-2xx answer is read (bounded) and raised through ``on_error``. For a
        stream, ``timeout_s`` bounds each read; otherwise the whole exchange.
        """
        timeout = aiohttp.ClientTimeout(
            total=None if stream else timeout_s,
            sock_connect=self.connect_timeout_s,
            sock_read=timeout_s,
        )
        with map_client_errors(provider, timeout_s):
            async with self.session().request(
                method, url, data=body, headers=headers, timeout=timeout
            ) as response:
                if response.status >= 300:
                    payload = await response.content.read(MAX_ERROR_BYTES)
                    raise on_error(response.status, payload, response.headers)
                yield response

    async def read(self, response: aiohttp.ClientResponse, provider: str) -> bytes:
        """The whole body, refusing more than ``max_response_bytes``."""
        limit = self.max_response_bytes
        if response.content_length is not None and response.content_length > limit:
            raise BadUpstreamResponseError(f"{provider} sent a response over {limit} bytes")
        with map_client_errors(provider, None):
            body = await response.content.read(limit + 1)
            while len(body) <= limit and not response.content.at_eof():
                more = await response.content.read(limit + 1 - len(body))
                if not more:
                    break
                body += more
        if len(body) > limit:
            raise BadUpstreamResponseError(f"{provider} sent a response over {limit} bytes")
        return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@contextlib.contextmanager
def map_client_errors(provider: str, timeout_s: float | None) -> Iterator[None]:
    """aiohttp's failures as the most specific ``llmkit.errors`` error."""
    try:
        yield
    except LLMKitError:
        raise
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
        after = f" after {timeout_s:g} s" if timeout_s else ""
        raise UpstreamTimeoutError(f"{provider} did not answer{after}") from exc
    except aiohttp.ClientConnectorError as exc:
        raise ServiceUnavailableError(f"cannot connect to {provider}: {exc.strerror}") from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise BadUpstreamResponseError(f"{provider} closed the connection early") from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise BadUpstreamResponseError(f"{provider}: {type(exc).__name__}") from exc


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
    buffer = b""
    with map_client_errors(provider, None):
        async for piece in response.content.iter_any():
            buffer += piece
            events, buffer = _split_events(buffer)
            if len(buffer) > max_event_bytes:
                raise BadUpstreamResponseError(f"{provider} sent an event over {max_event_bytes} B")
            for raw in events:
                event = _parse_event(raw)
                if event is not None:
                    yield event
    if buffer.strip():
        event = _parse_event(buffer)
        if event is not None:
            yield event


def _split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    buffer = buffer.replace(b"\r\n", b"\n")
    *events, rest = buffer.split(b"\n\n")
    return events, rest


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

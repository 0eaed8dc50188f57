"""The client's HTTP mode: the same requests as the frame protocol, sent with httpx.

For a server on another host. httpx is imported when an HTTP client is built, so the
Unix-socket client does not need it installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from llmkit.connection import APIConnectionError, APITimeoutError, error_from
from llmkit.errors import LLMKitError
from llmkit.frames import Operation
from llmkit.types import ChatCompletionChunk, chunk_decoder

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")
PATHS: dict[Operation, tuple[str, str]] = {
    "chat": ("POST", "/v1/chat/completions"),
    "embeddings": ("POST", "/v1/embeddings"),
    "models": ("GET", "/v1/models"),
    "health": ("GET", "/health"),
}


class _ErrorBody(msgspec.Struct):
    message: str = ""
    type: str = "api_error"
    code: str | None = None
    param: str | None = None


class _Error(msgspec.Struct):
    error: _ErrorBody


_error_decoder = msgspec.json.Decoder(_Error)
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


class HttpTransport:
    """Requests to an LLMKit server's OpenAI-compatible HTTP API."""

    def __init__(self, base_url: str, api_key: str | None, connect_timeout: float) -> None:
        import httpx

        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        timeout = httpx.Timeout(None, connect=connect_timeout)
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def call(self, op: Operation, body: bytes, result: type[T], timeout: float | None) -> T:
        """One request, its JSON reply decoded as ``result``."""
        method, path = PATHS[op]
        with _mapped():
            response = await self._http.request(
                method, path, content=body or None, timeout=_timeout(timeout)
            )
        if response.status_code >= 400:
            raise _error(response.status_code, response.content, response.headers)
        decoded: T = _decoder(result).decode(response.content)
        return decoded

    async def stream(self, body: bytes, timeout: float | None) -> HttpStream:
        """Open a server-sent-events stream; an error status raises here."""
        request = self._http.build_request("POST", PATHS["chat"][1], content=body)
        request.extensions["timeout"] = _timeout(timeout).as_dict()
        with _mapped():
            response = await self._http.send(request, stream=True)
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            raise _error(response.status_code, content, response.headers)
        return HttpStream(response)

    async def close(self) -> None:
        await self._http.aclose()


class HttpStream:
    """The chunks of one streamed response, decoded from ``data:`` events."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[ChatCompletionChunk]:
        try:
            with _mapped():
                async for line in self._response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:].encode()
                    if data == b"[DONE]":
                        return
                    if data.startswith(b'{"error"'):
                        raise _error(0, data, {})
                    yield chunk_decoder.decode(data)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()


class _mapped:
    """Turns httpx transport failures into the client's connection errors."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            raise APITimeoutError(f"timed out: {exc}") from exc
        if isinstance(exc, httpx.TransportError):
            raise APIConnectionError(f"cannot reach the llmkit server: {exc!r}") from exc


def _timeout(seconds: float | None) -> httpx.Timeout:
    import httpx

    return httpx.Timeout(seconds)


def _error(status: int, content: bytes, headers: Any) -> LLMKitError:
    try:
        body = _error_decoder.decode(content).error
    except msgspec.DecodeError:
        body = _ErrorBody(message=content.decode(errors="replace")[:500] or f"HTTP {status}")
    retry_after = headers.get("retry-after")
    seconds = float(retry_after) if retry_after and retry_after.isdigit() else None
    return error_from(status, body.type, body.code, body.message, body.param, seconds)


def _decoder(result: type[T]) -> msgspec.json.Decoder[T]:
    decoder = _decoders.get(result)
    if decoder is None:
        decoder = _decoders[result] = msgspec.json.Decoder(result)
    return decoder

"""The embedding client: LLMKit from the same host without HTTP, OpenAI-shaped.

::

    from llmkit import Client
    with Client(path="/run/llmkit.sock") as client:        # or Client.from_env()
        reply = client.chat.completions.create(model="demo/x", messages=[...])
        for chunk in client.chat.completions.create(model="demo/x", messages=[...],
                                                     stream=True):
            ...

``AsyncClient`` is the implementation: one multiplexed frame connection (``llmkit.frames``)
or, with ``base_url=``, httpx against the HTTP API, with the same surface. ``Client`` is
the sync face of it and is thread-safe by construction: it owns a background thread
running an event loop, and every call from any thread is a coroutine submitted to that
loop. A lock around a blocking socket was the alternative; it would serialize threads
(one request at a time per client) and need a second frame demultiplexer, while the
loop thread lets many threads share one connection with requests in flight together.

Errors are the ``llmkit.errors`` tree, picked by the reply's status, so
``except llmkit.client.RateLimitError as e: sleep(e.retry_after)`` works, plus
``APIConnectionError`` (server unreachable, or gone mid-request) and ``APITimeoutError``.
A lost connection is replaced on the next call, so a server restart is invisible to an
idle client; requests in flight when it happens fail with ``APIConnectionError``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar, overload

import msgspec
import uvloop

from llmkit.connection import APIConnectionError, APITimeoutError, UdsTransport
from llmkit.errors import (
    AuthenticationError,
    BodyTooLargeError,
    InternalError,
    InvalidRequestError,
    LLMKitError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from llmkit.frames import Operation
from llmkit.types import ChatCompletion, ChatCompletionChunk, EmbeddingResponse, Message, ModelList

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 5.0
_encoder = msgspec.json.Encoder()

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BodyTooLargeError",
    "Client",
    "InternalError",
    "InvalidRequestError",
    "LLMKitError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ServiceUnavailableError",
    "UpstreamError",
    "UpstreamTimeoutError",
]


class ChunkStream(Protocol):
    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def call(
        self, op: Operation, body: bytes, result: type[T], timeout: float | None
    ) -> T: ...

    async def stream(self, body: bytes, timeout: float | None) -> ChunkStream: ...

    async def close(self) -> None: ...


class AsyncStream:
    """Chunks of a streamed completion: ``async for chunk in stream``; closes early cleanly."""

    def __init__(self, stream: ChunkStream) -> None:
        self._stream = stream
        self._chunks = stream.__aiter__()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        """Stop early: the server stops generating and settles its limits."""
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncCompletions:
    def __init__(self, transport: Transport, timeout: float | None) -> None:
        self._transport = transport
        self._timeout = timeout

    @overload
    async def create(
        self, *, model: str, messages: Sequence[Message | dict[str, Any]],
        stream: Literal[False] = False, timeout: float | None = None, **params: Any,
    ) -> ChatCompletion: ...  # fmt: skip

    @overload
    async def create(
        self, *, model: str, messages: Sequence[Message | dict[str, Any]],
        stream: Literal[True], timeout: float | None = None, **params: Any,
    ) -> AsyncStream: ...  # fmt: skip

    @overload
    async def create(
        self, *, model: str, messages: Sequence[Message | dict[str, Any]],
        stream: bool, timeout: float | None = None, **params: Any,
    ) -> ChatCompletion | AsyncStream: ...  # fmt: skip

    async def create(
        self,
        *,
        model: str,
        messages: Sequence[Message | dict[str, Any]],
        stream: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> ChatCompletion | AsyncStream:
        """A chat completion, or with ``stream=True`` an async iterator of chunks."""
        body = {"model": model, "messages": messages, **params}
        if stream:
            body["stream"] = True
            chunks = await self._transport.stream(_encoder.encode(body), timeout or self._timeout)
            return AsyncStream(chunks)
        encoded = _encoder.encode(body)
        return await self._transport.call("chat", encoded, ChatCompletion, timeout or self._timeout)


class AsyncChat:
    def __init__(self, transport: Transport, timeout: float | None) -> None:
        self.completions = AsyncCompletions(transport, timeout)


class AsyncEmbeddings:
    def __init__(self, transport: Transport, timeout: float | None) -> None:
        self._transport = transport
        self._timeout = timeout

    async def create(
        self, *, model: str, input: str | list[str], timeout: float | None = None, **params: Any
    ) -> EmbeddingResponse:
        """Embeddings for one text or a list of texts."""
        body = _encoder.encode({"model": model, "input": input, **params})
        return await self._transport.call(
            "embeddings", body, EmbeddingResponse, timeout or self._timeout
        )


class AsyncModels:
    def __init__(self, transport: Transport, timeout: float | None) -> None:
        self._transport = transport
        self._timeout = timeout

    async def list(self, *, timeout: float | None = None) -> ModelList:
        """The model names the server answers to."""
        return await self._transport.call("models", b"", ModelList, timeout or self._timeout)


class AsyncClient:
    """LLMKit over its Unix socket (``path=``) or its HTTP API (``base_url=``), async."""

    def __init__(
        self,
        path: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._transport = _transport(path, base_url, api_key, connect_timeout)
        self.chat = AsyncChat(self._transport, timeout)
        self.embeddings = AsyncEmbeddings(self._transport, timeout)
        self.models = AsyncModels(self._transport, timeout)

    @classmethod
    def from_env(cls, **kwargs: Any) -> Self:
        """``LLMKIT_SOCKET`` (or ``LLMKIT_URL`` for HTTP) and ``LLMKIT_API_KEY``."""
        return cls(**_env_settings(), **kwargs)

    async def health(self) -> dict[str, Any]:
        """``{"status": "ok", "pid": ...}`` from the worker that answered."""
        return await self._transport.call("health", b"", dict[str, Any], None)

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class Stream:
    """Chunks of a streamed completion, for the sync client: ``for chunk in stream``."""

    def __init__(self, runner: _LoopThread, stream: AsyncStream) -> None:
        self._runner = runner
        self._stream = stream

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        return self

    def __next__(self) -> ChatCompletionChunk:
        try:
            return self._runner.run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop early: the server stops generating and settles its limits."""
        self._runner.run(self._stream.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Completions:
    def __init__(self, runner: _LoopThread, completions: AsyncCompletions) -> None:
        self._runner = runner
        self._async = completions

    @overload
    def create(
        self, *, model: str, messages: Sequence[Message | dict[str, Any]],
        stream: Literal[False] = False, timeout: float | None = None, **params: Any,
    ) -> ChatCompletion: ...  # fmt: skip

    @overload
    def create(
        self, *, model: str, messages: Sequence[Message | dict[str, Any]],
        stream: Literal[True], timeout: float | None = None, **params: Any,
    ) -> Stream: ...  # fmt: skip

    @overload
    def create(
        self, *, model: str, messages: Sequence[Message | dict[str, Any]],
        stream: bool, timeout: float | None = None, **params: Any,
    ) -> ChatCompletion | Stream: ...  # fmt: skip

    def create(
        self,
        *,
        model: str,
        messages: Sequence[Message | dict[str, Any]],
        stream: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> ChatCompletion | Stream:
        """A chat completion, or with ``stream=True`` an iterator of chunks."""
        result = self._runner.run(
            self._async.create(
                model=model, messages=messages, stream=stream, timeout=timeout, **params
            )
        )
        return Stream(self._runner, result) if isinstance(result, AsyncStream) else result


class Chat:
    def __init__(self, runner: _LoopThread, chat: AsyncChat) -> None:
        self.completions = Completions(runner, chat.completions)


class Embeddings:
    def __init__(self, runner: _LoopThread, embeddings: AsyncEmbeddings) -> None:
        self._runner = runner
        self._async = embeddings

    def create(
        self, *, model: str, input: str | list[str], timeout: float | None = None, **params: Any
    ) -> EmbeddingResponse:
        """Embeddings for one text or a list of texts."""
        return self._runner.run(
            self._async.create(model=model, input=input, timeout=timeout, **params)
        )


class Models:
    def __init__(self, runner: _LoopThread, models: AsyncModels) -> None:
        self._runner = runner
        self._async = models

    def list(self, *, timeout: float | None = None) -> ModelList:
        """The model names the server answers to."""
        return self._runner.run(self._async.list(timeout=timeout))


class Client:
    """LLMKit over its Unix socket (``path=``) or its HTTP API (``base_url=``); thread-safe."""

    def __init__(
        self,
        path: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        _transport_kind(path, base_url)
        self._runner = _LoopThread()
        self._async = self._runner.run(
            _build_async(path, base_url, api_key, timeout, connect_timeout)
        )
        self.chat = Chat(self._runner, self._async.chat)
        self.embeddings = Embeddings(self._runner, self._async.embeddings)
        self.models = Models(self._runner, self._async.models)

    @classmethod
    def from_env(cls, **kwargs: Any) -> Self:
        """``LLMKIT_SOCKET`` (or ``LLMKIT_URL`` for HTTP) and ``LLMKIT_API_KEY``."""
        return cls(**_env_settings(), **kwargs)

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "pid": ...}`` from the worker that answered."""
        return self._runner.run(self._async.health())

    def close(self) -> None:
        """Close the connection and stop the loop thread; idempotent."""
        if self._runner.running:
            self._runner.run(self._async.close())
            self._runner.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _LoopThread:
    """An event loop on a daemon thread; ``run`` submits a coroutine and waits for it."""

    def __init__(self) -> None:
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="llmkit-client", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self.running:
            coro.close()
            raise APIConnectionError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _build_async(
    path: str | None,
    base_url: str | None,
    api_key: str | None,
    timeout: float | None,
    connect_timeout: float,
) -> AsyncClient:
    # Built on the loop thread: httpx and asyncio objects belong to the loop that uses them.
    return AsyncClient(
        path, base_url=base_url, api_key=api_key, timeout=timeout, connect_timeout=connect_timeout
    )


def _transport_kind(path: str | None, base_url: str | None) -> Literal["uds", "http"]:
    if (path is None) == (base_url is None):
        raise ValueError("give exactly one of path= (Unix socket) or base_url= (HTTP)")
    return "uds" if path is not None else "http"


def _transport(
    path: str | None, base_url: str | None, api_key: str | None, connect_timeout: float
) -> Transport:
    if _transport_kind(path, base_url) == "uds":
        assert path is not None
        return UdsTransport(path, api_key, connect_timeout)
    from llmkit.http_transport import HttpTransport

    assert base_url is not None
    return HttpTransport(base_url, api_key, connect_timeout)


def _env_settings() -> dict[str, Any]:
    path, url = os.environ.get("LLMKIT_SOCKET"), os.environ.get("LLMKIT_URL")
    if not path and not url:
        raise ValueError("set LLMKIT_SOCKET (Unix socket path) or LLMKIT_URL (HTTP base URL)")
    settings: dict[str, Any] = {"path": path} if path else {"base_url": url}
    settings["api_key"] = os.environ.get("LLMKIT_API_KEY") or None
    return settings

"""The client side of the Unix-socket frame protocol (``llmkit.frames``), on asyncio.

``UdsTransport`` keeps one ``FrameConnection`` and opens a new one on the next call
after the old one closed (the server restarted, or a worker drained), so a restart is
invisible to an idle client. A ``FrameConnection`` has one reader task that hands each
reply frame to the request waiting on its id: a future for a whole result, a queue for
a stream. When the connection is lost every waiter gets ``APIConnectionError``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec

from llmkit import errors, frames
from llmkit.errors import BodyTooLargeError, LLMKitError
from llmkit.frames import Cancel, Chunk, End, Hello, Operation, Request, Result, Welcome
from llmkit.types import ChatCompletionChunk, chunk_decoder

T = TypeVar("T")
Waiter = asyncio.Future[frames.ServerFrame] | asyncio.Queue[frames.ServerFrame | LLMKitError]


class APIConnectionError(LLMKitError):
    """The server could not be reached, refused the connection, or went away mid-request."""

    status = 503
    type = "connection_error"
    code = "connection_error"


class APITimeoutError(APIConnectionError):
    """No reply within the client's timeout; the request was cancelled on the server."""

    status = 408
    type = "timeout_error"
    code = "client_timeout"


_BY_STATUS: dict[int, type[LLMKitError]] = {
    400: errors.InvalidRequestError,
    401: errors.AuthenticationError,
    403: errors.PermissionDeniedError,
    404: errors.NotFoundError,
    405: errors.MethodNotAllowedError,
    408: errors.RequestTimeoutError,
    413: errors.BodyTooLargeError,
    422: errors.UnprocessableError,
    429: errors.RateLimitError,
    500: errors.InternalError,
    502: errors.UpstreamError,
    503: errors.ServiceUnavailableError,
    504: errors.UpstreamTimeoutError,
}
# A stream that fails after its first chunk carries no status, only the error's type.
_BY_TYPE: dict[str, type[LLMKitError]] = {cls.type: cls for cls in reversed(_BY_STATUS.values())}


def error_from(
    status: int,
    type: str,
    code: str | None,
    message: str,
    param: str | None = None,
    retry_after: float | None = None,
) -> LLMKitError:
    """The most specific ``llmkit.errors`` class for a reply's status (or type, if 200)."""
    cls = _BY_STATUS.get(status) or _BY_TYPE.get(type, LLMKitError)
    exc = cls(message, code=code, param=param, retry_after=retry_after, status=status or None)
    exc.type = type
    return exc


def _from_frame(frame: frames.Error) -> LLMKitError:
    return error_from(
        frame.status, frame.type, frame.code, frame.message, frame.param, frame.retry_after
    )


class FrameConnection:
    """One open connection: hello done, a reader task delivering replies by id."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, welcome: Welcome
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.welcome = welcome
        self._ids = itertools.count(1)
        self._waiters: dict[int, Waiter] = {}
        self._lost: LLMKitError | None = None
        self._reading = asyncio.create_task(self._read_replies())

    @classmethod
    async def open(cls, path: str, api_key: str | None, timeout: float) -> FrameConnection:
        """Connect and say hello; raises ``APIConnectionError`` or the server's refusal."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        except FileNotFoundError:
            raise APIConnectionError(
                f"no llmkit socket at {path}: is the server running?"
            ) from None
        except PermissionError:
            raise APIConnectionError(
                f"permission denied on {path}: the socket is 0600, owned by the server's user"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise APIConnectionError(f"cannot connect to {path}: {exc}") from exc
        try:
            writer.write(frames.encode(Hello(version=frames.PROTOCOL_VERSION, api_key=api_key)))
            reply = await asyncio.wait_for(_read_frame(reader), timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, frames.FrameError) as exc:
            writer.close()
            raise APIConnectionError(f"no hello from the server at {path}: {exc!r}") from exc
        if isinstance(reply, frames.Error):
            writer.close()
            raise _from_frame(reply)
        if not isinstance(reply, Welcome) or reply.version != frames.PROTOCOL_VERSION:
            writer.close()
            raise APIConnectionError(f"the server at {path} speaks another frame protocol")
        return cls(reader, writer, reply)

    @property
    def closed(self) -> bool:
        return self._lost is not None

    async def close(self) -> None:
        self._lose(APIConnectionError("the client was closed"))
        self._reading.cancel()
        await asyncio.gather(self._reading, return_exceptions=True)

    async def call(self, op: Operation, body: bytes, timeout: float | None) -> msgspec.Raw:
        """One request answered by one ``Result``; the reply body, still msgpack."""
        future: asyncio.Future[frames.ServerFrame] = asyncio.get_running_loop().create_future()
        rid = await self._send(op, body, future)
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self.cancel(rid)
            raise APITimeoutError(f"no reply within {timeout} s") from None
        except asyncio.CancelledError:
            self.cancel(rid)
            raise
        if isinstance(reply, Result):
            return reply.body
        if isinstance(reply, frames.Error):
            raise _from_frame(reply)
        raise APIConnectionError(f"unexpected {type(reply).__name__} frame for a call")

    async def stream(self, body: bytes, timeout: float | None) -> FrameStream:
        """Open a chat stream; errors before the first chunk raise here, like HTTP."""
        queue: asyncio.Queue[frames.ServerFrame | LLMKitError] = asyncio.Queue()
        rid = await self._send("chat", body, queue)
        stream = FrameStream(self, rid, queue, timeout)
        await stream.start()
        return stream

    def cancel(self, rid: int) -> None:
        """Forget a request and tell the server to stop working on it."""
        if self._waiters.pop(rid, None) is not None and self._lost is None:
            self._writer.write(frames.encode(Cancel(id=rid)))

    async def _send(self, op: Operation, body: bytes, waiter: Waiter) -> int:
        if self._lost is not None:
            raise self._lost
        if len(body) + frames.ENVELOPE_BYTES > self.welcome.max_frame:
            raise BodyTooLargeError(f"request body is larger than {self.welcome.max_frame} bytes")
        rid = next(self._ids)
        self._waiters[rid] = waiter
        self._writer.write(frames.encode(Request(id=rid, op=op, body=body)))
        await self._writer.drain()
        return rid

    async def _read_replies(self) -> None:
        try:
            while True:
                frame = await _read_frame(self._reader)
                if isinstance(frame, frames.Error) and frame.id == 0:
                    self._lose(_from_frame(frame))
                    return
                self._deliver(frame)
        except (OSError, asyncio.IncompleteReadError, frames.FrameError) as exc:
            self._lose(APIConnectionError(f"connection to the llmkit server lost: {exc!r}"))

    def _deliver(self, frame: frames.ServerFrame) -> None:
        if isinstance(frame, Welcome):
            return
        waiter = self._waiters.get(frame.id)
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(frame)
            if isinstance(frame, End | frames.Error):
                del self._waiters[frame.id]
        elif waiter is not None:
            del self._waiters[frame.id]
            if not waiter.done():
                waiter.set_result(frame)

    def _lose(self, error: LLMKitError) -> None:
        if self._lost is not None:
            return
        self._lost = error
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(error)
            elif not waiter.done():
                waiter.set_exception(error)
        self._writer.close()


class FrameStream:
    """The chunks of one streamed chat request, as an async iterator."""

    def __init__(
        self,
        conn: FrameConnection,
        rid: int,
        queue: asyncio.Queue[frames.ServerFrame | LLMKitError],
        timeout: float | None,
    ) -> None:
        self._conn = conn
        self._rid = rid
        self._queue = queue
        self._timeout = timeout
        self._first: ChatCompletionChunk | None = None
        self._done = False

    async def start(self) -> None:
        self._first = await self._next()

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[ChatCompletionChunk]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            while (chunk := await self._next()) is not None:
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._conn.cancel(self._rid)

    async def _next(self) -> ChatCompletionChunk | None:
        if self._done:
            return None
        try:
            frame = await asyncio.wait_for(self._queue.get(), self._timeout)
        except TimeoutError:
            await self.aclose()
            raise APITimeoutError(f"no chunk within {self._timeout} s") from None
        if isinstance(frame, Chunk):
            return chunk_decoder.decode(frame.json)
        self._done = True
        if isinstance(frame, End):
            return None
        if isinstance(frame, frames.Error):
            raise _from_frame(frame)
        if isinstance(frame, LLMKitError):
            raise frame
        raise APIConnectionError(f"unexpected {type(frame).__name__} frame in a stream")


class UdsTransport:
    """Requests over one reconnecting frame connection to a Unix socket."""

    def __init__(self, path: str, api_key: str | None, connect_timeout: float) -> None:
        self.path = path
        self._api_key = api_key
        self._connect_timeout = connect_timeout
        self._conn: FrameConnection | None = None
        self._connecting: asyncio.Lock | None = None

    async def connection(self) -> FrameConnection:
        """The open connection, or a new one if there is none or it was lost."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                self._conn = await FrameConnection.open(
                    self.path, self._api_key, self._connect_timeout
                )
            return self._conn

    async def call(self, op: Operation, body: bytes, result: type[T], timeout: float | None) -> T:
        """One request, its reply decoded as ``result``."""
        conn = await self.connection()
        raw = await conn.call(op, body, timeout)
        decoded: T = _decoder(result).decode(raw)
        return decoded

    async def stream(self, body: bytes, timeout: float | None) -> FrameStream:
        conn = await self.connection()
        return await conn.stream(body, timeout)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}


def _decoder(result: type[T]) -> msgspec.msgpack.Decoder[T]:
    """One decoder per reply type, built on first use and kept."""
    decoder = _decoders.get(result)
    if decoder is None:
        decoder = _decoders[result] = msgspec.msgpack.Decoder(result)
    return decoder


async def _read_frame(reader: asyncio.StreamReader) -> frames.ServerFrame:
    header = await reader.readexactly(frames.HEADER.size)
    length = frames.frame_length(header, frames.DEFAULT_MAX_FRAME)
    return frames.decode_server(await reader.readexactly(length))

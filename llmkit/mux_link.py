"""The internal attach protocol between workers: a follower mirrors the owner's entry.

Every worker listens on its own Unix socket, ``link_path(shm_name, slot)`` (a file of
mode 0600 in a 0700 directory owned by the user). A worker that finds another
worker's claim for a key in the shm table connects there and sends

    hello = magic b"LKMX" | version u8 | key length u32 little-endian | key

(the key: the request's canonical bytes, ``llmkit.multiplexer.dedup_key``). The owner
looks the whole key up in its own in-flight table, so two requests share only when
they are the same byte for byte (the shm table's 64-bit tag merely found the owner),
and answers with a sequence of messages ``type (1 byte) | length u32 little-endian |
payload``:

====  =========================================================================
M     miss: no such call here (finished, or a 64-bit tag collision)
O     opened: JSON ``{"streamed", "provider", "model", "deployment"}``
F     one SSE frame (bytes exactly as the HTTP surface sends them)
U     the usage-only SSE frame (each subscriber decides whether it wants it)
W     a whole (non-streamed) ChatCompletion, JSON
D     done
E     error: JSON of ``LLMKitError.body()["error"]`` plus ``status``, ``retry_after``
====  =========================================================================

The owner serves the follower as one more subscriber of its entry (frames from index
0), so the follower worker mirrors the entry locally and fans it out to its own
callers. The follower closing the socket means "nobody here wants it any more"; the
owner notices at once (it watches for EOF) and leaves the entry. The owner dying
closes the socket without ``D``: the follower fails its mirror with a 503 that its
callers see as an error event (or, before the first output, retries afresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from llmkit.errors import LLMKitError, ServiceUnavailableError, error_for_status
from llmkit.mux_entry import Entry, Retry
from llmkit.providers.base import Target
from llmkit.types import completion_decoder, encoder

log = logging.getLogger("llmkit.multiplexer")

MAGIC = b"LKMX"
VERSION = 2
HELLO = struct.Struct("<4sBI")
HEADER = struct.Struct("<cI")
HELLO_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
MAX_MESSAGE = 64 * 1024 * 1024
MISS, OPENED, FRAME, USAGE, WHOLE, DONE, ERROR = (bytes([c]) for c in b"MOFUWDE")


class Opened(msgspec.Struct):
    streamed: bool
    provider: str
    model: str
    deployment: str


class ErrorInfo(msgspec.Struct, omit_defaults=True):
    status: int
    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None


_opened_decoder = msgspec.json.Decoder(Opened)
_error_decoder = msgspec.json.Decoder(ErrorInfo)


class OwnerGone(Exception):
    """The owner's socket is not there or refuses: its worker is dead or draining."""


def link_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"llmkit-{os.getuid()}")


def link_path(shm_name: str, worker_slot: int) -> str:
    """The attach socket of one worker slot of one server instance."""
    return os.path.join(link_dir(), f"mux{shm_name.replace('/', '-')}-{worker_slot}.sock")


def private_dir(path: str) -> None:
    """Create ``path`` 0700, or check that it is ours and private; OSError otherwise."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{path} is not a private directory of this user")


def message(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


class LinkServer:
    """Serves this worker's entries to followers on other workers."""

    def __init__(self, lookup: Callable[[bytes], Entry | None]) -> None:
        self._lookup = lookup
        self._server: asyncio.AbstractServer | None = None
        self._path = ""

    async def start(self, path: str) -> None:
        private_dir(os.path.dirname(path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the previous worker of this slot
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=path, backlog=512)
        finally:
            os.umask(old_umask)
        self._path = path

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            key = await asyncio.wait_for(_read_hello(reader), HELLO_TIMEOUT_S)
            entry = self._lookup(key) if key is not None else None
            if entry is None or entry.done:
                writer.write(message(MISS))
                await writer.drain()
                return
            entry.join()
            try:
                await _until_eof(reader, _mirror(entry, writer))
            finally:
                entry.leave()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


async def _read_hello(reader: asyncio.StreamReader) -> bytes | None:
    """The key a follower asks for; None if it speaks another version."""
    magic, version, length = HELLO.unpack(await reader.readexactly(HELLO.size))
    if (magic, version) != (MAGIC, VERSION) or length > MAX_MESSAGE:
        return None
    return await reader.readexactly(length)


async def _until_eof(reader: asyncio.StreamReader, sending: Coroutine[Any, Any, None]) -> None:
    """Run ``sending`` until it ends or the follower hangs up, whichever comes first."""
    send = asyncio.ensure_future(sending)
    hangup = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait((send, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (send, hangup):
            task.cancel()
        await asyncio.gather(send, hangup, return_exceptions=True)
    failure = send.exception() if send.done() and not send.cancelled() else None
    if failure is not None:
        raise failure


async def _mirror(entry: Entry, writer: asyncio.StreamWriter) -> None:
    try:
        target = await entry.wait_open()
    except LLMKitError as exc:
        writer.write(error_message(exc))
        await writer.drain()
        return
    opened = Opened(entry.streamed, target.provider.name, target.model, target.deployment)
    writer.write(message(OPENED, encoder.encode(opened)))
    if not entry.streamed:
        try:
            completion = await entry.wait_whole()
        except LLMKitError as exc:
            writer.write(error_message(exc))
        else:
            writer.write(message(WHOLE, encoder.encode(completion)) + message(DONE))
        await writer.drain()
        return
    sent = 0
    while True:
        frames = entry.frames
        while sent < len(frames):
            writer.write(message(USAGE if sent == entry.usage_at else FRAME, frames[sent]))
            sent += 1
        await writer.drain()
        if entry.done:
            break
        await entry.changed()
    writer.write(error_message(entry.error) if entry.error is not None else message(DONE))
    await writer.drain()


def error_message(exc: LLMKitError) -> bytes:
    body = exc.body()["error"]
    info = ErrorInfo(exc.status, exc.message, body.get("type"), body.get("code"),
                     body.get("param"), exc.retry_after)  # fmt: skip
    return message(ERROR, encoder.encode(info))


def error_from(payload: bytes) -> LLMKitError:
    info = _error_decoder.decode(payload)
    error = error_for_status(info.status, info.message, retry_after=info.retry_after)
    error.status = info.status
    if info.code is not None:
        error.code = info.code
    error.param = info.param
    return error


async def connect(path: str, key: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to an owner and say hello; ``OwnerGone`` if nobody listens there."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path), CONNECT_TIMEOUT_S
        )
    except (ConnectionRefusedError, FileNotFoundError, TimeoutError) as exc:
        raise OwnerGone(str(exc)) from None
    writer.write(HELLO.pack(MAGIC, VERSION, len(key)) + key)
    return reader, writer


async def mirror_remote(
    entry: Entry,
    reader: asyncio.StreamReader,
    resolve: Callable[[Opened], Target],
) -> None:
    """Fill ``entry`` from an owner's messages until done, error or the owner vanishes."""
    try:
        while True:
            kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
            if length > MAX_MESSAGE:
                raise ConnectionError("oversized message")
            payload = await reader.readexactly(length) if length else b""
            if kind == FRAME or kind == USAGE:
                entry.append(payload, kind == USAGE)
            elif kind == OPENED:
                opened = _opened_decoder.decode(payload)
                entry.open(resolve(opened), opened.streamed)
            elif kind == WHOLE:
                entry.complete(completion_decoder.decode(payload))
            elif kind == DONE:
                entry.finish()
                return
            elif kind == ERROR:
                entry.fail(error_from(payload))
                return
            else:  # MISS, or anything this version does not know
                entry.fail(Retry("the owner no longer has this call"))
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        if not entry.opened:
            entry.fail(Retry("the owner went away before its first output"))
        else:
            entry.fail(
                ServiceUnavailableError(
                    "the worker running this shared upstream call stopped mid-stream; retry"
                )
            )

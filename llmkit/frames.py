"""The Unix-socket frame protocol shared by ``workers.uds`` (server) and ``llmkit.client``.

Byte layout of one frame::

    +----------------------+-------------------------------------------+
    | length: uint32, BE   | payload: msgpack, ``length`` bytes        |
    +----------------------+-------------------------------------------+

The payload is one tagged msgspec Struct (``"t"`` names the frame). A connection opens
with ``Hello`` from the client and ``Welcome`` (or an ``Error`` with id 0, then close)
from the server. After that the client sends ``Request`` frames with ids it picks, and
may ``Cancel`` one; the server answers each id with one ``Result``, or with ``Chunk``
frames ending in ``End``, or with one ``Error``. Ids multiplex many requests on one
connection. An ``Error`` with id 0 concerns the whole connection, which then closes.

Request bodies are the JSON the HTTP API takes; reply bodies are msgpack of the same
``llmkit.types`` Structs the HTTP API returns as JSON. A ``Chunk`` carries one stream
chunk's JSON exactly as the HTTP API's SSE event would, so a stream is relayed from
upstream to client without being decoded and re-encoded on the way.
"""

from __future__ import annotations

import struct
from typing import Literal

import msgspec

PROTOCOL_VERSION = 2
HEADER = struct.Struct(">I")
# Larger frames are refused before they are read: the length is untrusted input.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
# A request frame is its body plus a small envelope (tag, id, op).
ENVELOPE_BYTES = 1024

Operation = Literal["chat", "embeddings", "models", "health"]


class FrameError(Exception):
    """A frame that cannot be decoded or breaks the protocol; the connection must close."""


class FrameTooLargeError(FrameError):
    """A length prefix over the limit; the frame is not read."""


class Hello(msgspec.Struct, tag="hello", tag_field="t", gc=False, kw_only=True):
    version: int
    api_key: str | None = None


class Request(msgspec.Struct, tag="request", tag_field="t", gc=False, kw_only=True):
    id: int
    op: Operation
    body: bytes = b""


class Cancel(msgspec.Struct, tag="cancel", tag_field="t", gc=False, kw_only=True):
    id: int


class Welcome(msgspec.Struct, tag="welcome", tag_field="t", gc=False, kw_only=True):
    version: int
    pid: int
    max_frame: int


class Result(msgspec.Struct, tag="result", tag_field="t", gc=False, kw_only=True):
    id: int
    body: msgspec.Raw


class Chunk(msgspec.Struct, tag="chunk", tag_field="t", gc=False, kw_only=True):
    id: int
    json: bytes  # one ``chat.completion.chunk``, as JSON


class End(msgspec.Struct, tag="end", tag_field="t", gc=False, kw_only=True):
    id: int


class Error(msgspec.Struct, tag="error", tag_field="t", gc=False, kw_only=True):
    """The same status, type, code and message the HTTP API would answer with."""

    id: int
    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None
    retry_after: float | None = None


ClientFrame = Hello | Request | Cancel
ServerFrame = Welcome | Result | Chunk | End | Error

_client_decoder = msgspec.msgpack.Decoder(ClientFrame)
_server_decoder = msgspec.msgpack.Decoder(ServerFrame)
_encoder = msgspec.msgpack.Encoder()


def encode(frame: ClientFrame | ServerFrame) -> bytes:
    """One whole frame: length prefix and payload."""
    payload = _encoder.encode(frame)
    return HEADER.pack(len(payload)) + payload


def encode_body(value: object) -> msgspec.Raw:
    """A reply body, already msgpack, to embed in a ``Result`` or ``Chunk``."""
    return msgspec.Raw(_encoder.encode(value))


def frame_length(header: bytes, max_frame: int) -> int:
    """The payload length from a 4-byte header; ``FrameError`` above ``max_frame``."""
    (length,) = HEADER.unpack(header)
    if length > max_frame:
        raise FrameTooLargeError(f"frame of {length} bytes is over the limit of {max_frame}")
    return int(length)


def decode_client(payload: bytes) -> ClientFrame:
    """A client frame's payload; ``FrameError`` on anything malformed."""
    try:
        return _client_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise FrameError(f"malformed frame: {exc}") from None


def decode_server(payload: bytes) -> ServerFrame:
    """A server frame's payload; ``FrameError`` on anything malformed."""
    try:
        return _server_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise FrameError(f"malformed frame: {exc}") from None

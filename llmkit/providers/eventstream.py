"""AWS event-stream framing (``application/vnd.amazon.eventstream``), decoded incrementally.

One message on the wire, every integer big-endian::

    offset 0   uint32  total length      (whole message, both CRCs included)
           4   uint32  headers length
           8   uint32  prelude CRC       (CRC-32 of bytes 0..7)
          12   bytes   headers           (headers length bytes)
           .   bytes   payload           (total - headers length - 16 bytes)
    total-4    uint32  message CRC       (CRC-32 of bytes 0..total-5)

A header is ``name length (uint8) | name (UTF-8) | value type (uint8) | value``, where
the value is, by type: 0 true and 1 false (no bytes), 2 int8, 3 int16, 4 int32, 5 int64,
6 bytes and 7 UTF-8 string (uint16 length, then the data), 8 timestamp (int64 ms since
the epoch), 9 UUID (16 bytes).

``EventStreamDecoder.feed`` takes the body in whatever pieces the network delivers and
iterates over the messages those pieces complete. Anything inconsistent (a CRC that does not
match, lengths that do not add up, an unknown header type, a repeated header) raises
``BadUpstreamResponseError``: the stream cannot be trusted past that point.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from llmkit.errors import BadUpstreamResponseError

PRELUDE_BYTES = 12
CRC_BYTES = 4
MIN_MESSAGE_BYTES = PRELUDE_BYTES + CRC_BYTES
MAX_HEADERS_BYTES = 128 * 1024
MAX_MESSAGE_BYTES = 24 * 1024 * 1024

HeaderValue = bool | int | bytes | str

_PRELUDE = struct.Struct(">III")
_CRC = struct.Struct(">I")
_U16 = struct.Struct(">H")
_FIXED_WIDTH = {2: struct.Struct(">b"), 3: struct.Struct(">h"), 4: struct.Struct(">i"),
                5: struct.Struct(">q"), 8: struct.Struct(">q")}  # fmt: skip
_UUID, _BYTES, _STRING = 9, 6, 7


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One decoded message: its headers by name and its raw payload."""

    headers: dict[str, HeaderValue]
    payload: bytes

    def header(self, name: str) -> str:
        """A string header's value, or "" if it is absent or not a string."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else ""


class EventStreamDecoder:
    """Splits a byte stream into ``EventMessage``s, checking both CRCs of each."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole message (non-zero at a clean end
        means the stream was cut mid-message)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[EventMessage]:
        """Add ``data``; iterate over the messages it completes, in order.

        A bad message raises when the iteration reaches it, after the good ones before it.
        """
        self._buffer += data
        return self._complete_messages()

    def _complete_messages(self) -> Iterator[EventMessage]:
        while len(self._buffer) >= PRELUDE_BYTES:
            total = self._check_prelude()
            if len(self._buffer) < total:
                return
            message = self._decode(total)
            del self._buffer[:total]
            yield message

    def _check_prelude(self) -> int:
        total, headers_length, prelude_crc = _PRELUDE.unpack_from(self._buffer)
        if zlib.crc32(self._buffer[:8]) != prelude_crc:
            raise BadUpstreamResponseError("event stream prelude CRC mismatch")
        if not MIN_MESSAGE_BYTES <= total <= self.max_message_bytes:
            raise BadUpstreamResponseError(f"event stream message length {total} is invalid")
        if headers_length > min(MAX_HEADERS_BYTES, total - MIN_MESSAGE_BYTES):
            raise BadUpstreamResponseError(
                f"event stream headers length {headers_length} is invalid"
            )
        return int(total)

    def _decode(self, total: int) -> EventMessage:
        end = total - CRC_BYTES
        (message_crc,) = _CRC.unpack_from(self._buffer, end)
        if zlib.crc32(self._buffer[:end]) != message_crc:
            raise BadUpstreamResponseError("event stream message CRC mismatch")
        (headers_length,) = _CRC.unpack_from(self._buffer, 4)
        headers_end = PRELUDE_BYTES + headers_length
        headers = parse_headers(bytes(self._buffer[PRELUDE_BYTES:headers_end]))
        return EventMessage(headers, bytes(self._buffer[headers_end:end]))


def parse_headers(data: bytes) -> dict[str, HeaderValue]:
    """The header block of one message, by name."""
    headers: dict[str, HeaderValue] = {}
    offset = 0
    try:
        while offset < len(data):
            name_length = data[offset]
            name = data[offset + 1 : offset + 1 + name_length].decode()
            offset += 1 + name_length
            value, offset = _header_value(data, data[offset], offset + 1)
            if name in headers:
                raise BadUpstreamResponseError(f"event stream header {name!r} repeated")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise BadUpstreamResponseError("event stream headers are truncated") from exc
    return headers


def _header_value(data: bytes, kind: int, offset: int) -> tuple[HeaderValue, int]:
    if kind in (0, 1):
        return kind == 0, offset
    fixed = _FIXED_WIDTH.get(kind)
    if fixed is not None:
        return int(fixed.unpack_from(data, offset)[0]), offset + fixed.size
    if kind == _UUID:
        return _exact(data, offset, 16), offset + 16
    if kind in (_BYTES, _STRING):
        (length,) = _U16.unpack_from(data, offset)
        raw = _exact(data, offset + 2, length)
        return (raw.decode() if kind == _STRING else raw), offset + 2 + length
    raise BadUpstreamResponseError(f"event stream header type {kind} is unknown")


def _exact(data: bytes, offset: int, length: int) -> bytes:
    piece = data[offset : offset + length]
    if len(piece) != length:
        raise IndexError(offset + length)
    return piece

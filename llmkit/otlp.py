"""OTLP/HTTP export of ``SpanData`` tuples: protobuf written by hand, sent with aiohttp.

The SDK's path (``ReadableSpan`` per span, then its OTLP encoder) cost ~50 µs per span
in the export thread, which shares the worker's core and GIL with the event loop. The
few messages a trace export needs are small enough to write directly; the wire format
(``opentelemetry/proto/collector/trace/v1/trace_service.proto``)::

    ExportTraceServiceRequest { 1: repeated ResourceSpans }
    ResourceSpans  { 1: Resource { 1: repeated KeyValue }  2: repeated ScopeSpans }
    ScopeSpans     { 1: InstrumentationScope { 1: string name }  2: repeated Span }
    Span           { 1: bytes trace_id (16)  2: bytes span_id (8)  4: bytes parent_span_id
                     5: string name  6: enum kind (1 internal, 2 server, 3 client)
                     7: fixed64 start  8: fixed64 end  9: repeated KeyValue attributes
                     15: Status { 3: enum code (2 error) }  16: fixed32 flags }
    KeyValue       { 1: string key  2: AnyValue }
    AnyValue       { 1: string | 2: bool | 3: int64 | 4: double
                     | 5: ArrayValue { 1: repeated AnyValue } }

``flags`` carries the W3C trace flags (sampled) and whether the parent is remote
(bits 8 and 9, as the SDK's exporter sets them). The encoding is checked against
the protobuf classes in ``tests/test_tracing.py``.
"""

from __future__ import annotations

import http.client
import logging
import struct
from collections import ChainMap
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from llmkit.tracing import SharedAttributes, SpanData

log = logging.getLogger("llmkit.tracing")

HEADERS = {"Content-Type": "application/x-protobuf"}
_DOUBLE = struct.Struct("<d").pack
_SAMPLED, _HAS_REMOTE, _IS_REMOTE = 0x01, 0x100, 0x200
# A span's fixed-size fields in one pack each: trace id (two halves) and span id, parent
# span id (bytes, big-endian), then kind, start and end (varint tag, fixed64 little-endian).
_IDS = struct.Struct(">2sQQ2sQ").pack
_PARENT = struct.Struct(">2sQ").pack
_TIMES = struct.Struct("<BBBQBQ").pack
_LOW64 = (1 << 64) - 1
_FLAGS = {flags: b"\x85\x01" + flags.to_bytes(4, "little")
          for flags in (_SAMPLED | _HAS_REMOTE, _SAMPLED | _HAS_REMOTE | _IS_REMOTE)}  # fmt: skip
_NAMES: dict[str, bytes] = {}  # span names, as encoded fields
_ERROR_STATUS = b"\x7a\x02\x18\x02"  # field 15 {code: ERROR}


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (``tag`` already shifted: ``field << 3 | 2``)."""
    size = len(payload)
    if size < 0x80:
        return bytes((tag, size)) + payload
    return bytes((tag,)) + _varint(size) + payload


def _any_value(value: Any) -> bytes:
    if isinstance(value, str):
        return _field(0x0A, value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, (list, tuple)):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))
    return _field(0x0A, str(value).encode())


# Encoded attribute fields seen before, by (tag, key, type, value): most values repeat
# (models, providers, statuses), and the type keeps True apart from 1.
_ENCODED: dict[tuple[int, str, type, Any], bytes] = {}
_ENCODED_MAX = 4096


# SharedAttributes encoded before, by identity: (the mapping, which pins it, its bytes).
_SHARED: dict[int, tuple[Mapping[str, Any], bytes]] = {}


def _span_attributes(attributes: Mapping[str, Any]) -> bytes:
    """A span's ``KeyValue`` fields: a ``SharedAttributes`` block is encoded once."""
    cls = attributes.__class__
    if cls is ChainMap:  # in dict(chain) order: its last map's keys first
        maps = reversed(attributes.maps)  # type: ignore[attr-defined]
        return b"".join([_span_attributes(part) for part in maps])
    if cls is SharedAttributes:
        known = _SHARED.get(id(attributes))
        if known is not None and known[0] is attributes:
            return known[1]
        encoded = _attributes(attributes, 0x4A)
        if len(_SHARED) >= _ENCODED_MAX:
            _SHARED.clear()
        _SHARED[id(attributes)] = (attributes, encoded)
        return encoded
    return _attributes(attributes, 0x4A)


def _attributes(attributes: Mapping[str, Any], tag: int) -> bytes:
    """Repeated ``KeyValue`` fields under ``tag`` (0x4A in a Span, 0x0A in a Resource)."""
    parts = []
    for key, value in attributes.items():
        if isinstance(value, list):
            parts.append(_field(tag, _field(0x0A, key.encode()) + _field(0x12, _any_value(value))))
            continue
        cache_key = (tag, key, type(value), value)
        encoded = _ENCODED.get(cache_key)
        if encoded is None:
            encoded = _field(tag, _field(0x0A, key.encode()) + _field(0x12, _any_value(value)))
            if len(_ENCODED) >= _ENCODED_MAX:
                _ENCODED.clear()
            _ENCODED[cache_key] = encoded
        parts.append(encoded)
    return b"".join(parts)


def encode_span(span: SpanData) -> bytes:
    """One ``Span`` message (without its field tag)."""
    trace_id, span_id, parent, remote, name, kind, start, end, attributes, error = span
    parts = [_IDS(b"\x0a\x10", trace_id >> 64, trace_id & _LOW64, b"\x12\x08", span_id)]
    flags = _SAMPLED | _HAS_REMOTE
    if parent:
        parts.append(_PARENT(b"\x22\x08", parent))
        if remote:
            flags |= _IS_REMOTE
    name_field = _NAMES.get(name)
    if name_field is None:
        if len(_NAMES) >= _ENCODED_MAX:
            _NAMES.clear()
        name_field = _NAMES[name] = _field(0x2A, name.encode())
    parts += (name_field, _TIMES(0x30, kind + 1, 0x39, start, 0x41, end),
              _span_attributes(attributes))  # fmt: skip
    if error is not None:
        parts += (_attributes({"error.type": error}, 0x4A), _ERROR_STATUS)
    parts.append(_FLAGS[flags])
    return b"".join(parts)


def encode_request(spans: Sequence[SpanData], service_name: str) -> bytes:
    """An ``ExportTraceServiceRequest`` with every span under one resource and scope."""
    resource = _field(0x0A, _attributes({"service.name": service_name}, 0x0A))
    scope = _field(0x0A, _field(0x0A, b"llmkit"))
    body = b"".join([_field(0x12, encode_span(span)) for span in spans])
    scope_spans = _field(0x12, scope + body)
    return _field(0x0A, resource + scope_spans)


class OtlpHttpExporter:
    """POSTs batches to an OTLP/HTTP ``/v1/traces`` endpoint: ``send`` on the event loop
    through a kept-alive aiohttp session, ``export`` synchronously (at exit, when the loop
    is gone) with http.client. A failed batch is logged and dropped: spans are best
    effort."""

    def __init__(self, endpoint: str, service_name: str, timeout_s: float = 5.0) -> None:
        url = urlsplit(endpoint)
        self._secure = url.scheme == "https"
        self._host = url.netloc
        self._path = url.path or "/v1/traces"
        self._service = service_name
        self._timeout = timeout_s
        self._endpoint = endpoint
        self._connection: http.client.HTTPConnection | None = None
        self._session: aiohttp.ClientSession | None = None

    def send(self, spans: Sequence[SpanData]) -> Coroutine[Any, Any, None]:
        """Encode ``spans`` now; the returned coroutine posts them."""
        return self._post(encode_request(spans, self._service))

    async def _post(self, body: bytes) -> None:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self._timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        try:
            async with self._session.post(self._endpoint, data=body, headers=HEADERS) as answer:
                await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("OTLP export failed: %s", exc)
            return
        if status >= 300:
            log.warning("OTLP export refused: HTTP %d", status)

    async def aclose(self) -> None:
        """Close the loop's session (the worker is leaving)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def export(self, spans: Sequence[SpanData]) -> None:
        body = encode_request(spans, self._service)
        headers = HEADERS
        for attempt in (1, 2):  # once more on a fresh connection if the kept one died
            try:
                connection = self._connect()
                connection.request("POST", self._path, body, headers)
                response = connection.getresponse()
                response.read()
                if response.status >= 300:
                    log.warning("OTLP export refused: HTTP %d", response.status)
                return
            except (OSError, http.client.HTTPException) as exc:
                self.shutdown()
                if attempt == 2:
                    log.warning("OTLP export failed: %s", exc)

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            cls = http.client.HTTPSConnection if self._secure else http.client.HTTPConnection
            self._connection = cls(self._host, timeout=self._timeout)
        return self._connection

    def shutdown(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

"""OTLP/HTTP export: spans written as protobuf by hand, a trace at a time, sent with aiohttp.

The SDK's path (``ReadableSpan`` per span, then its OTLP encoder) cost ~50 µs per span,
and span tuples encoded at export (shared attribute blocks cached) still cost a sampled
request ~100K instructions for the spans alone. So a sampled request writes its own:
each ``Span`` message is a fixed-size pack of its ids and times (``struct``) between
cached bytes (a head with the message's length, and a tail with its name, kind,
attributes and flags, the same for every span of that shape); only the root span's
per-request attributes (request id, status, tokens, cost) are written each time. A
finished trace is one ``bytes``: the concatenation of its ``ScopeSpans.spans`` fields,
so a batch is the traces joined under one resource and scope. The wire format
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

A Span's fields are written ids, times, then the tail (protobuf allows any field order;
a repeated field's entries keep theirs). ``flags`` carries the W3C trace flags (sampled)
and whether the parent is remote (bits 8 and 9, as the SDK's exporter sets them). The
encoding is checked against the protobuf classes and the SDK's own encoder in
``tests/test_tracing.py``.
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
import struct
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp

log = logging.getLogger("llmkit.tracing")

HEADERS = {"Content-Type": "application/x-protobuf"}
INTERNAL, SERVER, CLIENT = 0, 1, 2  # opentelemetry.trace.SpanKind values; OTLP's are +1
DOUBLE = struct.Struct("<d").pack
_SAMPLED, _HAS_REMOTE, _IS_REMOTE = 0x01, 0x100, 0x200
# A span's ids and times, packed at once. A child span: the 30 bytes its trace shares
# (``CHILD_PREFIX``: trace id field 1, parent span id field 4, field 2's tag), its span
# id, start and end (fields 7 and 8: a tag and fixed64); 56 bytes. A root span: its
# trace id field, span id, its remote parent's id if any, and times. A trace id is its
# 16 bytes, a span id an int written little-endian (``tracing``).
TRACE_TAG = b"\x0a\x10"  # field 1, 16 bytes
CHILD_PREFIX = struct.Struct("<2s16s2sQ2s").pack
_CHILD_LAYOUT = "30sQBQBQ"  # CHILD_HEAD's fields, which children_pack repeats per span
CHILD_HEAD = struct.Struct("<" + _CHILD_LAYOUT).pack
_ROOT_HEAD = struct.Struct("<2s16s2sQBQBQ").pack
_REMOTE_ROOT_HEAD = struct.Struct("<2s16s2sQ2s8sBQBQ").pack
SPAN_ID = struct.Struct("<Q").pack  # a span id's bytes, as every field holds them
CHILD_SIZE = 56
SPAN_TAG, PARENT_TAG = b"\x12\x08", b"\x22\x08"  # fields 2, 4
START_TAG, END_TAG = 0x39, 0x41  # fields 7, 8 (fixed64)
FLAGS = {remote: b"\x85\x01" + (_SAMPLED | _HAS_REMOTE | (_IS_REMOTE if remote else 0))
         .to_bytes(4, "little") for remote in (False, True)}  # fmt: skip
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
        return b"\x21" + DOUBLE(value)
    if isinstance(value, (list, tuple)):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))
    return _field(0x0A, str(value).encode())


def attribute(key: str, value: Any, tag: int = 0x4A) -> bytes:
    """One ``KeyValue`` field under ``tag`` (0x4A in a Span, 0x0A in a Resource)."""
    return _field(tag, _field(0x0A, key.encode()) + _field(0x12, _any_value(value)))


def attributes(values: Mapping[str, Any], tag: int = 0x4A) -> bytes:
    return b"".join([attribute(key, value, tag) for key, value in values.items()])


def span_tail(name: str, kind: int, values: Mapping[str, Any], error: str | None = None) -> bytes:
    """A Span's fields after its ids and times, but for flags: name, kind, attributes and,
    when ``error`` is set, ``error.type`` and an ERROR status."""
    tail = _field(0x2A, name.encode()) + bytes((0x30, kind + 1)) + attributes(values)
    if error is not None:
        tail += error_fields(error)
    return tail


def child_shape(name: str, kind: int, values: Mapping[str, Any], error: str | None = None
                ) -> tuple[bytes, bytes]:  # fmt: skip
    """(head, tail) of a span with a local parent: ``head + CHILD_HEAD(...) + tail`` is its
    whole ``ScopeSpans.spans`` field (``head`` is the field's tag and length), the same
    for every span of that name, kind, attributes and error."""
    tail = span_tail(name, kind, values, error) + FLAGS[False]
    return b"\x12" + _varint(CHILD_SIZE + len(tail)), tail


def children_pack(
    shapes: Sequence[tuple[bytes, bytes]],
) -> tuple[Callable[..., bytes], tuple[bytes, ...]]:
    """One ``pack`` that writes child spans of ``shapes`` (``child_shape``'s) together,
    and the constant runs it takes between their ids and times: for shapes A and B,
    ``pack(runs[0], prefix, a_id, START_TAG, a_start, END_TAG, a_end, runs[1], prefix,
    b_id, START_TAG, b_start, END_TAG, b_end, runs[2])`` is ``A.head + CHILD_HEAD(...) +
    A.tail + B.head + ... + B.tail``: one call where each span would make one, and a
    tuple and a join (``trace_spans``) fewer. ``prefix`` is ``child_prefix``'s."""
    runs = [b""]
    for head, tail in shapes:
        runs[-1] += head
        runs.append(tail)
    layout = _CHILD_LAYOUT.join(f"{len(run)}s" for run in runs)
    return struct.Struct("<" + layout).pack, tuple(runs)


def child_prefix(trace: bytes, root: int) -> bytes:
    """The fields every child span of a trace starts with (``CHILD_HEAD``'s first):
    ``trace`` is the trace id (16 bytes), ``root`` the children's parent."""
    return CHILD_PREFIX(TRACE_TAG, trace, PARENT_TAG, root, SPAN_TAG)


def trace_spans(
    trace: bytes,
    root: int,
    parent: bytes | None,
    start: int,
    end: int,
    tail: list[bytes],
    children: list[bytes],
) -> bytes:
    """A finished trace: its root span's ``ScopeSpans.spans`` field after ``children``
    (theirs, whole or in parts). ``trace`` is the trace id, ``root`` the root's span id,
    ``parent`` a remote parent's span id (bytes) or None, and ``tail`` the root's fields
    in parts: a placeholder that its ids and times replace, then the fields after them,
    flags included (``span_tail``, ``FLAGS[parent is not None]``, the attributes)."""
    if parent is None:
        head = _ROOT_HEAD(TRACE_TAG, trace, SPAN_TAG, root, START_TAG, start, END_TAG, end)
    else:
        head = _REMOTE_ROOT_HEAD(TRACE_TAG, trace, SPAN_TAG, root, PARENT_TAG, parent, START_TAG,
                                 start, END_TAG, end)  # fmt: skip
    tail[0] = head
    body = b"".join(tail)
    size = len(body)
    children += (_SPAN_FIELDS[size] if size < _SPAN_FIELDS_MAX else b"\x12" + _varint(size), body)
    return b"".join(children)


class IntAttribute(dict[int, bytes]):
    """The encoded ``KeyValue``s of one int attribute, by value: a plain dict lookup when
    the value was seen before (statuses, attempt counts, most token counts); bounded."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def __missing__(self, value: int) -> bytes:
        if len(self) >= _INTS_MAX:
            self.clear()
        encoded = self[value] = attribute(self.key, value)
        return encoded


_INTS_MAX = 4096


# A span's ``ScopeSpans.spans`` field tag and length, by length (a root span's are mostly
# 200-600 bytes): a list index instead of a varint written per trace.
_SPAN_FIELDS_MAX = 2048
_SPAN_FIELDS = [b"\x12" + _varint(size) for size in range(_SPAN_FIELDS_MAX)]


def string_attribute(prefix: bytes, value: str) -> bytes:
    """A string ``KeyValue`` whose key field (``_field(0x0A, key)``) is ``prefix``."""
    any_value = _field(0x0A, value.encode())
    return _field(0x4A, prefix + _field(0x12, any_value))


def double_prefix(key: str) -> bytes:
    """A double ``KeyValue`` of ``key`` up to its value: ``+ DOUBLE(value)`` completes it."""
    key_bytes = key_field(key)
    return bytes((0x4A, len(key_bytes) + 11)) + key_bytes + b"\x12\x09\x21"


_ERRORS: dict[str, bytes] = {}


def error_fields(error: str) -> bytes:
    """``error.type`` and an ERROR status, for a span's tail (cached: a few kinds)."""
    encoded = _ERRORS.get(error)
    if encoded is None:
        if len(_ERRORS) >= _INTS_MAX:
            _ERRORS.clear()
        encoded = _ERRORS[error] = attribute("error.type", error) + _ERROR_STATUS
    return encoded


def key_field(key: str) -> bytes:
    return _field(0x0A, key.encode())


def encode_request(traces: Sequence[bytes], service_name: str) -> bytes:
    """An ``ExportTraceServiceRequest`` of ``traces`` (each its spans' ``ScopeSpans.spans``
    fields) under one resource and scope, written in one join."""
    resource = _field(0x0A, attributes({"service.name": service_name}, 0x0A))
    scope = _field(0x0A, _field(0x0A, b"llmkit"))
    scope_spans = len(scope) + sum(map(len, traces))
    resource_spans = len(resource) + 1 + len(_varint(scope_spans)) + scope_spans
    head = (b"\x0a" + _varint(resource_spans) + resource + b"\x12" + _varint(scope_spans)
            + scope)  # fmt: skip
    return b"".join([head, *traces])


class OtlpHttpExporter:
    """POSTs batches to an OTLP/HTTP ``/v1/traces`` endpoint: ``send`` on the event loop
    through a kept-alive aiohttp session, ``export`` synchronously (at exit, when the loop
    is gone) with http.client. A failed batch is logged and dropped: spans are best
    effort.

    ``headers`` go with every POST (a hosted collector's credentials: they are never
    logged); ``cafile`` is the PEM bundle an ``https`` endpoint's certificate is checked
    against instead of the system's (a collector with a private CA). ``env_headers`` and
    ``env_cafile`` read both where OpenTelemetry's exporters do.
    """

    def __init__(
        self,
        endpoint: str,
        service_name: str,
        timeout_s: float = 5.0,
        headers: Mapping[str, str] | None = None,
        cafile: str | None = None,
    ) -> None:
        url = urlsplit(endpoint)
        self._secure = url.scheme == "https"
        self._host = url.netloc
        self._path = url.path or "/v1/traces"
        self._service = service_name
        self._timeout = timeout_s
        self._endpoint = endpoint
        self._headers = {**(headers or {}), **HEADERS}
        # Certificates are always verified: against the system's CAs, or the given bundle.
        # (True: aiohttp's default, for a plain http endpoint, where there is no TLS.)
        self._tls: ssl.SSLContext | bool = True
        if self._secure:
            self._tls = ssl.create_default_context(cafile=cafile)
        self._connection: http.client.HTTPConnection | None = None
        self._session: aiohttp.ClientSession | None = None

    def send(self, traces: Sequence[bytes]) -> Coroutine[Any, Any, None]:
        """The coroutine that posts ``traces`` (``encode_request``)."""
        return self._post(encode_request(traces, self._service))

    async def _post(self, body: bytes) -> None:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self._timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        try:
            post = self._session.post(
                self._endpoint, data=body, headers=self._headers, ssl=self._tls
            )
            async with post as answer:
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

    def export(self, traces: Sequence[bytes]) -> None:
        body = encode_request(traces, self._service)
        headers = self._headers
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
            if self._secure:
                assert isinstance(self._tls, ssl.SSLContext)
                self._connection = http.client.HTTPSConnection(
                    self._host, timeout=self._timeout, context=self._tls
                )
            else:
                self._connection = http.client.HTTPConnection(self._host, timeout=self._timeout)
        return self._connection

    def shutdown(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def env_headers(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Export headers as OpenTelemetry's exporters take them: from
    ``OTEL_EXPORTER_OTLP_TRACES_HEADERS``, else ``OTEL_EXPORTER_OTLP_HEADERS``, written
    ``key=value,key2=value2`` with URL-encoded values. A malformed pair is skipped with a
    warning that names its position, never its text (it may hold a credential)."""
    raw = environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
    if raw is None:
        raw = environ.get("OTEL_EXPORTER_OTLP_HEADERS", "")
    headers = {}
    for position, pair in enumerate(raw.split(","), 1):
        if not pair.strip():
            continue
        name, equals, value = pair.partition("=")
        name = name.strip().lower()
        if not equals or not name or not name.isascii() or " " in name:
            log.warning("OTLP headers: pair %d is not key=value; skipped", position)
            continue
        headers[name] = unquote(value.strip())
    return headers


def env_cafile(environ: Mapping[str, str] = os.environ) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE``, else ``OTEL_EXPORTER_OTLP_CERTIFICATE``:
    the PEM file a TLS collector's certificate is checked against (None: the system's)."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"):
        if environ.get(name):
            return environ[name]
    return None

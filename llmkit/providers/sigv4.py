"""AWS Signature Version 4, as pure functions over the parts of one request.

The four steps are AWS's own:

1. canonical request: method, canonical URI, canonical query, canonical headers, the
   signed header names, and the hex SHA-256 of the payload, one per line;
2. string to sign: algorithm, timestamp, credential scope, hex SHA-256 of (1);
3. signing key: an HMAC-SHA256 chain over the date, region, service and ``aws4_request``,
   keyed first with ``"AWS4" + secret``;
4. signature: hex HMAC-SHA256 of (2) under (3), sent in ``Authorization``.

For every service but S3 the canonical URI is the path *as it is sent* (so already
percent-encoded once), with dot segments and repeated slashes removed, percent-encoded
again: a path segment ``a%3Ab`` is signed as ``a%253Ab``. That is the rule botocore
follows, and the tests hold this module to botocore and to AWS's published test vectors.

The clock is a parameter (``now``), so a signature is a function of its inputs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import quote, unquote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# Hop-by-hop headers and ones proxies rewrite: signing them would break on the way.
# Trace context (W3C traceparent/tracestate, baggage) is rewritten by every tracing hop,
# so the AWS SDKs stopped signing it (botocore 1.44); so do we.
UNSIGNED_HEADERS = frozenset(
    {
        "authorization", "baggage", "connection", "expect", "keep-alive",
        "proxy-authenticate", "proxy-authorization", "te", "traceparent", "tracestate",
        "trailer", "transfer-encoding", "upgrade", "user-agent", "x-amzn-trace-id",
    }
)  # fmt: skip
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = "-_.~"


@dataclass(frozen=True, slots=True)
class Credentials:
    """An AWS key pair, plus the session token temporary credentials carry."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: Credentials,
    *,
    region: str,
    service: str,
    now: datetime,
) -> dict[str, str]:
    """``headers`` plus ``Host`` (if absent), ``X-Amz-Date``, ``X-Amz-Security-Token``
    (for temporary credentials) and ``Authorization``: everything to send.

    ``url`` must be exactly what goes on the wire (path percent-encoded as sent).
    """
    timestamp = amz_timestamp(now)
    stale = {"authorization", "x-amz-date", "x-amz-security-token"}
    signed = {name: value for name, value in headers.items() if name.lower() not in stale}
    if not any(name.lower() == "host" for name in signed):
        signed["Host"] = host_header(url)
    signed["X-Amz-Date"] = timestamp
    if credentials.session_token:
        signed["X-Amz-Security-Token"] = credentials.session_token
    names, header_block = canonical_headers(signed)
    parts = urlsplit(url)
    request = canonical_request(
        method, parts.path, parts.query, header_block, names, hashlib.sha256(body).hexdigest()
    )
    scope = credential_scope(timestamp[:8], region, service)
    key = signing_key(credentials.secret_access_key, timestamp[:8], region, service)
    signature = hmac.new(key, string_to_sign(timestamp, scope, request).encode(), "sha256")
    signed["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={names}, Signature={signature.hexdigest()}"
    )
    return signed


def amz_timestamp(now: datetime) -> str:
    """``now`` as SigV4's basic ISO 8601 UTC form; a naive ``now`` is taken as UTC."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)


def host_header(url: str) -> str:
    """The ``Host`` value for ``url``: lower-case, without userinfo or a default port."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def canonical_request(
    method: str, path: str, query: str, header_block: str, signed_names: str, payload_hash: str
) -> str:
    """Step 1: the six canonical lines (the header block ends with its own newline)."""
    return "\n".join(
        (
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            header_block + "\n",
            signed_names,
            payload_hash,
        )
    )


def canonical_uri(path: str) -> str:
    """The path as sent, normalized and percent-encoded again (every service but S3)."""
    return quote(_remove_dot_segments(path), safe="/~")


def canonical_query(query: str) -> str:
    """Each name and value encoded once (RFC 3986 unreserved kept), sorted by name then value."""
    if not query:
        return ""
    pairs = []
    for item in query.split("&"):
        name, _, value = item.partition("=")
        pairs.append((_encode_once(name), _encode_once(value)))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """The signed header names (``a;b;c``) and the ``name:value`` block, both sorted.

    Names are lower-cased; values are trimmed and inner runs of spaces collapsed;
    repeated names (differing only in case) join their values with commas.
    """
    values: dict[str, list[str]] = {}
    for name, value in headers.items():
        lowered = name.lower().strip()
        if lowered not in UNSIGNED_HEADERS:
            values.setdefault(lowered, []).append(" ".join(value.split()))
    names = sorted(values)
    block = "\n".join(f"{name}:{','.join(values[name])}" for name in names)
    return ";".join(names), block


def credential_scope(date: str, region: str, service: str) -> str:
    """``date/region/service/aws4_request``: what a signature is good for."""
    return f"{date}/{region}/{service}/aws4_request"


def string_to_sign(timestamp: str, scope: str, canonical: str) -> str:
    """Step 2."""
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """Step 3: the key for one day, region and service."""
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), "sha256").digest()
    return key


def _encode_once(text: str) -> str:
    return quote(unquote(text), safe=_UNRESERVED)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, and AWS's rule that empty segments (``//``) go too."""
    if not path:
        return "/"
    kept: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if kept:
                kept.pop()
        elif segment and segment != ".":
            kept.append(segment)
    leading = "/" if path.startswith("/") else ""
    trailing = "/" if path.endswith("/") and kept else ""
    return leading + "/".join(kept) + trailing

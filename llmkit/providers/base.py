"""What every wire format implements, and what it is handed.

A ``Provider`` is a catalog row merged with the config's overrides and the secret read
from the environment. A ``Target`` is one attempt: a provider and the model name the
upstream knows. A ``Call`` is the request as adapters see it. An ``Adapter`` turns a
``Call`` into the provider's wire format and the answer back into OpenAI's shape,
raising ``llmkit.errors`` errors (never aiohttp's) on every failure.
"""

from __future__ import annotations

import base64
import struct
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec

from llmkit.errors import (
    BadUpstreamResponseError,
    InvalidRequestError,
    LLMKitError,
    error_for_status,
)
from llmkit.pricing import Price
from llmkit.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
    encoder,
    json_decoder,
)
from llmkit.upstream import Upstream, retry_after_from

if TYPE_CHECKING:
    from llmkit.attempts import Run
    from llmkit.observability import RequestObs

T = TypeVar("T")
# W3C trace context travels to every provider, so upstream spans join the caller's trace.
PROPAGATED_HEADERS = ("traceparent", "tracestate")
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
SSE_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


@dataclass(frozen=True, slots=True)
class Provider:
    """A provider ready to call. ``api_key`` and ``credentials`` never print."""

    name: str
    wire: str
    base_url: str
    auth: str = "bearer"  # bearer | x-api-key | api-key | x-goog-api-key | sigv4 | none
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0
    options: Mapping[str, str] = field(default_factory=dict)
    # Extra secrets some wires need (Bedrock: aws_access_key_id, aws_session_token ...).
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    key_env: str = ""  # the variable's NAME, for messages; never its value
    key_required: bool = True

    def auth_headers(self) -> dict[str, str]:
        """Headers that carry the key, for the header-based auth styles."""
        if not self.api_key or self.auth in ("none", "sigv4"):
            return {}
        if self.auth == "bearer":
            return {"Authorization": f"Bearer {self.api_key}"}
        return {self.auth: self.api_key}


@dataclass(frozen=True, slots=True)
class Target:
    """One attempt: ``model`` is the name the upstream knows; ``price`` may be unknown."""

    provider: Provider
    model: str
    deployment: str
    index: int = 0
    price: Price | None = None

    @property
    def label(self) -> str:
        return f"{self.provider.name}/{self.model}"


@dataclass(slots=True)
class Call:
    """A chat request as adapters see it.

    ``extras`` holds the body's top-level fields that ``ChatRequest`` does not know;
    OpenAI-compatible adapters pass them through untouched, others ignore them.
    ``headers`` are the ones to propagate upstream (``traceparent``, ``x-request-id``).
    ``key``, ``profile`` and ``response_headers`` are the gateway's, not the adapters'.
    """

    request: ChatRequest
    extras: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    key: str | None = None  # the virtual key's name, for its limits
    profile: str | None = None  # routing profile override (x-llmkit-route-profile)
    # Headers the response must carry whatever happens (x-ratelimit-* ...).
    response_headers: dict[str, str] = field(default_factory=dict)
    obs: RequestObs | None = None  # tracing/log recorder of a sampled or logged request
    run: Run | None = None  # its tries, once resolved: what its metrics are counted from


SSE_DONE = b"data: [DONE]\n\n"


class Frames:
    """What one upstream read became: OpenAI SSE events, ready to write as they are.

    ``events`` is zero or more whole ``data: <chunk json>\n\n`` events. The usage-only
    chunk (empty ``choices``) is never in ``events``: it travels in ``usage_event`` so
    each consumer can show it or not, and its ``usage`` settles the request's tokens.
    ``last`` says the upstream has ended the stream in this read, so the consumer can
    send its end with these events, in one write.

    A slotted class, not a NamedTuple: one is made per upstream read and its fields
    are read several times per read, and CPython 3.11 specializes slot reads, not a
    NamedTuple's field descriptors (measured: reads ~1.8x, construction ~1.5x faster).
    """

    __slots__ = ("events", "usage", "usage_event", "last")

    def __init__(
        self,
        events: bytes,
        usage: Usage | None = None,
        usage_event: bytes = b"",
        last: bool = False,
    ) -> None:
        self.events = events
        self.usage = usage
        self.usage_event = usage_event
        self.last = last

    def _fields(self) -> tuple[bytes, Usage | None, bytes, bool]:
        return self.events, self.usage, self.usage_event, self.last

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frames) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the lists it travels in

    def __repr__(self) -> str:
        return "Frames(events={!r}, usage={!r}, usage_event={!r}, last={!r})".format(
            *self._fields()
        )


def sse_event(chunk: ChatCompletionChunk) -> bytes:
    return b"data: " + encoder.encode(chunk) + b"\n\n"


class Adapter(ABC):
    """Translates OpenAI-shaped calls to one wire format and back."""

    wire: ClassVar[str]

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    @abstractmethod
    async def complete(self, call: Call, target: Target) -> ChatCompletion:
        """One whole completion."""

    @abstractmethod
    def stream(self, call: Call, target: Target) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks in OpenAI's order: role delta, content or tool-call deltas, a chunk with
        ``finish_reason``, then (if ``stream_options.include_usage``) a usage chunk with
        empty ``choices``. Errors after the first chunk raise from the iterator."""

    async def frames(self, call: Call, target: Target) -> AsyncIterator[Frames]:
        """The stream as the client will receive it, one ``Frames`` per chunk.

        Wires whose upstream already speaks OpenAI's SSE override this to pass the
        upstream's bytes through, one ``Frames`` per upstream read.
        """
        async for chunk in self.stream(call, target):
            if chunk.usage is not None and not chunk.choices:
                yield Frames(b"", chunk.usage, sse_event(chunk))
            else:
                yield Frames(sse_event(chunk), chunk.usage)

    async def embed(self, request: EmbeddingRequest, target: Target) -> EmbeddingResponse:
        """Embeddings; providers without them answer 400."""
        raise InvalidRequestError(
            f"provider '{target.provider.name}' does not serve embeddings", param="model"
        )

    def request_headers(
        self, target: Target, call: Call | None, base: Mapping[str, str]
    ) -> dict[str, str]:
        """``base``, then the provider's static headers, its auth, and trace context."""
        provider = target.provider
        headers = {**base, **provider.headers, **provider.auth_headers()}
        if call is not None:
            for name in PROPAGATED_HEADERS:
                if name in call.headers:
                    headers[name] = call.headers[name]
        return headers

    def post(
        self, target: Target, url: str, body: bytes, headers: dict[str, str]
    ) -> Coroutine[Any, Any, bytes]:
        """POST ``body``; awaiting it gives the whole (bounded) answer, errors mapped.

        A plain function handing back ``Upstream.fetch``'s coroutine: every adapter's
        non-streaming request passes here, and an ``async def`` would add a coroutine
        frame that each resumption walks through.
        """
        provider = target.provider
        return self.upstream.fetch(
            url, headers=headers, body=body, timeout_s=provider.timeout_s,
            on_error=self.map_error, provider=provider.name,
        )  # fmt: skip

    async def close(self) -> None:  # noqa: B027 - optional hook; the pool belongs to Upstream
        """Release anything the adapter holds beyond the shared upstream pool."""

    def map_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> LLMKitError:
        """An upstream non-2xx answer as the most specific error, keeping its message.

        Understands the common shapes: ``{"error": {"message": ...}}`` (OpenAI,
        Anthropic, Gemini), ``{"error": "..."}`` and ``{"message": ...}`` (Cohere,
        Bedrock). Override for anything stranger.
        """
        message = error_message(body) or f"upstream answered HTTP {status}"
        return error_for_status(status, message, retry_after=retry_after_from(headers))


def decode_upstream(decoder: msgspec.json.Decoder[T], body: bytes, target: Target) -> T:
    """``body`` decoded, or a 502 that names the provider and what was wrong."""
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise BadUpstreamResponseError(
            f"{target.provider.name} sent a response that is not valid: {exc}"
        ) from None


def encode_vector(values: list[float], encoding_format: str) -> list[float] | str:
    """An embedding as OpenAI sends it: floats, or base64 of little-endian float32."""
    if encoding_format != "base64":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def error_message(body: bytes) -> str | None:
    """The human message inside a JSON error body, if there is one."""
    try:
        data = json_decoder.decode(body)
    except Exception:
        return None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # Gemini answers some errors as a one-element array
    if not isinstance(data, dict):
        return None
    error = data.get("error", data)
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        message = error.get("message") or data.get("message")
        return str(message) if message else None
    return None

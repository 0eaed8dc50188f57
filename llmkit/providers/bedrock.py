"""AWS Bedrock's Converse API: ``POST {base}/model/{modelId}/converse`` and ``/converse-stream``.

Every request is signed with SigV4 for service ``bedrock``. The secret access key is
``provider.api_key`` (AWS_SECRET_ACCESS_KEY), the access key id
``provider.credentials["aws_access_key_id"]`` and, for temporary credentials, the session
token ``provider.credentials["aws_session_token"]`` (sent, and signed, as
``X-Amz-Security-Token``). The region is ``options["region"]`` (the catalog's default is
us-east-1), else ``credentials["aws_region"]``; without a configured ``base_url`` the
endpoint is ``https://bedrock-runtime.{region}.amazonaws.com``.

The model id (``anthropic.claude-3-5-sonnet-20240620-v1:0``, or an ARN with ``/``) is
percent-encoded into one path segment. aiohttp re-normalizes a URL before sending it
(``%3A`` goes out as ``:``, which RFC 3986 allows in a path), so the URL is put in that
normal form first and the signature covers exactly the path on the wire; AWS
canonicalizes whatever arrives the same way ``sigv4`` does.

Errors arrive as ``{"message": ...}`` with the type in ``x-amzn-errortype``
(``ThrottlingException:http://internal.amazon.com/...``), or inside a stream as an
``exception`` message with ``:exception-type``. The type picks the error (``ERROR_TYPES``);
the status only when the type is unknown. AWS answers credential failures (a bad
signature, an unknown key id, an expired token) with 403; they become
AuthenticationError (401) because the gateway's credentials are wrong, not the caller's
permissions. AccessDeniedException stays 403.

Translation lives in ``bedrock_request`` and ``bedrock_response``, stream framing in
``eventstream``, signing in ``sigv4``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timezone
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from llmkit.errors import (
    AuthenticationError,
    BadUpstreamResponseError,
    InternalError,
    InvalidRequestError,
    LLMKitError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
    error_for_status,
)
from llmkit.providers import sigv4
from llmkit.providers.base import Adapter, Call, Provider, Target
from llmkit.providers.bedrock_request import converse_body
from llmkit.providers.bedrock_response import StreamTranslator, completion_from
from llmkit.providers.eventstream import EventMessage, EventStreamDecoder
from llmkit.types import ChatCompletion, ChatCompletionChunk, json_decoder
from llmkit.upstream import Upstream, map_client_errors, retry_after_from

SERVICE = "bedrock"
JSON = "application/json"
EVENT_STREAM = "application/vnd.amazon.eventstream"
_REGION = re.compile(r"[a-z0-9-]{1,32}")

Clock = Callable[[], datetime]

# Bedrock error types, lower-cased (stream exceptions spell them camelCase).
ERROR_TYPES: dict[str, type[LLMKitError]] = {
    "validationexception": InvalidRequestError,
    "unrecognizedclientexception": AuthenticationError,
    "invalidsignatureexception": AuthenticationError,
    "incompletesignatureexception": AuthenticationError,
    "missingauthenticationtokenexception": AuthenticationError,
    "expiredtokenexception": AuthenticationError,
    "accessdeniedexception": PermissionDeniedError,
    "resourcenotfoundexception": NotFoundError,
    "throttlingexception": RateLimitError,
    "modeltimeoutexception": UpstreamTimeoutError,  # 408: the model, not the caller, was slow
    "modelnotreadyexception": ServiceUnavailableError,  # 429, but a warm-up, not a quota
    "serviceunavailableexception": ServiceUnavailableError,
    "internalserverexception": UpstreamError,
    "modelerrorexception": UpstreamError,  # 424: the model failed
    "modelstreamerrorexception": UpstreamError,
}


def utc_now() -> datetime:
    """The default clock: now, in UTC."""
    return datetime.now(timezone.utc)


class BedrockAdapter(Adapter):
    """Converse and ConverseStream, signed with SigV4; ``clock`` dates the signatures."""

    wire = "bedrock"

    def __init__(self, upstream: Upstream, clock: Clock = utc_now) -> None:
        super().__init__(upstream)
        self.clock = clock

    async def complete(self, call: Call, target: Target) -> ChatCompletion:
        converse = converse_body(call.request)
        provider = target.provider
        async with self._open(call, target, "converse", converse.body, False) as response:
            body = await self.upstream.read(response, provider.name)
            completion_id = _completion_id(response.headers)
        return completion_from(body, converse.json_tool, completion_id, target.label, provider.name)

    async def stream(self, call: Call, target: Target) -> AsyncIterator[ChatCompletionChunk]:
        converse = converse_body(call.request)
        provider = target.provider
        async with self._open(call, target, "converse-stream", converse.body, True) as response:
            translator = StreamTranslator(
                _completion_id(response.headers), target.label, json_tool=converse.json_tool,
                include_usage=call.request.wants_usage_chunk(), provider=provider.name,
            )  # fmt: skip
            async for message in _messages(response, provider.name):
                if message.header(":message-type") != "event":
                    raise stream_error(message, provider.name)
                for chunk in translator.on_event(message.header(":event-type"), message.payload):
                    yield chunk
        translator.check_complete()

    def map_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> LLMKitError:
        error_type = _error_type(headers.get("x-amzn-errortype", ""), body)
        message = _message_text(body) or f"upstream answered HTTP {status}"
        cls = ERROR_TYPES.get(error_type.lower())
        if cls is None:
            return error_for_status(status, message, retry_after=retry_after_from(headers))
        return cls(f"{error_type}: {message}", retry_after=retry_after_from(headers))

    def signed_request(
        self, call: Call, target: Target, action: str, body: bytes
    ) -> tuple[str, dict[str, str]]:
        """The URL and the signed headers of one Converse call."""
        provider = target.provider
        credentials = credentials_of(provider)
        region = region_of(provider)
        url = endpoint(provider, region, target.model, action)
        accept = EVENT_STREAM if action == "converse-stream" else JSON
        # No auth header: the signature is the auth (Provider.auth_headers() is empty here).
        headers = self.request_headers(target, call, {"Content-Type": JSON, "Accept": accept})
        signed = sigv4.sign(
            "POST", url, headers, body, credentials, region=region, service=SERVICE,
            now=self.clock(),
        )  # fmt: skip
        return url, signed

    def _open(
        self, call: Call, target: Target, action: str, body: bytes, stream: bool
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        url, headers = self.signed_request(call, target, action, body)
        provider = target.provider
        return self.upstream.open(
            "POST", url, headers=headers, body=body, timeout_s=provider.timeout_s,
            stream=stream, on_error=self.map_error, provider=provider.name,
        )  # fmt: skip


def credentials_of(provider: Provider) -> sigv4.Credentials:
    """The provider's AWS credentials; AuthenticationError (naming the variable) if absent."""
    access_key_id = provider.credentials.get("aws_access_key_id")
    if not access_key_id:
        raise AuthenticationError(
            f"provider '{provider.name}' has no AWS access key id: set AWS_ACCESS_KEY_ID"
        )
    if not provider.api_key:
        variable = provider.key_env or "AWS_SECRET_ACCESS_KEY"
        raise AuthenticationError(
            f"provider '{provider.name}' has no AWS secret access key: set {variable}"
        )
    token = provider.credentials.get("aws_session_token") or None
    return sigv4.Credentials(access_key_id, provider.api_key, token)


def region_of(provider: Provider) -> str:
    """``options["region"]``, else ``credentials["aws_region"]``; it goes into a host name."""
    region = provider.options.get("region") or provider.credentials.get("aws_region") or ""
    if not _REGION.fullmatch(region):
        raise InternalError(
            f"provider '{provider.name}' needs a valid region (options.region or AWS_REGION)"
        )
    return region


def endpoint(provider: Provider, region: str, model: str, action: str) -> str:
    """The call's URL, in the normal form aiohttp will send (see the module docstring)."""
    base = provider.base_url or f"https://bedrock-runtime.{region}.amazonaws.com"
    return str(URL(f"{base}/model/{quote(model, safe='')}/{action}"))


def stream_error(message: EventMessage, provider: str) -> LLMKitError:
    """An ``exception`` (or ``error``) message of a ConverseStream as the matching error."""
    if message.header(":message-type") == "exception":
        error_type = message.header(":exception-type")
        text = _message_text(message.payload)
    else:
        error_type = message.header(":error-code")
        text = message.header(":error-message")
    cls = ERROR_TYPES.get(error_type.lower(), UpstreamError)
    return cls(f"{error_type or 'error'} in the stream from {provider}: {text or 'no message'}")


async def _messages(response: aiohttp.ClientResponse, provider: str) -> AsyncIterator[EventMessage]:
    decoder = EventStreamDecoder()
    with map_client_errors(provider, None):
        async for piece in response.content.iter_any():
            for message in decoder.feed(piece):
                yield message
    if decoder.buffered:
        raise BadUpstreamResponseError(f"{provider} cut the stream in the middle of a message")


def _completion_id(headers: Mapping[str, str]) -> str:
    return "chatcmpl-" + (headers.get("x-amzn-requestid") or uuid.uuid4().hex)


def _error_type(header: str, body: bytes) -> str:
    """``ThrottlingException`` from the header (``Type:uri``) or the body's ``__type``."""
    if header:
        return header.split(":", 1)[0]
    try:
        data = json_decoder.decode(body)
    except msgspec.DecodeError:
        return ""
    raw = data.get("__type") if isinstance(data, dict) else None
    return raw.rsplit("#", 1)[-1] if isinstance(raw, str) else ""


def _message_text(body: bytes) -> str:
    try:
        data = json_decoder.decode(body)
    except msgspec.DecodeError:
        return ""
    text = (data.get("message") or data.get("Message")) if isinstance(data, dict) else None
    return text if isinstance(text, str) else ""

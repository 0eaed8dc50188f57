"""A mock of Amazon Bedrock Runtime's Converse API, as AWS documents it.

``POST /model/{modelId}/converse`` answers JSON; ``POST /model/{modelId}/converse-stream``
answers ``application/vnd.amazon.eventstream`` messages, encoded here with both CRCs (and
written in two pieces each, so clients must reassemble frames). Every request must carry
a valid SigV4 signature for service ``bedrock``: the mock recomputes it with botocore's
``SigV4Auth`` over the request exactly as received (raw path, the headers the client
listed as signed, the body) with its own credentials. Like Bedrock it answers 403 with
``{"message": ...}`` and ``x-amzn-errortype`` when the signature is missing, malformed,
for an unknown key or wrong; and 400 ``ValidationException`` for a body that botocore's
service model or Converse's conversation rules refuse.

Answers are deterministic:

* text: ``Hello from <modelId>: <last user text>``; cut before a stop sequence
  (``stop_sequence``), cut to ``maxTokens`` words (``max_tokens``); a last user text
  containing "guardrail" gets ``guardrail_intervened``;
* with ``toolConfig`` and no tool result in the last turn: a call of the forced tool
  (``toolChoice.tool``) or of the first tool, input ``{"city": "Paris"}``; unforced
  calls come after a short text block, as Claude answers (so the call is content
  block 1); streamed input arrives in three fragments;
* after tool results: ``The tool said: <result text>``;
* usage counts words; ``cache_read_tokens`` adds cache reads (and a write of 3).

Faults: the base kinds (``reset`` and ``malformed`` after ``after_chunks`` stream
messages), plus two of Bedrock's own: ``Fault("exception", status=429, after_chunks=N)``
sends the stream exception for that status (throttlingException ...) after N messages,
and ``Fault("corrupt", after_chunks=N)`` sends a message whose CRC does not match.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import botocore.session
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.validate import ParamValidator

from tests.mocks.base import Fault, MockUpstream, Recorded

ACCESS_KEY_ID = "AKIDMOCKBEDROCK00001"
SECRET_ACCESS_KEY = "mock+Secret/Access/Key0000000000000000000"
REGION = "us-east-1"
SERVICE = "bedrock"
EVENT_STREAM = "application/vnd.amazon.eventstream"
TOOL_INPUT = {"city": "Paris"}
TOOL_FRAGMENTS = ('{"city"', ': "Par', 'is"}')
PREAMBLE = "Let me check."
MAX_SKEW_S = 300

ERROR_TYPE_BY_STATUS = {
    400: "ValidationException", 403: "AccessDeniedException", 404: "ResourceNotFoundException",
    408: "ModelTimeoutException", 424: "ModelErrorException", 429: "ThrottlingException",
    500: "InternalServerException", 503: "ServiceUnavailableException",
}  # fmt: skip
STREAM_EXCEPTION_BY_STATUS = {
    400: "validationException", 429: "throttlingException", 500: "internalServerException",
    502: "modelStreamErrorException", 503: "serviceUnavailableException",
}  # fmt: skip
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/,]+)/(\d{8})/([^/,]+)/([^/,]+)/aws4_request, ?"
    r"SignedHeaders=([a-z0-9;-]+), ?Signature=([0-9a-f]{64})"
)
_UNKNOWN_TOKEN = "The security token included in the request is invalid."
_TOOL_CONFIG_NEEDED = (
    "The toolConfig field must be defined when using toolUse and toolResult content blocks."
)
_SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check "
    "your AWS Secret Access Key and signing method. Consult the service documentation for "
    "details."
)


class BedrockMock(MockUpstream):
    """Bedrock Runtime's Converse routes; point a provider's ``base_url`` at ``.url``.

    It knows one key pair (``access_key_id`` / ``secret_access_key``, and
    ``session_token`` if given, which must then be sent and signed) in ``region``.
    """

    def __init__(
        self,
        *,
        access_key_id: str = ACCESS_KEY_ID,
        secret_access_key: str = SECRET_ACCESS_KEY,
        session_token: str | None = None,
        region: str = REGION,
        cache_read_tokens: int | None = None,
    ) -> None:
        self.credentials = Credentials(access_key_id, secret_access_key, session_token)
        self.region = region
        self.cache_read_tokens = cache_read_tokens
        self.service_model = botocore.session.get_session().get_service_model("bedrock-runtime")
        super().__init__()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/model/{model_id}/converse", self.handler(self.converse))
        app.router.add_post("/model/{model_id}/converse-stream", self.handler(self.converse_stream))

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"message": message}

    async def play_early_fault(self, fault: Fault) -> web.Response | None:
        response = await super().play_early_fault(fault)
        if response is not None:
            error_type = ERROR_TYPE_BY_STATUS.get(fault.status, "InternalServerException")
            response.headers["x-amzn-errortype"] = _errortype_header(error_type)
        return response

    # -- routes -------------------------------------------------------------------

    async def converse(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        refused = self.refusal(request, recorded, "Converse")
        if refused is not None:
            return refused
        fault = self.fault_of(request)
        if fault is not None and fault.kind == "reset":
            await self.reset(request)
            return web.Response()
        if fault is not None and fault.kind == "malformed":
            return web.Response(body=b'{"output": {"message": ', content_type="application/json")
        answer = Answer.to(request.match_info["model_id"], recorded.json())
        body = answer.converse_json(self.cache_read_tokens)
        return web.json_response(body, headers={"x-amzn-RequestId": str(uuid.uuid4())})

    async def converse_stream(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        refused = self.refusal(request, recorded, "ConverseStream")
        if refused is not None:
            return refused
        answer = Answer.to(request.match_info["model_id"], recorded.json())
        headers = {"Content-Type": EVENT_STREAM, "x-amzn-RequestId": str(uuid.uuid4())}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        fault = self.fault_of(request)
        for n, (event_type, payload) in enumerate(answer.stream_events(self.cache_read_tokens)):
            if fault is not None and n == fault.after_chunks:
                if fault.kind == "reset":
                    await self.reset(request)
                    return response
                if fault.kind in ("exception", "corrupt", "malformed"):
                    await _write_in_two(response, _fault_frame(fault, event_type))
                    if fault.kind == "exception":
                        break
                    continue
            await _write_in_two(response, event_frame(event_type, payload))
        await response.write_eof()
        return response

    # -- what Bedrock refuses -----------------------------------------------------

    def refusal(
        self, request: web.Request, recorded: Recorded, operation: str
    ) -> web.Response | None:
        """The 403 or 400 Bedrock would answer, or None for a request it accepts."""
        problem = self.signature_problem(request, recorded)
        if problem is not None:
            return aws_error(403, *problem)
        invalid = self.validation_problem(request.match_info["model_id"], recorded, operation)
        if invalid is not None:
            return aws_error(400, "ValidationException", invalid)
        return None

    def signature_problem(self, request: web.Request, recorded: Recorded) -> tuple[str, str] | None:
        """(error type, message) when the signature is not right, else None."""
        authorization = recorded.headers.get("authorization")
        if not authorization:
            return "MissingAuthenticationTokenException", "Missing Authentication Token"
        match = _AUTHORIZATION.fullmatch(authorization)
        if match is None:
            return "IncompleteSignatureException", "Authorization header is malformed."
        key_id, date, region, service, names, signature = match.groups()
        token = recorded.headers.get("x-amz-security-token")
        if key_id != self.credentials.access_key or token != self.credentials.token:
            return "UnrecognizedClientException", _UNKNOWN_TOKEN
        required = {"host", "x-amz-date"} | ({"x-amz-security-token"} if token else set())
        if not required <= set(names.split(";")):
            return "IncompleteSignatureException", f"Signed headers must include {required}."
        claimed = recorded.headers.get("x-amz-content-sha256")
        if claimed is not None and claimed != hashlib.sha256(recorded.body).hexdigest():
            return "InvalidSignatureException", "x-amz-content-sha256 does not match the body."
        timestamp = recorded.headers.get("x-amz-date", "")
        if (date, region, service) != (timestamp[:8], self.region, SERVICE):
            return "InvalidSignatureException", f"Credential should be scoped to {self.region}."
        if not _fresh(timestamp):
            return "InvalidSignatureException", f"Signature expired: {timestamp} is out of range."
        signed_names = names.split(";")
        expected = botocore_signature(
            request, recorded, signed_names, self.credentials, self.region, timestamp
        )
        if not hmac.compare_digest(expected, signature):
            return "InvalidSignatureException", _SIGNATURE_MISMATCH
        return None

    def validation_problem(self, model_id: str, recorded: Recorded, operation: str) -> str | None:
        """Why Bedrock would refuse the body with a ValidationException, or None."""
        try:
            body = recorded.json()
            params = botocore_params(model_id, body)
        except ValueError as exc:  # JSON, or a blob that is not base64
            return f"The request body is not valid: {exc}"
        shape = self.service_model.operation_model(operation).input_shape
        report = ParamValidator().validate(params, shape)
        if report.has_errors():
            return report.generate_report()
        return conversation_problem(body)


# -- answers --------------------------------------------------------------------------


@dataclass
class Answer:
    """What the mock says to one request, before it is put in JSON or frames."""

    text: str
    tool: str | None
    stop_reason: str
    input_tokens: int

    @classmethod
    def to(cls, model_id: str, body: dict[str, Any]) -> Answer:
        last = body["messages"][-1]["content"]
        results = [block["toolResult"] for block in last if "toolResult" in block]
        words = sum(len(text.split()) for text in _all_texts(body))
        tool_config = body.get("toolConfig")
        if tool_config and not results:
            forced = tool_config.get("toolChoice", {}).get("tool", {}).get("name")
            name = forced or tool_config["tools"][0]["toolSpec"]["name"]
            text = "" if "tool" in tool_config.get("toolChoice", {}) else PREAMBLE
            return cls(text, name, "tool_use", words)
        if results:
            said = [item.get("text") or json.dumps(item.get("json")) for result in results
                    for item in result["content"]]  # fmt: skip
            return cls("The tool said: " + " ".join(said), None, "end_turn", words)
        user_text = " ".join(block["text"] for block in last if "text" in block)
        if "guardrail" in user_text:
            return cls("Sorry, I can't help with that.", None, "guardrail_intervened", words)
        text, reason = _limited(f"Hello from {model_id}: {user_text}", body)
        return cls(text, None, reason, words)

    def usage(self, cache_read_tokens: int | None) -> dict[str, int]:
        output = len(self.text.split()) + (5 if self.tool else 0)
        usage = {"inputTokens": self.input_tokens, "outputTokens": output,
                 "totalTokens": self.input_tokens + output}  # fmt: skip
        if cache_read_tokens is not None:
            usage.update(cacheReadInputTokens=cache_read_tokens, cacheWriteInputTokens=3)
            usage["totalTokens"] += cache_read_tokens + 3
        return usage

    def converse_json(self, cache_read_tokens: int | None) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"text": self.text}] if self.text else []
        if self.tool:
            use = {"toolUseId": "tooluse_mock1", "name": self.tool, "input": TOOL_INPUT}
            content.append({"toolUse": use})
        return {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": self.stop_reason,
            "usage": self.usage(cache_read_tokens),
            "metrics": {"latencyMs": 42},
        }

    def stream_events(self, cache_read_tokens: int | None) -> list[tuple[str, dict[str, Any]]]:
        """ConverseStream's events, in order, with Bedrock's ``p`` padding field."""
        events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
        block = 0
        if self.text:
            words = self.text.split(" ")
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                events.append(("contentBlockDelta", {"contentBlockIndex": 0,
                                                     "delta": {"text": piece}}))  # fmt: skip
            events.append(("contentBlockStop", {"contentBlockIndex": 0}))
            block = 1
        if self.tool:
            start = {"toolUse": {"toolUseId": "tooluse_mock1", "name": self.tool}}
            events.append(("contentBlockStart", {"contentBlockIndex": block, "start": start}))
            for fragment in TOOL_FRAGMENTS:
                delta = {"toolUse": {"input": fragment}}
                events.append(("contentBlockDelta", {"contentBlockIndex": block, "delta": delta}))
            events.append(("contentBlockStop", {"contentBlockIndex": block}))
        events.append(("messageStop", {"stopReason": self.stop_reason}))
        metadata = {"usage": self.usage(cache_read_tokens), "metrics": {"latencyMs": 42}}
        events.append(("metadata", metadata))
        return [(name, {**payload, "p": "abcdefgh"[: 1 + n % 8]})
                for n, (name, payload) in enumerate(events)]  # fmt: skip


def _limited(text: str, body: dict[str, Any]) -> tuple[str, str]:
    config = body.get("inferenceConfig", {})
    for stop in config.get("stopSequences", []):
        if stop in text:
            return text[: text.index(stop)], "stop_sequence"
    words = text.split(" ")
    limit = config.get("maxTokens")
    if limit is not None and len(words) > limit:
        return " ".join(words[:limit]), "max_tokens"
    return text, "end_turn"


def _all_texts(body: dict[str, Any]) -> list[str]:
    texts = [block["text"] for block in body.get("system", []) if "text" in block]
    for message in body["messages"]:
        texts += [block["text"] for block in message["content"] if "text" in block]
    return texts


# -- validation -----------------------------------------------------------------------


def botocore_params(model_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The body as boto3 call parameters: ``modelId`` added, blobs back to bytes."""
    params = copy.deepcopy(body)
    params["modelId"] = model_id
    for message in params.get("messages", []):
        for block in message.get("content", []):
            source = block.get("image", {}).get("source", {})
            if "bytes" in source:
                source["bytes"] = base64.b64decode(source["bytes"], validate=True)
    return params


def conversation_problem(body: dict[str, Any]) -> str | None:
    """The rules Converse enforces beyond the shapes: roles alternate, user first, and
    tool blocks need a toolConfig."""
    roles = [message["role"] for message in body["messages"]]
    if not roles or roles[0] != "user":
        return "A conversation must start with a user message."
    if any(a == b for a, b in zip(roles, roles[1:], strict=False)):
        return "A conversation must alternate between user and assistant roles."
    blocks = [block for message in body["messages"] for block in message["content"]]
    if "toolConfig" not in body and any("toolUse" in b or "toolResult" in b for b in blocks):
        return _TOOL_CONFIG_NEEDED
    return None


# -- signatures -----------------------------------------------------------------------


def botocore_signature(
    request: web.Request,
    recorded: Recorded,
    signed_names: list[str],
    credentials: Credentials,
    region: str,
    timestamp: str,
) -> str:
    """The signature botocore's SigV4Auth computes for the request as received."""
    headers = {name: recorded.headers.get(name, "") for name in signed_names}
    url = f"http://{recorded.headers.get('host', '')}{request.raw_path}"
    aws_request = AWSRequest(method=request.method, url=url, headers=headers, data=recorded.body)
    aws_request.context["timestamp"] = timestamp
    signer = SigV4Auth(credentials, SERVICE, region)
    canonical = signer.canonical_request(aws_request)
    return str(signer.signature(signer.string_to_sign(aws_request, canonical), aws_request))


def _fresh(timestamp: str) -> bool:
    try:
        when = datetime.strptime(timestamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return False
    return abs(when.timestamp() - time.time()) <= MAX_SKEW_S


# -- wire helpers ---------------------------------------------------------------------


def aws_error(status: int, error_type: str, message: str) -> web.Response:
    """Bedrock's rest-json error: the message in the body, the type in a header."""
    headers = {"x-amzn-errortype": _errortype_header(error_type),
               "x-amzn-RequestId": str(uuid.uuid4())}  # fmt: skip
    return web.json_response({"message": message}, status=status, headers=headers)


def _errortype_header(error_type: str) -> str:
    return f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: string headers only, both CRCs (see llmkit's eventstream)."""
    header_bytes = b"".join(
        bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value.encode()))
        + value.encode()
        for name, value in headers.items()
    )  # fmt: skip
    total = 12 + len(header_bytes) + len(payload) + 4
    prelude = struct.pack(">II", total, len(header_bytes))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + header_bytes + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event_frame(event_type: str, payload: dict[str, Any] | bytes) -> bytes:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {":event-type": event_type, ":content-type": "application/json",
               ":message-type": "event"}  # fmt: skip
    return encode_message(headers, data)


def exception_frame(exception_type: str, message: str) -> bytes:
    headers = {":exception-type": exception_type, ":content-type": "application/json",
               ":message-type": "exception"}  # fmt: skip
    return encode_message(headers, json.dumps({"message": message}).encode())


def _fault_frame(fault: Fault, event_type: str) -> bytes:
    if fault.kind == "exception":
        exception_type = STREAM_EXCEPTION_BY_STATUS.get(fault.status, "internalServerException")
        return exception_frame(exception_type, f"mock upstream says {fault.status}")
    if fault.kind == "malformed":
        return event_frame(event_type, b"{not json")
    frame = bytearray(event_frame(event_type, {"contentBlockIndex": 0, "delta": {"text": "x"}}))
    frame[-6] ^= 0xFF  # a payload byte: the message CRC no longer matches
    return bytes(frame)


async def _write_in_two(response: web.StreamResponse, frame: bytes) -> None:
    await response.write(frame[:7])
    await response.write(frame[7:])

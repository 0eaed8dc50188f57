"""A mock of Anthropic's Messages API, speaking the wire as Anthropic documents it.

``POST /v1/messages`` (the SDK's path: point ``anthropic.Anthropic(base_url=mock.url)``
at it, and a ``Provider`` at ``mock.url + "/v1"``). It checks the key (``x-api-key``, or
``Authorization: Bearer`` as the v2 SDK sends it; 401 ``authentication_error`` when
wrong or missing), ``anthropic-version`` (required; from 2026-10-21 on, sampling
parameters are refused) and the required body fields (400 ``invalid_request_error``),
and answers deterministically:

- with ``tools`` and a ``tool_choice`` other than ``none``: ``tool_use`` of the named
  tool, or of the first ``parallel_calls`` tools (one if ``disable_parallel_tool_use``),
  each with input ``tool_input`` (``TOOL_INPUT`` unless a test changes it); ``auto``
  adds the text ``TOOL_PREFACE`` before them, as Claude does, forced choices do not;
- a last user text containing ``REFUSE_TRIGGER``: stop reason ``refusal``;
- otherwise ``ANSWER``, one output token per word: cut at the first stop sequence it
  contains (``stop_sequence``) or at ``max_tokens`` words (``max_tokens``).

Usage reports ``cache_read_tokens`` / ``cache_creation_tokens`` when set; ``thinking``
puts a thinking block (with its signature) before the answer, as extended thinking does. Streams are
SSE with named events, a ``ping`` after ``message_start``, one ``text_delta`` per word
and the tool input in ``INPUT_FRAGMENT`` -character ``input_json_delta`` pieces.

Faults: every base kind (``reset`` and ``malformed`` count SSE events as chunks; a
malformed stream sends a ``content_block_delta`` whose data is not JSON), plus
``Fault("error_event", status=529)``: the stream sends ``message_start`` then an
``error`` event of the type Anthropic uses for that status, and ends; and
``Fault("truncate", after_chunks=N)``: the stream ends cleanly after N events, without
``message_stop``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.mocks.base import Fault, MockUpstream, Recorded

ANSWER = "Hello from the mock Anthropic upstream."
TOOL_INPUT = {"city": "Paris"}
TOOL_PREFACE = "Let me check."
REFUSAL = "I can't help with that."
REFUSE_TRIGGER = "REFUSE"
INPUT_FRAGMENT = 5
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
SAMPLING_REMOVED = "2026-10-21"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


@dataclass
class Answer:
    content: list[dict[str, Any]]
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int


@dataclass
class AnthropicMock(MockUpstream):
    api_key: str = "test-key"
    parallel_calls: int = 1
    tool_input: dict[str, Any] = field(default_factory=lambda: dict(TOOL_INPUT))
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    thinking: str | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.handler(self.messages))

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        error = {"type": ERROR_TYPES.get(status, "api_error"), "message": message}
        return {"type": "error", "error": error, "request_id": "req_mock"}

    def error(self, status: int, message: str) -> web.Response:
        return web.json_response(
            self.error_body(status, message), status=status, headers={"request-id": "req_mock"}
        )

    # -- the route ----------------------------------------------------------------

    async def messages(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        if not self.authorized(recorded.headers):
            return self.error(401, "invalid x-api-key")
        version = recorded.headers.get("anthropic-version")
        if not version:
            return self.error(400, "anthropic-version: header is required")
        try:
            body = recorded.json()
        except ValueError:
            return self.error(400, "request body is not valid JSON")
        problem = _problem(body) or _version_problem(body, version)
        if problem:
            return self.error(400, problem)
        fault = self.fault_of(request)
        if fault is not None and fault.kind == "error_event" and not body.get("stream"):
            return self.error(fault.status, f"mock upstream says {fault.status}")
        message = self.message(body, len(self.requests))
        if body.get("stream"):
            return await self.stream(request, message)
        if fault is not None and fault.kind == "reset":
            await self.reset(request)
            return web.Response()
        if fault is not None and fault.kind == "malformed":
            return web.Response(body=b'{"id": "msg_', content_type="application/json")
        return web.json_response(message, headers={"request-id": "req_mock"})

    def authorized(self, headers: dict[str, str]) -> bool:
        """API keys go in ``x-api-key`` (the documented header) or, as the v2 SDK sends
        them, ``Authorization: Bearer``."""
        authorization = headers.get("authorization", "")
        bearer = authorization[7:] if authorization.startswith("Bearer ") else None
        return self.api_key in (headers.get("x-api-key"), bearer)

    # -- answers ------------------------------------------------------------------

    def message(self, body: dict[str, Any], number: int) -> dict[str, Any]:
        answer = _answer(body, self.parallel_calls, self.tool_input)
        if self.thinking is not None:
            thought = {"type": "thinking", "thinking": self.thinking, "signature": "sig-mock"}
            answer.content.insert(0, thought)
        usage: dict[str, Any] = {
            "input_tokens": max(1, len(json.dumps(body["messages"])) // 4),
            "output_tokens": answer.output_tokens,
        }
        if self.cache_creation_tokens is not None:
            usage["cache_creation_input_tokens"] = self.cache_creation_tokens
        if self.cache_read_tokens is not None:
            usage["cache_read_input_tokens"] = self.cache_read_tokens
        return {
            "id": f"msg_mock{number:04d}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": answer.content,
            "stop_reason": answer.stop_reason,
            "stop_sequence": answer.stop_sequence,
            "usage": usage,
        }

    async def stream(self, request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "request-id": "req_mock",
            }
        )
        await response.prepare(request)
        fault = self.fault_of(request)
        events = _events(message, fault)
        if fault is not None and fault.kind in ("reset", "truncate"):
            events = events[: fault.after_chunks]
        for name, data in events:
            await response.write(f"event: {name}\ndata: {data}\n\n".encode())
        if fault is not None and fault.kind == "reset":
            await self.reset(request)
            return response
        await response.write_eof()
        return response


def _problem(body: Any) -> str | None:
    """What Anthropic would refuse with 400 in a body, or None."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for name, kind in (("model", str), ("max_tokens", int), ("messages", list)):
        if not isinstance(body.get(name), kind):
            return f"{name}: Field required"
    if not body["messages"]:
        return "messages: at least one message is required"
    if any(m.get("role") not in ("user", "assistant") for m in body["messages"]):
        return "messages: roles must be user or assistant"
    choice = body.get("tool_choice")
    tools = body.get("tools", [])
    if any(not tool.get("name") or "input_schema" not in tool for tool in tools):
        return "tools: each tool needs name and input_schema"
    names = {tool["name"] for tool in tools}
    if choice is not None and not names:
        return "tool_choice may only be specified while providing tools"
    if choice is not None and choice["type"] == "tool" and choice["name"] not in names:
        return f"Tool '{choice['name']}' not found in provided tools"
    return None


def _version_problem(body: dict[str, Any], version: str) -> str | None:
    """From API version 2026-10-21 on, Anthropic refuses every sampling parameter."""
    sampling = [name for name in SAMPLING_FIELDS if name in body]
    if version >= SAMPLING_REMOVED and sampling:
        return f"{sampling[0]}: not supported from anthropic-version {SAMPLING_REMOVED}"
    return None


def _answer(body: dict[str, Any], parallel_calls: int, tool_input: dict[str, Any]) -> Answer:
    tools = body.get("tools", [])
    choice = body.get("tool_choice") or {"type": "auto"}
    if tools and choice["type"] != "none":
        return _tool_answer(tools, choice, parallel_calls, tool_input)
    if REFUSE_TRIGGER in _last_user_text(body["messages"]):
        return Answer([{"type": "text", "text": REFUSAL}], "refusal", None, 5)
    words = [w if i == 0 else " " + w for i, w in enumerate(ANSWER.split(" "))]
    for stop in body.get("stop_sequences", []):
        text = "".join(words)
        if stop in text:
            cut = text[: text.index(stop)]
            return Answer([{"type": "text", "text": cut}], "stop_sequence", stop, len(words))
    if body["max_tokens"] < len(words):
        words = words[: body["max_tokens"]]
        return Answer([{"type": "text", "text": "".join(words)}], "max_tokens", None, len(words))
    return Answer([{"type": "text", "text": "".join(words)}], "end_turn", None, len(words))


def _tool_answer(
    tools: list[dict[str, Any]], choice: dict[str, Any], parallel: int, tool_input: dict[str, Any]
) -> Answer:
    if choice["type"] == "tool":
        called = [choice["name"]]
    else:
        count = 1 if choice.get("disable_parallel_tool_use") else parallel
        called = [tool["name"] for tool in tools[:count]]
    content: list[dict[str, Any]] = []
    if choice["type"] == "auto":
        content.append({"type": "text", "text": TOOL_PREFACE})
    for i, name in enumerate(called):
        content.append(
            {"type": "tool_use", "id": f"toolu_mock{i}", "name": name, "input": tool_input}
        )
    return Answer(content, "tool_use", None, 10 * len(called))


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    content = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block.get("type") == "text")


def _events(message: dict[str, Any], fault: Fault | None) -> list[tuple[str, str]]:
    """The SSE events of ``message`` as Anthropic streams it: (event name, data JSON)."""
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**message["usage"], "output_tokens": 1}
    events: list[tuple[str, Any]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
    ]
    if fault is not None and fault.kind == "error_event":
        kind = ERROR_TYPES.get(fault.status, "api_error")
        error = {"type": kind, "message": f"mock upstream says {kind}"}
        return _encoded([*events, ("error", {"type": "error", "error": error})])
    for index, block in enumerate(message["content"]):
        events.extend(_block_events(index, block))
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    usage = {"output_tokens": message["usage"]["output_tokens"]}
    events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    events.append(("message_stop", {"type": "message_stop"}))
    encoded = _encoded(events)
    if fault is not None and fault.kind == "malformed":
        at = next(i for i, (name, _) in enumerate(encoded) if name == "content_block_delta")
        encoded[at] = ("content_block_delta", '{"type": "content_block_delta", "index": ')
    return encoded


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, Any]]:
    if block["type"] == "text":
        opening: dict[str, Any] = {"type": "text", "text": ""}
        words = block["text"].split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        deltas = [{"type": "text_delta", "text": piece} for piece in pieces]
    elif block["type"] == "thinking":
        opening = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [
            {"type": "thinking_delta", "thinking": block["thinking"]},
            {"type": "signature_delta", "signature": block["signature"]},
        ]
    else:
        opening = {**block, "input": {}}
        # A tool without input streams one empty fragment, as Anthropic does.
        text = json.dumps(block["input"]) if block["input"] else ""
        fragments = [text[i : i + INPUT_FRAGMENT] for i in range(0, len(text), INPUT_FRAGMENT)]
        deltas = [{"type": "input_json_delta", "partial_json": f} for f in ["", *fragments]]
    start = {"type": "content_block_start", "index": index, "content_block": opening}
    events: list[tuple[str, Any]] = [("content_block_start", start)]
    for delta in deltas:
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        )
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def _encoded(events: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    return [(name, json.dumps(data)) for name, data in events]

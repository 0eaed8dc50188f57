"""A mock of Cohere's v2 API (``/v2/chat``, ``/v2/embed``), as Cohere documents it.

Answers are deterministic. Chat replies ``Hello from <model>: <last user text>``; after a
tool result it replies ``The tool said: <result>``; with ``tools`` (and ``tool_choice``
not ``NONE``) it writes a tool plan and calls the first tool with ``{"city": "Paris"}``;
in JSON mode the text is ``{"city": "Paris"}`` (or, given ``json_schema``, an object
with a sample value for each property). ``max_tokens`` cuts the reply to that many words
(``MAX_TOKENS``); a stop sequence found in the reply cuts before it (``STOP_SEQUENCE``).
``finish_reason`` forces the next answers' reason (``ERROR`` adds ``delta.error`` in
streams). Usage counts words; ``cached_tokens`` is reported as set. ``end_after`` ends
streams cleanly after that many events, before ``message-end``; ``send_done`` False
leaves out the ``[DONE]`` line.

Streams are ``text/event-stream``: each event is ``event: <type>`` plus ``data: <json>``
whose ``type`` repeats the name, and the stream ends with ``data: [DONE]`` — the
terminator Cohere's API definition declares and its SDK stops at. Errors are
``{"id": ..., "message": ...}``; a wrong or missing bearer key is a 401.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from tests.mocks.base import MockUpstream, Recorded

TOOL_ARGUMENTS = '{"city": "Paris"}'
ARGUMENT_PIECES = ('{"city"', ': "Par', 'is"}')
ERROR_TEXT = "mock generation failed"
SAMPLES: dict[str, Any] = {"string": "Paris", "integer": 1, "number": 1.5, "boolean": True}


class CohereMock(MockUpstream):
    """``POST /v2/chat`` (JSON or SSE) and ``POST /v2/embed``.

    ``key``: the bearer token it insists on; None accepts any.
    """

    def __init__(self, key: str | None = "test-key") -> None:
        self.key = key
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self.end_after: int | None = None
        self.send_done = True
        self._served = 0
        super().__init__()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v2/chat", self.handler(self.chat))
        app.router.add_post("/v2/embed", self.handler(self.embed))

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"id": str(uuid.uuid4()), "message": message}

    # -- checks Cohere makes before answering ---------------------------------------

    def _refusal(self, request: web.Request, recorded: Recorded) -> web.Response | None:
        if self.key is not None and request.headers.get("Authorization") != f"Bearer {self.key}":
            return self._error(401, "invalid api token")
        if not request.content_type.startswith("application/json"):
            return self._error(400, "invalid request: content-type must be application/json")
        try:
            body = recorded.json()
        except ValueError:
            return self._error(400, "invalid request: body is not valid JSON")
        problem = _chat_problem(body) if request.path.endswith("/chat") else _embed_problem(body)
        return self._error(400, f"invalid request: {problem}") if problem else None

    def _error(self, status: int, message: str) -> web.Response:
        return web.json_response(self.error_body(status, message), status=status)

    # -- routes ---------------------------------------------------------------------

    async def chat(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        refusal = self._refusal(request, recorded)
        if refusal is not None:
            return refusal
        body = recorded.json()
        answer = self._answer(body)
        if body.get("stream"):
            return await self._stream(request, answer)
        fault = self.fault_of(request)
        if fault is not None and fault.kind == "malformed":
            return web.Response(body=b'{"id": "x", "message": {', content_type="application/json")
        if fault is not None and fault.kind == "reset":
            return await self._reset_midway(request, json.dumps(response_body(answer)).encode())
        return web.json_response(response_body(answer))

    async def _stream(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        fault = self.fault_of(request)
        events = stream_events(answer)[: self.end_after]
        for n, event in enumerate(events):
            if fault is not None and n == fault.after_chunks and fault.kind == "reset":
                await self.reset(request)
                return response
            if fault is not None and n == fault.after_chunks and fault.kind == "malformed":
                await response.write(b"event: content-delta\ndata: {not json\n\n")
                continue
            frame = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
            await response.write(frame.encode())
        if self.send_done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _reset_midway(self, request: web.Request, payload: bytes) -> web.StreamResponse:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(payload))}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        await self.reset(request)
        return response

    async def embed(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        refusal = self._refusal(request, recorded)
        if refusal is not None:
            return refusal
        fault = self.fault_of(request)
        if fault is not None and fault.kind == "malformed":
            return web.Response(body=b'{"embeddings": {"float": [', content_type="application/json")
        body = recorded.json()
        texts: list[str] = body["texts"]
        dims = body.get("output_dimension", 4)
        vectors = [
            [round(0.1 * (i + 1) * (d + 1), 3) for d in range(dims)] for i in range(len(texts))
        ]
        tokens = sum(len(t.split()) for t in texts)
        return web.json_response({
            "id": self._next_id(), "response_type": "embeddings_by_type",
            "embeddings": {"float": vectors}, "texts": texts,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}},
        })  # fmt: skip

    # -- answers --------------------------------------------------------------------

    def _next_id(self) -> str:
        self._served += 1
        return str(uuid.UUID(int=self._served))

    def _answer(self, body: dict[str, Any]) -> Answer:
        model = body["model"]
        messages = body["messages"]
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages)
        answer = Answer(self._next_id(), prompt_tokens, self.cached_tokens)
        tools = body.get("tools") or []
        if tools and body.get("tool_choice") != "NONE" and messages[-1]["role"] != "tool":
            name = tools[0]["function"]["name"]
            answer.call_tool(name, f"I will call {name} to answer.")
        elif messages[-1]["role"] == "tool":
            answer.reply(f"The tool said: {_text(messages[-1].get('content'))}", body)
        elif "response_format" in body:
            answer.reply(_json_answer(body["response_format"].get("json_schema")), body)
        else:
            answer.reply(f"Hello from {model}: {_last_user_text(messages)}", body)
        if self.finish_reason:
            answer.finish_reason = self.finish_reason
        return answer


class Answer:
    """One generated reply: text or one tool call, its finish reason and token counts."""

    def __init__(self, id: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.id = id
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.words: list[str] = []
        self.tool_plan = ""
        self.tool_call: dict[str, Any] | None = None
        self.finish_reason = "COMPLETE"

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def reply(self, text: str, body: dict[str, Any]) -> None:
        for stop in body.get("stop_sequences") or []:
            if stop and stop in text:
                text, self.finish_reason = text[: text.index(stop)].rstrip(), "STOP_SEQUENCE"
        self.words = text.split(" ")
        limit = body.get("max_tokens")
        if limit is not None and len(self.words) > limit:
            self.words, self.finish_reason = self.words[:limit], "MAX_TOKENS"

    def call_tool(self, name: str, plan: str) -> None:
        self.tool_plan = plan
        self.tool_call = {"id": f"{name}_mock0", "type": "function",
                          "function": {"name": name, "arguments": TOOL_ARGUMENTS}}  # fmt: skip
        self.finish_reason = "TOOL_CALL"

    def usage(self) -> dict[str, Any]:
        output = len(self.words) + (len(self.tool_plan.split()) + 4 if self.tool_call else 0)
        counts = {"input_tokens": self.prompt_tokens, "output_tokens": output}
        return {"billed_units": counts, "tokens": counts, "cached_tokens": self.cached_tokens}


def response_body(answer: Answer) -> dict[str, Any]:
    """The ``/v2/chat`` JSON answer."""
    message: dict[str, Any] = {"role": "assistant"}
    if answer.tool_call is not None:
        message.update(tool_plan=answer.tool_plan, tool_calls=[answer.tool_call])
    else:
        message["content"] = [{"type": "text", "text": answer.text}]
    return {"id": answer.id, "finish_reason": answer.finish_reason, "message": message,
            "usage": answer.usage()}  # fmt: skip


def stream_events(answer: Answer) -> list[dict[str, Any]]:
    """The events Cohere streams for ``answer``, in order."""
    start = {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}
    events: list[dict[str, Any]] = [
        {"id": answer.id, "type": "message-start", "delta": {"message": start}}
    ]
    if answer.tool_call is not None:
        events += _tool_call_events(answer)
    else:
        events += _text_events(answer)
    end: dict[str, Any] = {"finish_reason": answer.finish_reason, "usage": answer.usage()}
    if answer.finish_reason == "ERROR":
        end["error"] = ERROR_TEXT
    events.append({"type": "message-end", "delta": end})
    return events


def _text_events(answer: Answer) -> list[dict[str, Any]]:
    def content(text: str) -> dict[str, Any]:
        return {"message": {"content": {"text": text}}}

    events: list[dict[str, Any]] = [{"type": "content-start", "index": 0, "delta": {
        "message": {"content": {"type": "text", "text": ""}}}}]  # fmt: skip
    for i, word in enumerate(answer.words):
        piece = word if i == 0 else " " + word
        events.append({"type": "content-delta", "index": 0, "delta": content(piece)})
    events.append({"type": "content-end", "index": 0})
    return events


def _tool_call_events(answer: Answer) -> list[dict[str, Any]]:
    assert answer.tool_call is not None
    words = answer.tool_plan.split(" ")
    events: list[dict[str, Any]] = [
        {"type": "tool-plan-delta", "delta": {"message": {"tool_plan": w if i == 0 else " " + w}}}
        for i, w in enumerate(words)
    ]
    call = answer.tool_call
    first = {"id": call["id"], "type": "function",
             "function": {"name": call["function"]["name"], "arguments": ""}}  # fmt: skip
    events.append(
        {"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": first}}}
    )
    for piece in ARGUMENT_PIECES:
        delta = {"message": {"tool_calls": {"function": {"arguments": piece}}}}
        events.append({"type": "tool-call-delta", "index": 0, "delta": delta})
    events.append({"type": "tool-call-end", "index": 0})
    return events


# -- request checks and helpers ------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")


def _chat_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "model must be a string"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{i}]: role must be one of {', '.join(ROLES)}"
        if message["role"] == "tool" and not message.get("tool_call_id"):
            return f"messages[{i}]: tool messages need tool_call_id"
    if body.get("tool_choice") is not None and not body.get("tools"):
        return "tool_choice requires tools"
    if body.get("tool_choice") not in (None, "REQUIRED", "NONE"):
        return "tool_choice must be REQUIRED or NONE"
    if "response_format" in body and body.get("tools"):
        return "response_format is not supported with tools"
    p = body.get("p")
    if p is not None and not 0.01 <= p <= 0.99:
        return "p must be between 0.01 and 0.99"
    return None


def _embed_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "model must be a string"
    if not isinstance(body.get("texts"), list) or not body["texts"]:
        return "texts must be a non-empty list"
    if not body.get("input_type"):
        return "input_type is required"
    return None


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    last: dict[str, Any] = next((m for m in reversed(messages) if m["role"] == "user"), {})
    return _text(last.get("content"))


def _json_answer(schema: dict[str, Any] | None) -> str:
    if not schema:
        return TOOL_ARGUMENTS
    properties = schema.get("properties", {})
    return json.dumps({k: SAMPLES.get(v.get("type"), None) for k, v in properties.items()})

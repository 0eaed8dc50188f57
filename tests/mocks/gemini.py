"""A mock of Google's Gemini API (Generative Language, v1beta) on 127.0.0.1.

Routes, under ``{url}/v1beta`` (point a Provider's ``base_url`` there, or the
google-genai SDK at ``url`` with ``api_version="v1beta"``):

- ``POST /v1beta/models/{model}:generateContent``
- ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` — each ``data:`` event
  is a whole ``GenerateContentResponse`` with the new parts; the last one carries
  ``finishReason`` and ``usageMetadata``; the stream then just ends, as Gemini's does
- ``POST /v1beta/models/{model}:batchEmbedContents``

The key travels in ``x-goog-api-key``. As Gemini does, a wrong key is answered 400
``INVALID_ARGUMENT`` with an ``ErrorInfo`` detail of reason ``API_KEY_INVALID``; a
missing key is answered 401 ``UNAUTHENTICATED``. Errors use Google's body:
``{"error": {"code", "message", "status", "details"}}``; a 429 carries a ``RetryInfo``
detail (``retryDelay`` "7s").

Answers are deterministic. With function declarations (and a mode other than NONE) the
model calls the first allowed function with ``{"city": "Paris"}``, unless the last turn
holds function responses, which it reports back as text. Otherwise it answers
``Echo: <last user text>`` (``{"echo": ...}`` in JSON mode), one candidate per
``candidateCount``, cut at ``stopSequences`` and at ``maxOutputTokens`` words (then
MAX_TOKENS). Tokens are words. Markers in the last user text steer it:

==========================  =====================================================
``__blocked__``             prompt blocked: ``promptFeedback.blockReason`` SAFETY
``__finish:REASON__``       that finishReason (safety reasons come with no content)
``__think__``               a thought part first, and ``thoughtsTokenCount`` 3
``__cached__``              ``cachedContentTokenCount`` 2
``__nofinish__``            a stream that ends without any finishReason
``__stream_error__``        a stream whose second event is an error (503 UNAVAILABLE)
==========================  =====================================================
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.mocks.base import MockUpstream, Recorded

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
FILTER_REASONS = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
TOOL_ARGS = {"city": "Paris"}
THOUGHT = "Thinking it over."


@dataclass
class GeminiMock(MockUpstream):
    """The mock; ``api_key`` is the key it accepts."""

    api_key: str = "test-key"

    @property
    def base_url(self) -> str:
        """What a Provider's ``base_url`` should be."""
        return f"{self.url}/v1beta"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{call}", self.handler(self.answer))

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": STATUS_NAMES.get(status, "UNKNOWN"),
        }
        if status == 429:
            error["details"] = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
            ]
        return {"error": error}

    def error(self, status: int, message: str) -> web.Response:
        return web.json_response(self.error_body(status, message), status=status)

    # -- routing ----------------------------------------------------------------------

    async def answer(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        refused = self.check_key(recorded)
        if refused is not None:
            return refused
        try:
            body = recorded.json()
        except ValueError:
            return self.error(400, "Invalid JSON payload received.")
        if method == "batchEmbedContents":
            return await self.embed(request, model, body)
        if method not in ("generateContent", "streamGenerateContent"):
            return self.error(404, f"Method {method} is not found for models/{model}.")
        problem = check_contents(body)
        if problem:
            return self.error(400, problem)
        reply = Reply.for_request(body)
        if method == "generateContent":
            return await self.complete(request, reply)
        if request.query.get("alt") != "sse":
            return self.error(400, "this mock streams only with alt=sse")
        return await self.stream(request, reply)

    def check_key(self, recorded: Recorded) -> web.Response | None:
        key = recorded.headers.get("x-goog-api-key")
        if not key:
            return self.error(
                401, "Request is missing required authentication credential. Expected API key."
            )
        if key == self.api_key:
            return None
        body = self.error_body(400, "API key not valid. Please pass a valid API key.")
        body["error"]["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
        return web.json_response(body, status=400)

    # -- answers ----------------------------------------------------------------------

    async def complete(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        fault = self.fault_of(request)
        payload = json.dumps(reply.response()).encode()
        if fault is not None and fault.kind == "malformed":
            return web.Response(body=b'{"candidates": [', content_type="application/json")
        if fault is not None and fault.kind == "reset":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            await self.reset(request)
            return response
        return web.Response(body=payload, content_type="application/json")

    async def stream(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        fault = self.fault_of(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n, event in enumerate(reply.events()):
            if fault is not None and n == fault.after_chunks:
                if fault.kind == "reset":
                    await self.reset(request)
                    return response
                if fault.kind == "malformed":
                    await response.write(b'data: {"candidates": [\r\n\r\n')
                    break
            await response.write(b"data: " + json.dumps(event).encode() + b"\r\n\r\n")
        await response.write_eof()
        return response

    async def embed(self, request: web.Request, model: str, body: Any) -> web.StreamResponse:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return self.error(400, "* BatchEmbedContentsRequest.requests: must not be empty")
        embeddings, words = [], 0
        for item in requests:
            if item.get("model") != f"models/{model}":
                return self.error(400, "Model names in requests must match the URL's model.")
            text = " ".join(p.get("text", "") for p in item.get("content", {}).get("parts", []))
            words += len(text.split())
            size = item.get("outputDimensionality") or 8
            embeddings.append({"values": vector(text, size)})
        if (fault := self.fault_of(request)) is not None and fault.kind == "malformed":
            return web.Response(body=b'{"embeddings": [', content_type="application/json")
        answer = {"embeddings": embeddings, "usageMetadata": {"promptTokenCount": words}}
        return web.json_response(answer)


def check_contents(body: Any) -> str | None:
    """Gemini's own complaints about a malformed ``contents``, or None."""
    contents = body.get("contents") if isinstance(body, dict) else None
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for n, turn in enumerate(contents):
        if turn.get("role") not in ("user", "model"):
            return f"* GenerateContentRequest.contents[{n}].role: must be user or model"
        if not turn.get("parts"):
            return f"* GenerateContentRequest.contents[{n}].parts: contents.parts must not be empty"
    return None


def vector(text: str, size: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(digest[i % len(digest)] / 127.5 - 1, 4) for i in range(size)]


def words(text: str) -> int:
    return len(text.split())


@dataclass
class Reply:
    """What the mock model says to one request."""

    texts: list[str]  # one per candidate
    call: dict[str, Any] | None  # a functionCall, for every candidate
    finish: str
    blocked: bool
    prompt_tokens: int
    thought: bool
    cached: bool
    no_finish: bool
    stream_error: bool

    @classmethod
    def for_request(cls, body: dict[str, Any]) -> Reply:
        contents = body["contents"]
        last = contents[-1]
        last_text = " ".join(p["text"] for p in last["parts"] if "text" in p)
        config = body.get("generationConfig", {})
        forced = re.search(r"__finish:([A-Z_]+)__", last_text)
        finish = forced.group(1) if forced else "STOP"
        call = function_call(body, last)
        text = "" if call else answer_text(last, last_text, config)
        texts = [
            text + (f" ({n})" if n and text else "") for n in range(config.get("candidateCount", 1))
        ]
        texts, limited = zip(*(limit(t, config) for t in texts), strict=True)
        if any(limited) and not forced:
            finish = "MAX_TOKENS"
        everything = [body.get("systemInstruction", {}), *contents]
        prompt = " ".join(p.get("text", "") for turn in everything for p in turn.get("parts", []))
        return cls(
            texts=list(texts), call=call, finish=finish, blocked="__blocked__" in last_text,
            prompt_tokens=words(prompt), thought="__think__" in last_text,
            cached="__cached__" in last_text, no_finish="__nofinish__" in last_text,
            stream_error="__stream_error__" in last_text,
        )  # fmt: skip

    # -- whole answers ----------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        """The ``generateContent`` answer."""
        if self.blocked:
            return self.blocked_response()
        candidates = [
            self.candidate(n, self.parts(text, True), True) for n, text in enumerate(self.texts)
        ]
        return {"candidates": candidates, "usageMetadata": self.usage(), "modelVersion": "mock"}

    def blocked_response(self) -> dict[str, Any]:
        return {
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {
                "promptTokenCount": self.prompt_tokens,
                "totalTokenCount": self.prompt_tokens,
            },
            "modelVersion": "mock",
        }

    def parts(self, text: str, with_thought: bool) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        if self.thought and with_thought:
            parts.append({"text": THOUGHT, "thought": True})
        if text:
            parts.append({"text": text})
        if self.call:
            parts.append({"functionCall": self.call})
        return parts

    def candidate(self, index: int, parts: list[dict[str, Any]], last: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"index": index}
        if parts and not (last and self.finish in FILTER_REASONS):
            candidate["content"] = {"parts": parts, "role": "model"}
        if last:
            candidate["finishReason"] = self.finish
            if self.finish in FILTER_REASONS:
                candidate["safetyRatings"] = [
                    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True}
                ]
        return candidate

    def usage(self) -> dict[str, Any]:
        output = sum(words(t) for t in self.texts) + (5 * len(self.texts) if self.call else 0)
        thoughts = 3 if self.thought else 0
        usage = {
            "promptTokenCount": self.prompt_tokens,
            "candidatesTokenCount": output,
            "totalTokenCount": self.prompt_tokens + output + thoughts,
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        if self.cached:
            usage["cachedContentTokenCount"] = 2
        return usage

    # -- streams ----------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """The SSE events of ``streamGenerateContent``, in order."""
        if self.blocked:
            return [self.blocked_response()]
        pieces = [re.findall(r"\S+\s*", text) for text in self.texts]
        steps = max(1, *(len(p) for p in pieces))
        events = []
        for step in range(steps):
            last = step == steps - 1 and not self.no_finish
            candidates = [
                self.candidate(n, self.step_parts(own, step, steps), last)
                for n, own in enumerate(pieces)
            ]
            event: dict[str, Any] = {"candidates": candidates, "modelVersion": "mock"}
            event["usageMetadata"] = (
                self.usage() if last else {"promptTokenCount": self.prompt_tokens}
            )
            events.append(event)
        if self.stream_error:
            error = {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}
            events[1:] = [{"error": error}]
        return events

    def step_parts(self, pieces: list[str], step: int, steps: int) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        if step == 0 and self.thought:
            parts.append({"text": THOUGHT, "thought": True})
        if step < len(pieces):
            parts.append({"text": pieces[step]})
        if step == steps - 1 and self.call:
            parts.append({"functionCall": self.call})
        return parts


def function_call(body: dict[str, Any], last: dict[str, Any]) -> dict[str, Any] | None:
    """The call the model makes: the first allowed function, unless it may not call."""
    declarations = [d for t in body.get("tools", []) for d in t.get("functionDeclarations", [])]
    config = body.get("toolConfig", {}).get("functionCallingConfig", {})
    answering = any("functionResponse" in p for p in last["parts"])
    if not declarations or config.get("mode") == "NONE" or answering:
        return None
    allowed = config.get("allowedFunctionNames") or [declarations[0]["name"]]
    return {"name": allowed[0], "args": TOOL_ARGS}


def answer_text(last: dict[str, Any], last_text: str, config: dict[str, Any]) -> str:
    responses = [p["functionResponse"] for p in last["parts"] if "functionResponse" in p]
    if responses:
        said = "; ".join(f"{r['name']} said {json.dumps(r['response'])}" for r in responses)
        return f"Tool results: {said}"
    if config.get("responseMimeType") == "application/json":
        return json.dumps({"echo": last_text})
    return f"Echo: {last_text}"


def limit(text: str, config: dict[str, Any]) -> tuple[str, bool]:
    """``text`` cut at the first stop sequence, then at ``maxOutputTokens`` words."""
    for stop in config.get("stopSequences", []):
        if stop in text:
            text = text[: text.index(stop)]
    cap = config.get("maxOutputTokens")
    if cap is not None and words(text) > cap:
        return " ".join(text.split()[:cap]), True
    return text, False

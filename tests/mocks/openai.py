"""A mock of OpenAI's API (and Azure OpenAI's deployment URLs), as OpenAI documents it.

Answers are deterministic: ``Hello from <model>: <last user text>``, split into words
when streamed; with ``tools`` in the request it calls the first tool with
``{"city": "Paris"}`` (streamed in three argument fragments); with a ``json_schema``
or ``json_object`` response format the content is ``{"city": "Paris"}``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from tests.mocks.base import MockUpstream, Recorded

TOOL_ARGUMENTS = '{"city": "Paris"}'


class OpenAIMock(MockUpstream):
    """``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/models`` and Azure's paths.

    ``key``: the bearer token (or Azure ``api-key``) it insists on; None accepts any.
    """

    def __init__(self, key: str | None = "test-key") -> None:
        self.key = key
        super().__init__()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.handler(self.chat))
        app.router.add_post("/v1/embeddings", self.handler(self.embeddings))
        app.router.add_get("/v1/models", self.handler(self.models))
        azure = "/openai/deployments/{deployment}"
        app.router.add_post(azure + "/chat/completions", self.handler(self.chat))
        app.router.add_post(azure + "/embeddings", self.handler(self.embeddings))
        # Any other base path (Groq's /openai/v1, DeepInfra's /v1/openai ...), for the
        # catalog test: the OpenAI wire is the same under every prefix.
        app.router.add_post("/{prefix:.*}/chat/completions", self.handler(self.chat))
        app.router.add_post("/chat/completions", self.handler(self.chat))

    # -- auth ---------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if self.key is None:
            return True
        if request.path.startswith("/openai/"):
            return request.headers.get("api-key") == self.key and "api-version" in request.query
        return request.headers.get("Authorization") == f"Bearer {self.key}"

    def _unauthorized(self) -> web.Response:
        body = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                          "param": None, "code": "invalid_api_key"}}  # fmt: skip
        return web.json_response(body, status=401)

    # -- routes -------------------------------------------------------------------

    async def chat(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        if not self._authorized(request):
            return self._unauthorized()
        fault = self.fault_of(request)
        if fault is not None and fault.kind == "malformed" and not recorded.json().get("stream"):
            return web.Response(
                body=b'{"id": "chatcmpl-x", "choices": [', content_type="application/json"
            )
        body = recorded.json()
        model = request.match_info.get("deployment") or body.get("model", "")
        if body.get("stream"):
            return await self._stream(request, body, model)
        return web.json_response(completion(body, model))

    async def _stream(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        fault = self.fault_of(request)
        for n, chunk in enumerate(chunks(body, model)):
            if fault is not None and fault.kind == "reset" and n == fault.after_chunks:
                await self.reset(request)
                return response
            if fault is not None and fault.kind == "malformed" and n == fault.after_chunks:
                await response.write(b"data: {not json\n\n")
                continue
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        if not self._authorized(request):
            return self._unauthorized()
        body = recorded.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dims = body.get("dimensions", 4)
        data = [
            {"object": "embedding", "index": i, "embedding": [round(0.1 * (i + 1) * (d + 1), 3)
                                                             for d in range(dims)]}
            for i in range(len(inputs))
        ]  # fmt: skip
        usage = {"prompt_tokens": len(inputs) * 2, "total_tokens": len(inputs) * 2}
        return web.json_response(
            {"object": "list", "data": data, "model": body.get("model"), "usage": usage}
        )

    async def models(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        if not self._authorized(request):
            return self._unauthorized()
        data = [{"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "mock"}]
        return web.json_response({"object": "list", "data": data})


def _answer_text(body: dict[str, Any], model: str) -> str:
    if body.get("response_format", {}).get("type") in ("json_object", "json_schema"):
        return TOOL_ARGUMENTS
    last = next((m for m in reversed(body["messages"]) if m["role"] == "user"), {})
    content = last.get("content", "")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return f"Hello from {model}: {content}"


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = sum(len(json.dumps(m.get("content", ""))) // 4 + 1 for m in body["messages"])
    completion_tokens = len(text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}  # fmt: skip


def completion(body: dict[str, Any], model: str) -> dict[str, Any]:
    text = _answer_text(body, model)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    finish = "stop"
    if body.get("tools") and body.get("tool_choice") != "none":
        name = body["tools"][0]["function"]["name"]
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": name, "arguments": TOOL_ARGUMENTS}}]}  # fmt: skip
        finish = "tool_calls"
    return {
        "id": "chatcmpl-mock1", "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": "fp_mock",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(body, text),
    }  # fmt: skip


def chunks(body: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """The stream OpenAI would send for ``body``, as chunk objects."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-mock1", "object": "chat.completion.chunk", "created": 1,
                "model": model, "system_fingerprint": "fp_mock",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}  # fmt: skip

    out = [chunk({"role": "assistant", "content": ""})]
    text = _answer_text(body, model)
    if body.get("tools") and body.get("tool_choice") != "none":
        name = body["tools"][0]["function"]["name"]
        first = {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": name, "arguments": ""}}  # fmt: skip
        out.append(chunk({"tool_calls": [first]}))
        for piece in ('{"city"', ': "Par', 'is"}'):
            out.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        out.append(chunk({}, "tool_calls"))
    else:
        words = text.split(" ")
        out += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
        out.append(chunk({}, "stop"))
    if body.get("stream_options", {}).get("include_usage"):
        usage = chunk({})
        usage["choices"] = []
        usage["usage"] = _usage(body, text)
        out.append(usage)
    return out

"""The Gemini adapter against a mock of Gemini's API, checked with Google's own SDK.

Outbound bodies are parsed into google-genai's pydantic models (which forbid unknown
fields) and dumped back, so a field the SDK does not know, or one it would drop, fails
the test. The mock's answers and streams are parsed by the SDK's client pointed at the
mock, so the mock cannot drift from the format the SDK reads.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from llmkit.errors import (
    AuthenticationError,
    BadUpstreamResponseError,
    InvalidRequestError,
    LLMKitError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from llmkit.providers.base import Call, Provider, Target
from llmkit.providers.gemini import GeminiAdapter
from llmkit.types import ChatCompletionChunk, ChatRequest, EmbeddingRequest
from llmkit.upstream import Upstream
from tests.mocks.base import Fault
from tests.mocks.gemini import GeminiMock

MODEL = "gemini-2.5-flash"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": ["string", "null"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256))).decode()

# Each top-level field of a generateContent body, and the SDK model of its items.
SDK_MODELS: dict[str, type[Any]] = {
    "contents": types.Content,
    "systemInstruction": types.Content,
    "generationConfig": types.GenerationConfig,
    "tools": types.Tool,
    "toolConfig": types.ToolConfig,
}


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def mock() -> Iterator[GeminiMock]:
    with GeminiMock() as server:
        yield server


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    client = Upstream()
    yield client
    await client.close()


@pytest.fixture
def adapter(upstream: Upstream) -> GeminiAdapter:
    return GeminiAdapter(upstream)


def target_for(mock: GeminiMock, key: str | None = "test-key", timeout_s: float = 10) -> Target:
    provider = Provider(
        "gemini", "gemini", mock.base_url, auth="x-goog-api-key", api_key=key, timeout_s=timeout_s
    )
    return Target(provider, MODEL, MODEL)


def chat(content: Any = "hello there", **fields: Any) -> Call:
    body = {"model": f"gemini/{MODEL}", "messages": [{"role": "user", "content": content}]}
    return Call(msgspec.convert({**body, **fields}, ChatRequest))


def sent(mock: GeminiMock) -> dict[str, Any]:
    """The last body the mock received, after checking the SDK accepts all of it."""
    body: dict[str, Any] = mock.requests[-1].json()
    assert_sdk_accepts(body)
    return body


def assert_sdk_accepts(body: dict[str, Any]) -> None:
    """Every part of ``body`` parses into the SDK's model and dumps back unchanged."""
    assert set(body) <= set(SDK_MODELS), set(body) - set(SDK_MODELS)
    for key, value in body.items():
        for item in value if isinstance(value, list) else [value]:
            parsed = SDK_MODELS[key].model_validate_json(json.dumps(item))
            dumped = parsed.model_dump(mode="json", by_alias=True, exclude_none=True)
            assert _bytes_as_raw(dumped) == _bytes_as_raw(item)


def _bytes_as_raw(value: Any) -> Any:
    """Decode ``inlineData.data``: the SDK re-encodes bytes URL-safe."""
    if isinstance(value, list):
        return [_bytes_as_raw(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _bytes_as_raw(v) for k, v in value.items()}
    if "inlineData" in value:
        data = value["inlineData"]["data"]
        out["inlineData"]["data"] = base64.urlsafe_b64decode(
            data.replace("+", "-").replace("/", "_")
        )
    return out


async def collect(adapter: GeminiAdapter, call: Call, target: Target) -> list[ChatCompletionChunk]:
    return [chunk async for chunk in adapter.stream(call, target)]


def streamed_text(chunks: list[ChatCompletionChunk], index: int = 0) -> str:
    return "".join(
        c.delta.content or ""
        for chunk in chunks
        for c in chunk.choices
        if c.index == index and isinstance(c.delta.content, str)
    )


@pytest.fixture
def sdk(mock: GeminiMock) -> Iterator[genai.Client]:
    """google-genai's client, pointed at the mock (held: it closes when collected)."""
    with sdk_client(mock) as client:
        yield client


def sdk_client(mock: GeminiMock, key: str = "test-key") -> genai.Client:
    options = types.HttpOptions(base_url=mock.url, api_version="v1beta")
    return genai.Client(api_key=key, http_options=options)


# -- requests -------------------------------------------------------------------------------


async def test_text_completion(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    answer = await adapter.complete(chat(), target_for(mock))
    request = mock.requests[-1]
    assert request.path == f"/v1beta/models/{MODEL}:generateContent"
    assert request.headers["x-goog-api-key"] == "test-key"
    assert sent(mock) == {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}
    assert answer.model == f"gemini/{MODEL}"
    assert answer.id.startswith("chatcmpl-")
    assert [c.index for c in answer.choices] == [0]
    assert answer.choices[0].message.content == "Echo: hello there"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (2, 3)
    assert answer.usage.total_tokens == 5
    assert answer.usage.prompt_tokens_details is None


async def test_full_request_translation(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a/b.JPG?x=1"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
        {"role": "user", "content": "Thanks"},
    ]  # fmt: skip
    call = chat(
        messages=messages, stop="END", temperature=0.5, top_p=0.9, max_completion_tokens=50,
        max_tokens=9, seed=7, n=2, user="u-1", tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    call.extras = {"presence_penalty": 0.5, "frequency_penalty": -1}
    await adapter.complete(call, target_for(mock))
    body = sent(mock)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "Use metric."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [
            {"text": "Weather here?"},
            {"inlineData": {"mimeType": "image/png", "data": PNG}},
            {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/a/b.JPG?x=1"}},
        ]},
        {"role": "model", "parts": [
            {"text": "Checking."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
            {"functionCall": {"name": "get_time"}},
        ]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_time", "response": {"output": "noon"}}},
            {"functionResponse": {"name": "get_weather", "response": {"temp": 3}}},
            {"text": "Thanks"},
        ]},
    ]  # fmt: skip
    assert body["generationConfig"] == {
        "temperature": 0.5, "topP": 0.9, "maxOutputTokens": 50, "stopSequences": ["END"],
        "candidateCount": 2, "seed": 7, "presencePenalty": 0.5, "frequencyPenalty": -1.0,
    }  # fmt: skip
    assert body["tools"] == [
        {"functionDeclarations": [
            {"name": "get_weather", "description": "Weather in a city",
             "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"]},
            {"name": "get_time"},
        ]}
    ]  # fmt: skip
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}
    }


@pytest.mark.parametrize(
    ("choice", "mode"), [("auto", "AUTO"), ("none", "NONE"), ("required", "ANY")]
)
async def test_tool_choice_modes(
    mock: GeminiMock, adapter: GeminiAdapter, choice: str, mode: str
) -> None:
    answer = await adapter.complete(
        chat(tools=[WEATHER_TOOL], tool_choice=choice), target_for(mock)
    )
    assert sent(mock)["toolConfig"] == {"functionCallingConfig": {"mode": mode}}
    called = answer.choices[0].message.tool_calls
    assert bool(called) is (mode != "NONE")


async def test_other_content_parts(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    content = [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=",
                                  "filename": "a.pdf"}},
        {"type": "image_url", "image_url": {"url": "data:text/plain,hi%20there"}},
        {"type": "text", "text": ""},
    ]  # fmt: skip
    await adapter.complete(chat(content), target_for(mock))
    assert sent(mock)["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
        {"inlineData": {"mimeType": "text/plain", "data": base64.b64encode(b"hi there").decode()}},
    ]


async def test_traceparent_and_tuned_model_path(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    call = chat()
    call.headers = {"traceparent": "00-abc-def-01", "x-secret": "no"}
    target = target_for(mock)
    await adapter.complete(call, Target(target.provider, "models/gemini-x", "d"))
    request = mock.requests[-1]
    assert request.path == "/v1beta/models/gemini-x:generateContent"
    assert request.headers["traceparent"] == "00-abc-def-01"
    assert "x-secret" not in request.headers
    assert adapter.url(Target(target.provider, "tunedModels/t1", "d"), "generateContent") == (
        f"{mock.base_url}/tunedModels/t1:generateContent"
    )


def _tool_turns(arguments: str = '{"a": 1}', answered_id: str = "c1") -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        ]},
        {"role": "tool", "tool_call_id": answered_id, "content": "x"},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x.test/image"}}]}]},
         "cannot tell the image type"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://x.test/a.png"}}]}]}, "http(s)"),
        ({"messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_id": "file-1"}}]}]}, "inline"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]},
         "'video'"),
        ({"messages": [{"role": "system", "content": "only me"}]}, "non-empty"),
        ({"messages": [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
            {"role": "user", "content": "x"}]}, "only text"),
        ({"messages": _tool_turns(answered_id="c9")}, "'c9'"),
        ({"messages": _tool_turns(arguments="[1, 2]")}, "JSON object"),
        ({"messages": _tool_turns(arguments="{oops")}, "JSON object"),
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "needs a name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
         "must be an object"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
                                                   "function": {"name": "nope"}}}, "'nope'"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "'sometimes'"),
        ({"response_format": {"type": "xml"}}, "'xml'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
         "must be an object"),
    ],
)  # fmt: skip
async def test_requests_gemini_cannot_express(
    mock: GeminiMock, adapter: GeminiAdapter, fields: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidRequestError, match=words.replace("(", r"\(").replace(")", r"\)")):
        await adapter.complete(chat(**fields), target_for(mock))
    with pytest.raises(InvalidRequestError):
        await collect(adapter, chat(stream=True, **fields), target_for(mock))
    assert mock.requests == []


async def test_tool_choice_auto_without_tools_sends_nothing(
    mock: GeminiMock, adapter: GeminiAdapter
) -> None:
    await adapter.complete(chat(tool_choice="auto"), target_for(mock))
    assert "toolConfig" not in sent(mock)


# -- responses ------------------------------------------------------------------------------


async def test_tool_call_round_trip(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    first = await adapter.complete(
        chat("Weather in Paris?", tools=[WEATHER_TOOL]), target_for(mock)
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [tool_call] = choice.message.tool_calls or []
    assert tool_call.id == "call_0"
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}

    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [msgspec.to_builtins(tool_call)]},
        {"role": "tool", "tool_call_id": tool_call.id, "content": '{"temp_c": 21}'},
    ]
    second = await adapter.complete(chat(messages=messages, tools=[WEATHER_TOOL]), target_for(mock))
    contents = sent(mock)["contents"]
    assert contents[1] == {
        "role": "model",
        "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
    }
    assert contents[2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}
    ]
    assert second.choices[0].message.content == 'Tool results: get_weather said {"temp_c": 21}'
    assert second.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("response_format", "config"),
    [
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (
            {"type": "json_schema", "json_schema": {"name": "echo", "strict": True, "schema": {
                "type": "object", "properties": {"echo": {"type": "string"}}}}},
            {"responseMimeType": "application/json", "responseJsonSchema": {
                "type": "object", "properties": {"echo": {"type": "string"}}}},
        ),
        ({"type": "text"}, None),
    ],
)  # fmt: skip
async def test_response_formats(
    mock: GeminiMock,
    adapter: GeminiAdapter,
    response_format: dict[str, Any],
    config: dict[str, Any] | None,
) -> None:
    answer = await adapter.complete(chat("hi", response_format=response_format), target_for(mock))
    assert sent(mock).get("generationConfig") == config
    content = answer.choices[0].message.content or ""
    if config is None:
        assert content == "Echo: hi"
    else:
        assert json.loads(content) == {"echo": "hi"}


async def test_stop_and_length(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    stopped = await adapter.complete(chat("one two three", stop=["two"]), target_for(mock))
    assert stopped.choices[0].message.content == "Echo: one "
    assert stopped.choices[0].finish_reason == "stop"
    cut = await adapter.complete(chat("one two three", max_tokens=2), target_for(mock))
    assert sent(mock)["generationConfig"] == {"maxOutputTokens": 2}
    assert cut.choices[0].message.content == "Echo: one"
    assert cut.choices[0].finish_reason == "length"


FINISH_REASONS = [
    ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"),
    ("SPII", "content_filter"), ("IMAGE_SAFETY", "content_filter"), ("MAX_TOKENS", "length"),
    ("STOP", "stop"), ("OTHER", "stop"), ("LANGUAGE", "stop"),
    ("MALFORMED_FUNCTION_CALL", "stop"),
]  # fmt: skip


@pytest.mark.parametrize(("gemini", "openai"), FINISH_REASONS)
async def test_finish_reasons(
    mock: GeminiMock, adapter: GeminiAdapter, gemini: str, openai: str
) -> None:
    answer = await adapter.complete(chat(f"x __finish:{gemini}__"), target_for(mock))
    assert answer.choices[0].finish_reason == openai
    filtered = openai == "content_filter"
    assert (answer.choices[0].message.content == "") is filtered
    chunks = await collect(adapter, chat(f"x __finish:{gemini}__", stream=True), target_for(mock))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [openai]


async def test_blocked_prompt(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    answer = await adapter.complete(chat("__blocked__"), target_for(mock))
    assert len(answer.choices) == 1
    assert answer.choices[0].message.content == ""
    assert answer.choices[0].finish_reason == "content_filter"
    assert answer.usage is not None and answer.usage.prompt_tokens == 1
    chunks = await collect(adapter, chat("__blocked__", stream=True), target_for(mock))
    assert [c.choices[0].delta for c in chunks][0].role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert streamed_text(chunks) == ""


async def test_usage_with_thoughts_and_cache(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    answer = await adapter.complete(chat("a __think__ __cached__"), target_for(mock))
    assert answer.choices[0].message.content == "Echo: a __think__ __cached__"  # no thought text
    usage = answer.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 4 + 3, 10)
    assert usage.prompt_tokens_details == {"cached_tokens": 2}
    assert usage.completion_tokens_details == {"reasoning_tokens": 3}


async def test_several_candidates(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    answer = await adapter.complete(chat("hi", n=3), target_for(mock))
    assert [c.message.content for c in answer.choices] == [
        "Echo: hi",
        "Echo: hi (1)",
        "Echo: hi (2)",
    ]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    chunks = await collect(adapter, chat("hi", n=2, stream=True), target_for(mock))
    assert [streamed_text(chunks, i) for i in (0, 1)] == ["Echo: hi", "Echo: hi (1)"]
    finishes = [(c.index, c.finish_reason) for k in chunks for c in k.choices if c.finish_reason]
    assert sorted(finishes) == [(0, "stop"), (1, "stop")]


async def test_tool_ids_count_across_candidates(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    answer = await adapter.complete(chat("x", n=2, tools=[WEATHER_TOOL]), target_for(mock))
    ids = [call.id for c in answer.choices for call in c.message.tool_calls or []]
    assert ids == ["call_0", "call_1"]


# -- streams --------------------------------------------------------------------------------


@pytest.mark.parametrize("usage", [True, False])
async def test_stream_text(mock: GeminiMock, adapter: GeminiAdapter, usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if usage else {}
    chunks = await collect(adapter, chat("one two three", stream=True, **options), target_for(mock))
    request = mock.requests[-1]
    assert request.path == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert request.query == {"alt": "sse"}
    assert request.headers["accept"] == "text/event-stream"
    assert sent(mock)["contents"][0]["parts"] == [{"text": "one two three"}]
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    assert streamed_text(chunks) == "Echo: one two three"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 4
    assert {(c.id, c.created, c.model) for c in chunks} == {
        (chunks[0].id, chunks[0].created, f"gemini/{MODEL}")
    }
    assert chunks[0].id.startswith("chatcmpl-")
    tail = chunks[-1]
    if usage:
        assert tail.choices == [] and tail.usage is not None
        assert (tail.usage.prompt_tokens, tail.usage.completion_tokens) == (3, 4)
        tail = chunks[-2]
    assert all(c.usage is None for c in chunks[:-1])
    assert (chunks[-1].usage is not None) is usage
    assert tail.choices[0].finish_reason == "stop"
    assert msgspec.to_builtins(tail.choices[0].delta) == {}
    assert [c for c in chunks if c.choices and c.choices[0].finish_reason] == [tail]


async def test_stream_tool_call(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    call = chat("Weather?", stream=True, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    chunks = await collect(adapter, call, target_for(mock))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].index == 0 and deltas[0].id == "call_0"
    assert deltas[0].function and deltas[0].function.name == "get_weather"
    arguments = "".join(
        d.function.arguments for d in deltas if d.function and isinstance(d.function.arguments, str)
    )
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_stream_skips_thoughts(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    chunks = await collect(
        adapter,
        chat("hm __think__", stream=True, stream_options={"include_usage": True}),
        target_for(mock),
    )
    assert streamed_text(chunks) == "Echo: hm __think__"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens_details == {"reasoning_tokens": 3}


async def test_stream_without_finish_reason(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    seen: list[ChatCompletionChunk] = []
    with pytest.raises(BadUpstreamResponseError, match="unfinished"):
        async for chunk in adapter.stream(chat("x __nofinish__", stream=True), target_for(mock)):
            seen.append(chunk)
    assert streamed_text(seen) == "Echo: x __nofinish__"


async def test_stream_error_event(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    seen: list[ChatCompletionChunk] = []
    with pytest.raises(ServiceUnavailableError, match="overloaded"):
        async for chunk in adapter.stream(
            chat("a b __stream_error__", stream=True), target_for(mock)
        ):
            seen.append(chunk)
    assert streamed_text(seen) == "Echo: "


# -- errors and faults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "mapped"),
    [
        (400, InvalidRequestError, 400), (403, PermissionDeniedError, 403),
        (404, NotFoundError, 404), (500, UpstreamError, 502),
        (503, ServiceUnavailableError, 503), (504, UpstreamTimeoutError, 504),
    ],
)  # fmt: skip
async def test_error_statuses(
    mock: GeminiMock, adapter: GeminiAdapter, status: int, error: type[LLMKitError], mapped: int
) -> None:
    mock.faults.append(Fault("status", status=status, times=2))
    with pytest.raises(error, match=f"mock upstream says {status}") as raised:
        await adapter.complete(chat(), target_for(mock))
    assert type(raised.value) is error and raised.value.status == mapped
    with pytest.raises(error):
        await collect(adapter, chat(stream=True), target_for(mock))


async def test_rate_limit_keeps_retry_after(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    mock.faults.append(Fault("status", status=429, retry_after=2))
    with pytest.raises(RateLimitError) as raised:
        await adapter.complete(chat(), target_for(mock))
    assert raised.value.retry_after == 2
    mock.faults.append(Fault("status", status=429))  # no header: RetryInfo's retryDelay
    with pytest.raises(RateLimitError) as raised:
        await collect(adapter, chat(stream=True), target_for(mock))
    assert raised.value.retry_after == 7


@pytest.mark.parametrize("key", ["wrong-key", None])
async def test_bad_key_is_401(mock: GeminiMock, adapter: GeminiAdapter, key: str | None) -> None:
    with pytest.raises(AuthenticationError) as raised:
        await adapter.complete(chat(), target_for(mock, key=key))
    assert raised.value.status == 401
    assert "key" in raised.value.message
    assert "wrong-key" not in raised.value.message and "test-key" not in raised.value.message
    if key is None:
        assert "x-goog-api-key" not in mock.requests[-1].headers


async def test_reset(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    mock.faults.append(Fault("reset", after_chunks=2))
    seen: list[ChatCompletionChunk] = []
    with pytest.raises(BadUpstreamResponseError):
        async for chunk in adapter.stream(chat("a b c d", stream=True), target_for(mock)):
            seen.append(chunk)
    assert streamed_text(seen) == "Echo: a "
    mock.faults.append(Fault("reset"))
    with pytest.raises(BadUpstreamResponseError):
        await adapter.complete(chat(), target_for(mock))


async def test_timeout(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    mock.faults.append(Fault("timeout", seconds=1.5, times=2))
    with pytest.raises(UpstreamTimeoutError) as raised:
        await adapter.complete(chat(), target_for(mock, timeout_s=0.3))
    assert raised.value.status == 504
    with pytest.raises(UpstreamTimeoutError):
        await collect(adapter, chat(stream=True), target_for(mock, timeout_s=0.3))


async def test_latency_still_answers(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    mock.faults.append(Fault("latency", seconds=0.2))
    answer = await adapter.complete(chat(), target_for(mock, timeout_s=5))
    assert answer.choices[0].message.content == "Echo: hello there"


async def test_malformed(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    mock.faults.append(Fault("malformed"))
    with pytest.raises(BadUpstreamResponseError) as raised:
        await adapter.complete(chat(), target_for(mock))
    assert raised.value.status == 502
    mock.faults.append(Fault("malformed", after_chunks=1))
    seen: list[ChatCompletionChunk] = []
    with pytest.raises(BadUpstreamResponseError):
        async for chunk in adapter.stream(chat("a b c", stream=True), target_for(mock)):
            seen.append(chunk)
    assert streamed_text(seen) == "Echo: "


def test_map_error_shapes(upstream: Upstream) -> None:
    adapter = GeminiAdapter(upstream)
    listed = (
        b'[{"error": {"code": 404, "message": "models/x is not found", "status": "NOT_FOUND"}}]'
    )
    assert isinstance(adapter.map_error(404, listed, {}), NotFoundError)
    assert adapter.map_error(404, listed, {}).message == "models/x is not found"
    plain = adapter.map_error(502, b"<html>bad gateway</html>", {})
    assert type(plain) is BadUpstreamResponseError and "502" in plain.message
    delayed = b'{"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED",'
    delayed += b' "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",'
    delayed += b' "retryDelay": "1.5s"}]}}'
    limited = adapter.map_error(429, delayed, {"retry-after": "4"})
    assert isinstance(limited, RateLimitError) and limited.retry_after == 4
    assert adapter.map_error(429, delayed, {}).retry_after == 1.5


# -- embeddings -----------------------------------------------------------------------------


async def test_embeddings(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    request = EmbeddingRequest(model="e", input=["hello world", "bye"], dimensions=4)
    target = Target(target_for(mock).provider, "gemini-embedding-001", "d")
    answer = await adapter.embed(request, target)
    recorded = mock.requests[-1]
    assert recorded.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    model = "models/gemini-embedding-001"
    assert recorded.json() == {
        "requests": [
            {"model": model, "content": {"parts": [{"text": "hello world"}]},
             "outputDimensionality": 4},
            {"model": model, "content": {"parts": [{"text": "bye"}]}, "outputDimensionality": 4},
        ]
    }  # fmt: skip
    for item in recorded.json()["requests"]:
        types.Content.model_validate(item["content"])
    assert [e.index for e in answer.data] == [0, 1]
    assert all(isinstance(e.embedding, list) and len(e.embedding) == 4 for e in answer.data)
    assert (answer.usage.prompt_tokens, answer.model) == (3, "gemini/gemini-embedding-001")

    encoded = await adapter.embed(
        EmbeddingRequest(model="e", input="hello world", dimensions=4, encoding_format="base64"),
        target,
    )
    raw = base64.b64decode(str(encoded.data[0].embedding))
    assert list(struct.unpack("<4f", raw)) == pytest.approx(answer.data[0].embedding)


async def test_embeddings_refuse_token_ids(mock: GeminiMock, adapter: GeminiAdapter) -> None:
    with pytest.raises(InvalidRequestError, match="token ids"):
        await adapter.embed(EmbeddingRequest(model="e", input=[[1, 2, 3]]), target_for(mock))
    assert mock.requests == []
    mock.faults.append(Fault("malformed"))
    with pytest.raises(BadUpstreamResponseError):
        await adapter.embed(EmbeddingRequest(model="e", input="x"), target_for(mock))


# -- the mock, read by Google's SDK ----------------------------------------------------------


def test_sdk_reads_text_and_usage(mock: GeminiMock, sdk: genai.Client) -> None:
    response = sdk.models.generate_content(
        model=MODEL,
        contents="hello __think__ __cached__",
        config=types.GenerateContentConfig(system_instruction="be nice", candidate_count=2),
    )
    assert response.text == "Echo: hello __think__ __cached__"
    assert response.candidates is not None and len(response.candidates) == 2
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.thoughts_token_count) == (5, 3)
    assert usage.cached_content_token_count == 2
    assert mock.requests[-1].headers["x-goog-api-key"] == "test-key"
    assert_sdk_accepts(mock.requests[-1].json())


def test_sdk_reads_function_calls(mock: GeminiMock, sdk: genai.Client) -> None:
    declaration = types.FunctionDeclaration(
        name="get_weather", parameters_json_schema=WEATHER_TOOL["function"]["parameters"]
    )
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[declaration])],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    response = sdk.models.generate_content(model=MODEL, contents="w?", config=config)
    [function_call] = response.function_calls or []
    assert (function_call.name, function_call.args) == ("get_weather", {"city": "Paris"})


@pytest.mark.parametrize("reason", ["SAFETY", "MAX_TOKENS"])
def test_sdk_reads_finish_reasons(mock: GeminiMock, sdk: genai.Client, reason: str) -> None:
    response = sdk.models.generate_content(model=MODEL, contents=f"x __finish:{reason}__")
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason(reason)


def test_sdk_reads_blocked_prompt(mock: GeminiMock, sdk: genai.Client) -> None:
    response = sdk.models.generate_content(model=MODEL, contents="__blocked__")
    assert response.prompt_feedback is not None
    assert response.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    assert not response.candidates


def test_sdk_reads_stream(mock: GeminiMock, sdk: genai.Client) -> None:
    chunks = list(sdk.models.generate_content_stream(model=MODEL, contents="one two three"))
    assert mock.requests[-1].query == {"alt": "sse"}
    assert "".join(c.text or "" for c in chunks) == "Echo: one two three"
    last = chunks[-1]
    assert last.candidates is not None
    assert last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata is not None and last.usage_metadata.candidates_token_count == 4
    assert all(c.candidates and c.candidates[0].finish_reason is None for c in chunks[:-1])


def test_sdk_reads_embeddings(mock: GeminiMock, sdk: genai.Client) -> None:
    response = sdk.models.embed_content(
        model="gemini-embedding-001",
        contents=["a b", "c"],
        config=types.EmbedContentConfig(output_dimensionality=3),
    )
    assert response.embeddings is not None
    assert [len(e.values or []) for e in response.embeddings] == [3, 3]
    assert mock.requests[-1].json()["requests"][0]["outputDimensionality"] == 3


def test_sdk_reads_errors(mock: GeminiMock, sdk: genai.Client) -> None:
    mock.faults.append(Fault("status", status=429))
    with pytest.raises(genai_errors.ClientError) as raised:
        sdk.models.generate_content(model=MODEL, contents="x")
    assert (raised.value.code, raised.value.status) == (429, "RESOURCE_EXHAUSTED")
    with sdk_client(mock, key="wrong") as wrong, pytest.raises(genai_errors.ClientError) as raised:
        wrong.models.generate_content(model=MODEL, contents="x")
    assert (raised.value.code, raised.value.status) == (400, "INVALID_ARGUMENT")
    assert raised.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"

"""The Anthropic adapter against a mock that speaks the Messages API.

Outbound bodies are validated with the ``anthropic`` SDK's own request types, and the
mock's answers, streams and errors are parsed by the SDK itself, so neither side can
drift from the real wire without a test failing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import replace
from typing import Any

import anthropic
import msgspec
import pytest
from anthropic.types.message_create_params import (
    MessageCreateParamsNonStreaming,
    MessageCreateParamsStreaming,
)
from anthropic.types.shared import ErrorResponse
from pydantic import BaseModel, TypeAdapter

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
from llmkit.providers.anthropic import AnthropicAdapter
from llmkit.providers.anthropic_request import DEFAULT_MAX_TOKENS, JSON_TOOL_NAME
from llmkit.providers.base import Call, Provider, Target
from llmkit.providers.catalog import BY_NAME
from llmkit.types import ChatCompletionChunk, ChatRequest
from llmkit.upstream import Upstream
from tests.mocks.anthropic import (
    ANSWER,
    REFUSAL,
    SAMPLING_FIELDS,
    TOOL_INPUT,
    TOOL_PREFACE,
    AnthropicMock,
)
from tests.mocks.base import Fault

MODEL = "claude-haiku-4-5"
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/"
    "PchI7wAAAABJRU5ErkJggg=="
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
NON_STREAMING = TypeAdapter(MessageCreateParamsNonStreaming)
STREAMING = TypeAdapter(MessageCreateParamsStreaming)
ERROR_RESPONSE = TypeAdapter(ErrorResponse)


# -- fixtures and helpers ------------------------------------------------------------


@pytest.fixture
def mock() -> Iterator[AnthropicMock]:
    server = AnthropicMock()
    yield server
    server.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    pool = Upstream()
    yield pool
    await pool.close()


@pytest.fixture
def adapter(upstream: Upstream) -> AnthropicAdapter:
    return AnthropicAdapter(upstream)


def provider_for(mock: AnthropicMock, **changes: Any) -> Provider:
    """The catalog's Anthropic row, pointed at the mock."""
    row = BY_NAME["anthropic"]
    provider = Provider(
        name=row.name,
        wire=row.wire,
        base_url=mock.url + "/v1",
        auth=row.auth,
        api_key="test-key",
        headers=row.headers,
        timeout_s=5.0,
    )
    return replace(provider, **changes)


def target_for(mock: AnthropicMock, **changes: Any) -> Target:
    return Target(provider_for(mock, **changes), MODEL, f"anthropic/{MODEL}")


def call(extras: dict[str, Any] | None = None, **body: Any) -> Call:
    body.setdefault("model", f"anthropic/{MODEL}")
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return Call(msgspec.convert(body, ChatRequest), extras=extras or {})


def materialized(value: Any) -> Any:
    """A validated SDK value as plain JSON; pydantic validates ``Iterable`` fields lazily,
    so walking them is what makes every nested block get checked."""
    if isinstance(value, BaseModel):
        return materialized(value.model_dump(exclude_unset=True))
    if isinstance(value, Mapping):
        return {key: materialized(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, Iterator)) or type(value).__name__ == "ValidatorIterator":
        return [materialized(item) for item in value]
    return value


def sent_body(mock: AnthropicMock, streaming: bool = False) -> dict[str, Any]:
    """The last body the mock received, checked against the SDK's request types: any
    field the SDK does not know is dropped by validation and fails the comparison.

    The v2 SDK speaks anthropic-version 2026-10-21, which dropped the sampling fields
    that the version the adapter pins (2023-06-01) accepts; tests check those by value.
    """
    body: dict[str, Any] = mock.requests[-1].json()
    typed = {key: value for key, value in body.items() if key not in SAMPLING_FIELDS}
    adapter = STREAMING if streaming else NON_STREAMING
    assert materialized(adapter.validate_python(typed)) == typed
    return body


async def collect(
    adapter: AnthropicAdapter, request: Call, target: Target
) -> list[ChatCompletionChunk]:
    return [chunk async for chunk in adapter.stream(request, target)]


def streamed_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(
        choice.delta.content
        for chunk in chunks
        for choice in chunk.choices
        if isinstance(choice.delta.content, str)
    )


def streamed_tool_calls(chunks: list[ChatCompletionChunk]) -> dict[int, dict[str, str]]:
    """Tool-call deltas reassembled by index, as an OpenAI client does it."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    entry["id"] = delta.id
                if delta.function and delta.function.name:
                    entry["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    entry["arguments"] += delta.function.arguments
    return calls


def finish_reasons(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]


# -- requests --------------------------------------------------------------------------


async def test_text_round_trip_sends_what_the_sdk_accepts(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    request = call(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
            {"role": "user", "content": "Hi"},
        ],
        temperature=0.5,
        top_p=0.9,
        stop=["\n\nHuman:"],
        user="user-42",
        seed=7,
    )
    completion = await adapter.complete(request, target_for(mock))

    body = sent_body(mock)
    assert body == {
        "model": MODEL,
        "max_tokens": DEFAULT_MAX_TOKENS,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "system": [
            {"type": "text", "text": "Be brief."},
            {"type": "text", "text": "Answer in English."},
        ],
        "stop_sequences": ["\n\nHuman:"],
        "temperature": 0.5,
        "top_p": 0.9,
        "metadata": {"user_id": "user-42"},
    }  # seed has no Anthropic equivalent and is left out; stream defaults to false
    headers = mock.requests[-1].headers
    assert headers["x-api-key"] == "test-key"
    assert "authorization" not in headers
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "llmkit"  # the session's, not aiohttp's own
    assert mock.requests[-1].path == "/v1/messages"

    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.id == "chatcmpl-msg_mock0001"
    assert completion.model == f"anthropic/{MODEL}"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(ANSWER.split(" "))
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_token_limit_and_traceparent_are_sent(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    request = call(max_completion_tokens=321, max_tokens=999)
    request.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await adapter.complete(request, target_for(mock))
    assert sent_body(mock)["max_tokens"] == 321
    assert mock.requests[-1].headers["traceparent"] == request.headers["traceparent"]


async def test_tool_history_merges_turns_so_roles_alternate(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "user", "content": "Please."},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
        {"role": "user", "content": "Thanks, summarise."},
    ]
    await adapter.complete(call(messages=messages), target_for(mock))
    assert sent_body(mock)["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather and time in Paris?"},
                {"type": "text", "text": "Please."},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": TOOL_INPUT},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "noon"}],
                },
                {"type": "text", "text": "Thanks, summarise."},
            ],
        },
    ]


async def test_images_inline_and_by_url_and_pdf_documents(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    content = [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
        {
            "type": "file",
            "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
        },
    ]
    await adapter.complete(call(messages=[{"role": "user", "content": content}]), target_for(mock))
    assert sent_body(mock)["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
        },
    ]


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        (None, None),
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
async def test_tools_and_tool_choice_translate(
    mock: AnthropicMock, adapter: AnthropicAdapter, tool_choice: Any, expected: Any
) -> None:
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    await adapter.complete(call(tools=[WEATHER_TOOL, TIME_TOOL], **extra), target_for(mock))
    body = sent_body(mock)
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body.get("tool_choice") == expected


async def test_parallel_tool_calls_false_disables_parallel_use(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    mock.parallel_calls = 2
    completion = await adapter.complete(
        call(extras={"parallel_tool_calls": False}, tools=[WEATHER_TOOL, TIME_TOOL]),
        target_for(mock),
    )
    assert sent_body(mock)["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert len(completion.choices[0].message.tool_calls or []) == 1


def user_parts(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(parts)}]}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    }


BAD_ARGUMENTS = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}


@pytest.mark.parametrize(
    ("body", "extras", "param"),
    [
        ({"n": 2}, {}, "n"),
        ({"temperature": 1.5}, {}, "temperature"),
        ({}, {"logprobs": True}, "logprobs"),
        ({}, {"presence_penalty": 0.5}, "presence_penalty"),
        ({"tool_choice": "required"}, {}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, {}, "tools[0].type"),
        (json_schema({"type": "array"}), {}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_object"},
          "tools": [{"type": "function", "function": {"name": JSON_TOOL_NAME}}]}, {}, "tools"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, {}, "messages"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, {}, "messages[0].role"),
        (user_parts(image("data:image/bmp;base64,AAAA")), {}, "messages[0].content[0]"),
        (user_parts(image("data:image/png,rawbytes")), {}, "messages[0].content[0]"),
        (user_parts(image("ftp://x/y.png")), {}, "messages[0].content[0]"),
        (user_parts({"type": "input_audio", "input_audio": {}}), {}, "messages[0].content[0]"),
        (user_parts({"type": "file", "file": {"file_id": "file-1"}}), {}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "tool_calls": [BAD_ARGUMENTS]}]},
         {}, "messages[1].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "tool", "content": "x"}]}, {}, "messages[0]"),
    ],
)  # fmt: skip
async def test_requests_anthropic_cannot_express_are_refused_before_sending(
    mock: AnthropicMock,
    adapter: AnthropicAdapter,
    body: dict[str, Any],
    extras: dict[str, Any],
    param: str,
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await adapter.complete(call(extras=extras, **body), target_for(mock))
    assert caught.value.status == 400
    assert caught.value.param == param
    with pytest.raises(InvalidRequestError):
        await collect(adapter, call(extras=extras, **body), target_for(mock))
    assert mock.requests == []


# -- responses ---------------------------------------------------------------------------


async def test_tool_call_response(mock: AnthropicMock, adapter: AnthropicAdapter) -> None:
    completion = await adapter.complete(call(tools=[WEATHER_TOOL]), target_for(mock))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == TOOL_PREFACE
    [tool_call] = choice.message.tool_calls or []
    assert tool_call.id == "toolu_mock0"
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == TOOL_INPUT


async def test_forced_tool_call_has_no_content(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    completion = await adapter.complete(
        call(tools=[WEATHER_TOOL], tool_choice="required"), target_for(mock)
    )
    assert completion.choices[0].message.content is None
    assert len(completion.choices[0].message.tool_calls or []) == 1


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}},
            CITY_SCHEMA,
        ),
        ({"type": "json_object"}, {"type": "object", "additionalProperties": True}),
    ],
)
async def test_json_formats_use_a_forced_tool_and_answer_as_content(
    mock: AnthropicMock, adapter: AnthropicAdapter, response_format: Any, schema: Any
) -> None:
    completion = await adapter.complete(call(response_format=response_format), target_for(mock))
    body = sent_body(mock)
    [tool] = body["tools"]
    assert tool["name"] == JSON_TOOL_NAME
    assert tool["input_schema"] == schema
    assert body["tool_choice"] == {"type": "tool", "name": JSON_TOOL_NAME}
    choice = completion.choices[0]
    assert json.loads(choice.message.content or "") == TOOL_INPUT
    assert choice.message.tool_calls is msgspec.UNSET
    assert choice.finish_reason == "stop"


async def test_json_format_with_own_tools_lets_the_model_pick_either(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY_SCHEMA}}
    completion = await adapter.complete(
        call(response_format=response_format, tools=[WEATHER_TOOL]), target_for(mock)
    )
    body = sent_body(mock)
    assert [tool["name"] for tool in body["tools"]] == ["get_weather", JSON_TOOL_NAME]
    assert body["tool_choice"] == {"type": "any"}
    # The mock calls the first tool: the client's own, which stays a tool call.
    assert completion.choices[0].finish_reason == "tool_calls"
    assert (completion.choices[0].message.tool_calls or [])[0].function.name == "get_weather"


@pytest.mark.parametrize(
    ("body", "content", "finish"),
    [
        ({"max_tokens": 3}, "Hello from the", "length"),
        ({"stop": "mock"}, "Hello from the ", "stop"),
        ({"messages": [{"role": "user", "content": "REFUSE please"}]}, REFUSAL, "content_filter"),
    ],
)
async def test_finish_reasons(
    mock: AnthropicMock, adapter: AnthropicAdapter, body: Any, content: str, finish: str
) -> None:
    completion = await adapter.complete(call(**body), target_for(mock))
    assert completion.choices[0].message.content == content
    assert completion.choices[0].finish_reason == finish
    chunks = await collect(adapter, call(**body), target_for(mock))
    assert streamed_text(chunks) == content
    assert finish_reasons(chunks) == [finish]


async def test_usage_counts_cache_tokens_as_prompt_tokens(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    mock.cache_read_tokens, mock.cache_creation_tokens = 70, 30
    completion = await adapter.complete(call(), target_for(mock))
    input_tokens = mock.message(mock.requests[-1].json(), 0)["usage"]["input_tokens"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == input_tokens + 100
    assert completion.usage.prompt_tokens_details == {"cached_tokens": 70}

    chunks = await collect(adapter, call(stream_options={"include_usage": True}), target_for(mock))
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert usage.prompt_tokens == input_tokens + 100
    assert usage.completion_tokens == len(ANSWER.split(" "))
    assert usage.prompt_tokens_details == {"cached_tokens": 70}


# -- streams ---------------------------------------------------------------------------


async def test_stream_text_in_openai_order(mock: AnthropicMock, adapter: AnthropicAdapter) -> None:
    chunks = await collect(adapter, call(stream=True), target_for(mock))
    sent_body(mock, streaming=True)
    assert mock.requests[-1].headers["accept"] == "text/event-stream"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert streamed_text(chunks) == ANSWER
    assert len(chunks) == 1 + len(ANSWER.split(" ")) + 1  # role, one per word, finish
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert finish_reasons(chunks) == ["stop"]
    assert all(chunk.usage is None for chunk in chunks)  # no include_usage: no usage chunk
    assert {chunk.id for chunk in chunks} == {"chatcmpl-msg_mock0001"}
    assert len({chunk.created for chunk in chunks}) == 1
    assert {chunk.model for chunk in chunks} == {f"anthropic/{MODEL}"}


async def test_stream_tool_calls_reassemble(mock: AnthropicMock, adapter: AnthropicAdapter) -> None:
    mock.parallel_calls = 2
    chunks = await collect(adapter, call(tools=[WEATHER_TOOL, TIME_TOOL]), target_for(mock))
    assert streamed_text(chunks) == TOOL_PREFACE
    calls = streamed_tool_calls(chunks)
    # Block 0 is the preface text; the tool calls are indexed among tool calls only.
    assert sorted(calls) == [0, 1]
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert [calls[i]["id"] for i in (0, 1)] == ["toolu_mock0", "toolu_mock1"]
    assert all(json.loads(calls[i]["arguments"]) == TOOL_INPUT for i in (0, 1))
    openings = [
        delta
        for chunk in chunks
        for delta in chunk.choices[0].delta.tool_calls or []
        if delta.id is not msgspec.UNSET
    ]
    assert [(d.index, d.type) for d in openings] == [(0, "function"), (1, "function")]
    assert finish_reasons(chunks) == ["tool_calls"]


async def test_stream_json_format_streams_content(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY_SCHEMA}}
    chunks = await collect(adapter, call(response_format=response_format), target_for(mock))
    sent_body(mock, streaming=True)
    assert json.loads(streamed_text(chunks)) == TOOL_INPUT
    assert streamed_tool_calls(chunks) == {}
    assert finish_reasons(chunks) == ["stop"]


async def test_stream_tool_without_input_gets_empty_object_arguments(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    mock.tool_input = {}
    chunks = await collect(
        adapter, call(tools=[TIME_TOOL], tool_choice="required"), target_for(mock)
    )
    assert streamed_tool_calls(chunks)[0]["arguments"] == "{}"


async def test_thinking_blocks_are_skipped_and_keep_tool_indexes(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    mock.thinking = "The user wants weather."
    completion = await adapter.complete(call(tools=[WEATHER_TOOL]), target_for(mock))
    assert completion.choices[0].message.content == TOOL_PREFACE
    assert len(completion.choices[0].message.tool_calls or []) == 1

    chunks = await collect(adapter, call(tools=[WEATHER_TOOL]), target_for(mock))
    assert streamed_text(chunks) == TOOL_PREFACE
    calls = streamed_tool_calls(chunks)
    assert list(calls) == [0]  # block 2 in Anthropic's numbering, call 0 in OpenAI's
    assert json.loads(calls[0]["arguments"]) == TOOL_INPUT


async def test_upstream_refusal_of_a_request_is_a_400(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    # From API version 2026-10-21 Anthropic refuses sampling parameters; a provider
    # configured with that version gets the upstream's own 400 back.
    target = target_for(mock, headers={"anthropic-version": "2026-10-21"})
    with pytest.raises(InvalidRequestError, match="temperature"):
        await adapter.complete(call(temperature=0.2), target)
    assert mock.requests[-1].headers["anthropic-version"] == "2026-10-21"
    completion = await adapter.complete(call(), target)
    assert completion.choices[0].message.content == ANSWER


# -- errors and faults -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (400, InvalidRequestError, 400),
        (401, AuthenticationError, 401),
        (403, PermissionDeniedError, 403),
        (404, NotFoundError, 404),
        (413, InvalidRequestError, 413),
        (500, UpstreamError, 502),
        (504, UpstreamTimeoutError, 504),
        (529, ServiceUnavailableError, 503),
    ],
)
async def test_error_statuses_map(
    mock: AnthropicMock,
    adapter: AnthropicAdapter,
    status: int,
    error: type[LLMKitError],
    code: int,
) -> None:
    mock.faults.append(Fault("status", status=status, times=2))
    with pytest.raises(error) as caught:
        await adapter.complete(call(), target_for(mock))
    assert caught.value.status == code
    assert caught.value.message == f"mock upstream says {status}"
    with pytest.raises(error):
        await collect(adapter, call(), target_for(mock))


async def test_rate_limit_keeps_retry_after(mock: AnthropicMock, adapter: AnthropicAdapter) -> None:
    mock.faults.append(Fault("status", status=429, retry_after=7))
    with pytest.raises(RateLimitError) as caught:
        await adapter.complete(call(), target_for(mock))
    assert caught.value.retry_after == 7
    assert caught.value.retry_after_header() == "7"


async def test_overloaded_keeps_retry_after(mock: AnthropicMock, adapter: AnthropicAdapter) -> None:
    mock.faults.append(Fault("status", status=529, retry_after=3))
    with pytest.raises(ServiceUnavailableError) as caught:
        await adapter.complete(call(), target_for(mock))
    assert caught.value.retry_after == 3


async def test_wrong_key_is_401_without_the_key(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    target = target_for(mock, api_key="sk-ant-wrong-secret")
    with pytest.raises(AuthenticationError) as caught:
        await adapter.complete(call(), target)
    assert "sk-ant-wrong-secret" not in str(caught.value)
    assert caught.value.message == "invalid x-api-key"
    with pytest.raises(AuthenticationError):
        await adapter.complete(call(), target_for(mock, api_key=None))


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (529, ServiceUnavailableError, 503),
        (429, RateLimitError, 429),
        (500, UpstreamError, 502),
        (400, InvalidRequestError, 400),
    ],
)
async def test_error_event_mid_stream_raises_from_the_iterator(
    mock: AnthropicMock,
    adapter: AnthropicAdapter,
    status: int,
    error: type[LLMKitError],
    code: int,
) -> None:
    mock.faults.append(Fault("error_event", status=status))
    received: list[ChatCompletionChunk] = []
    with pytest.raises(error) as caught:
        async for chunk in adapter.stream(call(), target_for(mock)):
            received.append(chunk)
    assert caught.value.status == code
    assert len(received) == 1  # the role chunk went out before the error arrived


async def test_reset_mid_stream_raises_from_the_iterator(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    mock.faults.append(Fault("reset", after_chunks=5))
    received: list[ChatCompletionChunk] = []
    with pytest.raises(BadUpstreamResponseError):
        async for chunk in adapter.stream(call(), target_for(mock)):
            received.append(chunk)
    assert received and received[0].choices[0].delta.role == "assistant"


async def test_stream_ending_before_message_stop_is_bad_upstream(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    mock.faults.append(Fault("truncate", after_chunks=8))
    with pytest.raises(BadUpstreamResponseError, match="before message_stop"):
        await collect(adapter, call(), target_for(mock))


async def test_reset_before_answer_is_bad_upstream(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    mock.faults.append(Fault("reset"))
    with pytest.raises(BadUpstreamResponseError):
        await adapter.complete(call(), target_for(mock))


async def test_timeout_is_504(mock: AnthropicMock, adapter: AnthropicAdapter) -> None:
    mock.faults.append(Fault("timeout", seconds=2, times=2))
    with pytest.raises(UpstreamTimeoutError) as caught:
        await adapter.complete(call(), target_for(mock, timeout_s=0.2))
    assert caught.value.status == 504
    with pytest.raises(UpstreamTimeoutError):
        await collect(adapter, call(), target_for(mock, timeout_s=0.2))


async def test_latency_within_timeout_still_answers(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    mock.faults.append(Fault("latency", seconds=0.1))
    completion = await adapter.complete(call(), target_for(mock, timeout_s=2))
    assert completion.choices[0].message.content == ANSWER


async def test_malformed_body_is_502(mock: AnthropicMock, adapter: AnthropicAdapter) -> None:
    mock.faults.append(Fault("malformed"))
    with pytest.raises(BadUpstreamResponseError) as caught:
        await adapter.complete(call(), target_for(mock))
    assert caught.value.status == 502


async def test_malformed_stream_event_is_502(
    mock: AnthropicMock, adapter: AnthropicAdapter
) -> None:
    mock.faults.append(Fault("malformed"))
    with pytest.raises(BadUpstreamResponseError, match="content_block_delta"):
        await collect(adapter, call(), target_for(mock))


# -- the mock speaks Anthropic: the SDK parses it -----------------------------------------


def sdk(mock: AnthropicMock, api_key: str = "test-key") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=mock.url, api_key=api_key, max_retries=0)


def test_sdk_parses_mock_message(mock: AnthropicMock) -> None:
    with sdk(mock) as client:
        message = client.messages.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        )
    assert isinstance(message, anthropic.types.Message)
    assert message.content[0].type == "text"
    assert message.content[0].text == ANSWER
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == len(ANSWER.split(" "))


def test_sdk_parses_mock_tool_use(mock: AnthropicMock) -> None:
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
    with sdk(mock) as client:
        message = client.messages.create(
            model=MODEL,
            max_tokens=50,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[tool],  # type: ignore[list-item]
        )
    assert [block.type for block in message.content] == ["text", "tool_use"]
    tool_use = message.content[1]
    assert isinstance(tool_use, anthropic.types.ToolUseBlock)
    assert tool_use.input == TOOL_INPUT
    assert message.stop_reason == "tool_use"


def test_sdk_streams_mock_text_and_tool_use(mock: AnthropicMock) -> None:
    mock.parallel_calls = 2
    tools = [
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    with sdk(mock) as client:
        with client.messages.stream(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == ANSWER
        assert final.content[0].type == "text" and final.content[0].text == ANSWER
        assert final.stop_reason == "end_turn"
        assert final.usage.output_tokens == len(ANSWER.split(" "))

        with client.messages.stream(
            model=MODEL,
            max_tokens=50,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=tools,  # type: ignore[arg-type]
        ) as stream:
            final = stream.get_final_message()
    uses = [block for block in final.content if isinstance(block, anthropic.types.ToolUseBlock)]
    assert [(u.name, u.input) for u in uses] == [
        ("get_weather", TOOL_INPUT),
        ("get_time", TOOL_INPUT),
    ]
    assert final.stop_reason == "tool_use"


def test_sdk_parses_mock_thinking(mock: AnthropicMock) -> None:
    mock.thinking = "Think first."
    with sdk(mock) as client:
        message = client.messages.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        )
        with client.messages.stream(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            final = stream.get_final_message()
    for parsed in (message, final):
        thought = parsed.content[0]
        assert isinstance(thought, anthropic.types.ThinkingBlock)
        assert (thought.thinking, thought.signature) == ("Think first.", "sig-mock")
        assert [block.type for block in parsed.content] == ["thinking", "text"]


def test_sdk_raw_stream_event_types(mock: AnthropicMock) -> None:
    with sdk(mock) as client:
        events = list(
            client.messages.create(
                model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}], stream=True
            )
        )
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[-2].delta.stop_reason == "max_tokens"  # type: ignore[union-attr]


def test_sdk_reads_mock_errors(mock: AnthropicMock) -> None:
    with sdk(mock, api_key="wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            client.messages.create(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    ERROR_RESPONSE.validate_python(caught.value.body)

    mock.faults.append(Fault("status", status=529))
    with sdk(mock) as client:
        with pytest.raises(anthropic.APIStatusError) as status_error:
            client.messages.create(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    assert status_error.value.status_code == 529
    assert ERROR_RESPONSE.validate_python(status_error.value.body).error.type == "overloaded_error"

    mock.faults.append(Fault("error_event", status=529))
    with sdk(mock) as client:
        with pytest.raises(anthropic.APIStatusError) as event_error:
            with client.messages.stream(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                stream.until_done()
    ERROR_RESPONSE.validate_python(event_error.value.body)

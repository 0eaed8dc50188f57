"""The Cohere v2 adapter against the Cohere mock, over real sockets.

Outbound bodies are checked against the cohere SDK's own pydantic types and method
signatures; the mock's answers and streams are parsed by the SDK (leniently, as it does
in production) and validated strictly against its types, so the mock cannot drift.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import cohere
import httpx
import msgspec
import pydantic
import pytest
from cohere.v2.raw_client import RawV2Client

from llmkit.errors import (
    AuthenticationError,
    BadUpstreamResponseError,
    InvalidRequestError,
    LLMKitError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from llmkit.providers.base import Call, Provider, Target
from llmkit.providers.cohere import CohereAdapter
from llmkit.providers.cohere_response import StreamTranslator, completion
from llmkit.providers.cohere_wire import chat_response_decoder, stream_event_decoder
from llmkit.types import ChatCompletionChunk, ChatRequest, Delta, EmbeddingRequest, Usage
from llmkit.upstream import Upstream
from tests.mocks.base import Fault
from tests.mocks.cohere import ERROR_TEXT, CohereMock

MODEL = "command-a-03-2025"
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather by city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip
COHERE_WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather by city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "clock"}}
DATA_URL = "data:image/png;base64,iVBORw0KGgo="

MESSAGES: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(list[cohere.ChatMessageV2])
TOOLS: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(list[cohere.ToolV2])
RESPONSE_FORMAT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(cohere.ResponseFormatV2)
CHAT_RESPONSE: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(cohere.V2ChatResponse)
STREAM_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(cohere.V2ChatStreamResponse)
EMBED_RESPONSE: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(cohere.EmbedByTypeResponse)
SDK_MESSAGES: Any = [cohere.UserChatMessageV2(content="x")]
CHAT_FIELDS = (set(inspect.signature(RawV2Client.chat).parameters) | {"stream"}) - {
    "self", "request_options"}  # fmt: skip
EMBED_FIELDS = set(inspect.signature(RawV2Client.embed).parameters) - {"self", "request_options"}


@pytest.fixture(scope="module")
def mock() -> Iterator[CohereMock]:
    server = CohereMock()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def fresh(mock: CohereMock) -> None:
    mock.faults.clear()
    mock.finish_reason = None
    mock.cached_tokens = 0
    mock.end_after = None
    mock.send_done = True


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    pool = Upstream()
    yield pool
    await pool.close()


@pytest.fixture
def adapter(upstream: Upstream) -> CohereAdapter:
    return CohereAdapter(upstream)


def target(mock: CohereMock, key: str = "test-key", timeout: float = 10, **options: str) -> Target:
    provider = Provider(
        "cohere", "cohere", mock.url + "/v2", api_key=key, timeout_s=timeout, options=options
    )
    return Target(provider, MODEL, f"cohere/{MODEL}")


def call(**fields: Any) -> Call:
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi"}], **fields}
    extras = {k: body.pop(k) for k in list(body) if k not in ChatRequest.__struct_fields__}
    return Call(msgspec.convert(body, ChatRequest), extras)


def assert_no_extras(value: Any, where: str = "") -> None:
    """Fields the SDK's types don't know land in ``model_extra``: there must be none."""
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"{where}: fields unknown to the SDK: {value.model_extra}"
        for name in type(value).model_fields:
            assert_no_extras(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_no_extras(item, f"{where}[{i}]")


def check_chat_body(body: dict[str, Any]) -> None:
    """``body`` is what ``cohere.ClientV2.chat`` would send: known fields, valid types."""
    assert set(body) <= CHAT_FIELDS, set(body) - CHAT_FIELDS
    assert_no_extras(MESSAGES.validate_python(body["messages"]), "messages")
    if "tools" in body:
        assert_no_extras(TOOLS.validate_python(body["tools"]), "tools")
    if "response_format" in body:
        assert_no_extras(RESPONSE_FORMAT.validate_python(body["response_format"]))
    assert body.get("tool_choice", "NONE") in ("REQUIRED", "NONE")


async def collect(stream: AsyncIterator[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
    return [chunk async for chunk in stream]


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- requests ------------------------------------------------------------------------


async def test_plain_chat_round_trip(mock: CohereMock, adapter: CohereAdapter) -> None:
    request = call(temperature=0.3, top_p=0.5, max_tokens=50, seed=7, stop="zzz", user="u1")
    answer = await adapter.complete(request, target(mock))
    sent = mock.requests[-1]
    assert sent.path == "/v2/chat" and sent.headers["authorization"] == "Bearer test-key"
    check_chat_body(sent.json())
    assert sent.json() == {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3,
        "p": 0.5, "max_tokens": 50, "seed": 7, "stop_sequences": ["zzz"],
    }  # fmt: skip
    assert answer.id.startswith("chatcmpl-") and answer.model == f"cohere/{MODEL}"
    assert answer.choices[0].message.content == f"Hello from {MODEL}: hi"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage == Usage(prompt_tokens=1, completion_tokens=4, total_tokens=5)


async def test_whole_conversation_is_valid_for_the_sdk(
    mock: CohereMock, adapter: CohereAdapter
) -> None:
    calls = [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
    ]  # fmt: skip
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": DATA_URL}},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}},
        ]},
        {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
        {"role": "assistant", "content": "Sunny at noon."},
        {"role": "user", "content": "thanks"},
    ]  # fmt: skip
    request = call(messages=messages, tools=[WEATHER, CLOCK], tool_choice="required")
    answer = await adapter.complete(request, target(mock))
    body = mock.requests[-1].json()
    check_chat_body(body)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": DATA_URL}},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}},
        ]},
        {"role": "assistant", "tool_plan": "Let me check.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {"role": "assistant", "content": "Sunny at noon."},
        {"role": "user", "content": "thanks"},
    ]  # fmt: skip
    assert body["tools"] == [
        COHERE_WEATHER,
        {"type": "function", "function": {"name": "clock",
                                          "parameters": {"type": "object", "properties": {}}}},
    ]  # fmt: skip
    assert body["strict_tools"] is True and body["tool_choice"] == "REQUIRED"
    assert answer.choices[0].message.content == "I will call weather to answer."
    assert answer.choices[0].finish_reason == "tool_calls"


async def test_tool_call_round_trip(mock: CohereMock, adapter: CohereAdapter) -> None:
    first = await adapter.complete(call(tools=[WEATHER]), target(mock))
    message = first.choices[0].message
    assert message.tool_calls and len(message.tool_calls) == 1
    tool_call = message.tool_calls[0]
    assert tool_call.function.name == "weather" and tool_call.id == "weather_mock0"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}

    history = [
        {"role": "user", "content": "hi"},
        msgspec.to_builtins(message),
        {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny, 21 C"},
    ]
    second = await adapter.complete(call(messages=history, tools=[WEATHER]), target(mock))
    body = mock.requests[-1].json()
    check_chat_body(body)
    assert body["messages"][1]["tool_plan"] == "I will call weather to answer."
    assert body["messages"][2] == {
        "role": "tool", "tool_call_id": "weather_mock0", "content": "sunny, 21 C"}  # fmt: skip
    assert second.choices[0].message.content == "The tool said: sunny, 21 C"
    assert second.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("choice", "sent_choice", "sent_tools", "finish"),
    [
        ("auto", None, ["weather", "clock"], "tool_calls"),
        ("none", "NONE", ["weather", "clock"], "stop"),
        ("required", "REQUIRED", ["weather", "clock"], "tool_calls"),
        ({"type": "function", "function": {"name": "clock"}}, "REQUIRED", ["clock"], "tool_calls"),
    ],
)
async def test_tool_choice(
    mock: CohereMock,
    adapter: CohereAdapter,
    choice: Any,
    sent_choice: str | None,
    sent_tools: list[str],
    finish: str,
) -> None:
    answer = await adapter.complete(call(tools=[WEATHER, CLOCK], tool_choice=choice), target(mock))
    body = mock.requests[-1].json()
    check_chat_body(body)
    assert body.get("tool_choice") == sent_choice
    assert [t["function"]["name"] for t in body["tools"]] == sent_tools
    assert answer.choices[0].finish_reason == finish
    if finish == "tool_calls":
        assert answer.choices[0].message.tool_calls[0].function.name == sent_tools[0]  # type: ignore[index]


@pytest.mark.parametrize(
    ("response_format", "sent", "content"),
    [
        ({"type": "json_object"}, {"type": "json_object"}, {"city": "Paris"}),
        (
            {"type": "json_schema", "json_schema": {"name": "place", "strict": True, "schema": {
                "type": "object", "required": ["city", "people"],
                "properties": {"city": {"type": "string"}, "people": {"type": "integer"}}}}},
            {"type": "json_object", "json_schema": {
                "type": "object", "required": ["city", "people"],
                "properties": {"city": {"type": "string"}, "people": {"type": "integer"}}}},
            {"city": "Paris", "people": 1},
        ),
    ],
)  # fmt: skip
async def test_json_modes(
    mock: CohereMock,
    adapter: CohereAdapter,
    response_format: dict[str, Any],
    sent: dict[str, Any],
    content: dict[str, Any],
) -> None:
    answer = await adapter.complete(call(response_format=response_format), target(mock))
    body = mock.requests[-1].json()
    check_chat_body(body)
    assert body["response_format"] == sent
    assert json.loads(answer.choices[0].message.content or "") == content


async def test_sampling_limits_and_passthrough(mock: CohereMock, adapter: CohereAdapter) -> None:
    request = call(
        top_p=1.0, max_tokens=9, max_completion_tokens=30, response_format={"type": "text"},
        frequency_penalty=0.5, k=40, logit_bias={"1": 2},
    )  # fmt: skip
    await adapter.complete(request, target(mock))
    body = mock.requests[-1].json()
    check_chat_body(body)
    assert body["p"] == 0.99 and body["max_tokens"] == 30
    assert body["frequency_penalty"] == 0.5 and body["k"] == 40
    assert "response_format" not in body and "logit_bias" not in body
    await adapter.complete(call(top_p=0.0), target(mock))
    assert mock.requests[-1].json()["p"] == 0.01


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": DATA_URL}}]}]}, "messages[0]"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)  # fmt: skip
async def test_requests_cohere_cannot_express_are_400_and_never_sent(
    mock: CohereMock, adapter: CohereAdapter, fields: dict[str, Any], param: str
) -> None:
    before = len(mock.requests)
    with pytest.raises(InvalidRequestError) as caught:
        await adapter.complete(call(**fields), target(mock))
    assert caught.value.status == 400 and caught.value.param == param
    with pytest.raises(InvalidRequestError):
        await collect(adapter.stream(call(stream=True, **fields), target(mock)))
    assert len(mock.requests) == before


async def test_traceparent_is_propagated(mock: CohereMock, adapter: CohereAdapter) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = call()
    request.headers = {"traceparent": traceparent}
    await adapter.complete(request, target(mock))
    assert mock.requests[-1].headers["traceparent"] == traceparent


# -- answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "forced", "finish", "content"),
    [
        ({"max_tokens": 2}, None, "length", "Hello from"),
        ({"stop": ["command"]}, None, "stop", "Hello from"),
        ({}, "ERROR_TOXIC", "content_filter", f"Hello from {MODEL}: hi"),
        ({}, "SOMETHING_NEW", "stop", f"Hello from {MODEL}: hi"),
    ],
)
async def test_finish_reasons(
    mock: CohereMock,
    adapter: CohereAdapter,
    fields: dict[str, Any],
    forced: str | None,
    finish: str,
    content: str,
) -> None:
    mock.finish_reason = forced
    answer = await adapter.complete(call(**fields), target(mock))
    assert answer.choices[0].finish_reason == finish
    assert answer.choices[0].message.content == content
    chunks = await collect(adapter.stream(call(stream=True, **fields), target(mock)))
    assert chunks[-1].choices[0].finish_reason == finish and text_of(chunks) == content


@pytest.mark.parametrize(
    ("forced", "error", "status"),
    [("ERROR", UpstreamError, 502), ("TIMEOUT", UpstreamTimeoutError, 504)],
)
async def test_failed_generations_raise(
    mock: CohereMock, adapter: CohereAdapter, forced: str, error: type[LLMKitError], status: int
) -> None:
    mock.finish_reason = forced
    with pytest.raises(error) as caught:
        await adapter.complete(call(), target(mock))
    assert type(caught.value) is error and caught.value.status == status
    received: list[ChatCompletionChunk] = []
    with pytest.raises(error) as caught:
        async for chunk in adapter.stream(call(stream=True), target(mock)):
            received.append(chunk)
    assert text_of(received) == f"Hello from {MODEL}: hi"  # raised after the content
    if forced == "ERROR":
        assert ERROR_TEXT in caught.value.message


async def test_cached_tokens_are_reported(mock: CohereMock, adapter: CohereAdapter) -> None:
    mock.cached_tokens = 3
    answer = await adapter.complete(call(), target(mock))
    assert answer.usage is not None and answer.usage.prompt_tokens_details == {"cached_tokens": 3}
    request = call(stream=True, stream_options={"include_usage": True})
    chunks = await collect(adapter.stream(request, target(mock)))
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details == {"cached_tokens": 3}


def test_usage_falls_back_to_billed_units() -> None:
    provider = Provider("cohere", "cohere", "http://127.0.0.1:9")
    where = Target(provider, MODEL, "x")
    body = {"id": "r1", "finish_reason": "COMPLETE",
            "message": {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "ok"}]},
            "usage": {"billed_units": {"input_tokens": 7, "output_tokens": 2}}}  # fmt: skip
    answer = completion(chat_response_decoder.decode(json.dumps(body)), where)
    assert answer.usage == Usage(prompt_tokens=7, completion_tokens=2, total_tokens=9)
    assert answer.choices[0].message.content == "ok"
    del body["usage"]
    answer = completion(chat_response_decoder.decode(json.dumps(body)), where)
    assert answer.usage == Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)


# -- streams -------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_text(mock: CohereMock, adapter: CohereAdapter, include_usage: bool) -> None:
    request = call(stream=True, stream_options={"include_usage": include_usage})
    chunks = await collect(adapter.stream(request, target(mock)))
    sent = mock.requests[-1]
    assert sent.json()["stream"] is True and sent.headers["accept"] == "text/event-stream"
    check_chat_body(sent.json())
    assert chunks[0].choices[0].delta == Delta(role="assistant", content="")
    assert text_of(chunks) == f"Hello from {MODEL}: hi"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1
    assert {c.model for c in chunks} == {f"cohere/{MODEL}"}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and not any(finish[:-1])
    if include_usage:
        assert chunks[-1].choices == []
        assert chunks[-1].usage == Usage(prompt_tokens=1, completion_tokens=4, total_tokens=5)
    else:
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert all(c.usage is None for c in chunks)


async def test_stream_tool_call_arguments_reassemble(
    mock: CohereMock, adapter: CohereAdapter
) -> None:
    chunks = await collect(adapter.stream(call(tools=[WEATHER], stream=True), target(mock)))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.id, first.type) == (0, "weather_mock0", "function")
    assert first.function and first.function.name == "weather"
    assert rest and all(d.index == 0 and d.id is msgspec.UNSET for d in rest)
    arguments = "".join(d.function.arguments for d in deltas if d.function and d.function.arguments)
    assert json.loads(arguments) == {"city": "Paris"}
    assert text_of(chunks) == "I will call weather to answer."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def _event(**fields: Any) -> Any:
    return stream_event_decoder.decode(json.dumps(fields))


def test_stream_translator_indexes_parallel_tool_calls() -> None:
    provider = Provider("cohere", "cohere", "http://127.0.0.1:9")
    translator = StreamTranslator(Target(provider, MODEL, "x"), include_usage=False)

    def start(index: int, name: str) -> Any:
        call = {"id": f"id{index}", "type": "function",
                "function": {"name": name, "arguments": ""}}  # fmt: skip
        return _event(type="tool-call-start", index=index, delta={"message": {"tool_calls": call}})

    def fragment(index: int, text: str) -> Any:
        delta = {"message": {"tool_calls": {"function": {"arguments": text}}}}
        return _event(type="tool-call-delta", index=index, delta=delta)

    thinking = {"message": {"content": {"thinking": "hmm"}}}
    events = [
        _event(type="message-start", id="m1"), _event(type="content-delta", delta=thinking),
        start(3, "weather"), start(5, "clock"), fragment(5, "{}"), fragment(3, '{"city": 1}'),
        _event(type="citation-start", index=0), _event(type="some-future-event"),
    ]  # fmt: skip
    chunks = [chunk for event in events for chunk in translator.translate(event)]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.id) for d in deltas] == [
        (0, "id3"), (1, "id5"), (1, msgspec.UNSET), (0, msgspec.UNSET)]  # fmt: skip
    assert {c.id for c in chunks} == {"chatcmpl-m1"} and len(chunks) == 5
    with pytest.raises(BadUpstreamResponseError, match="never started"):
        translator.translate(fragment(9, "{"))
    with pytest.raises(UpstreamError, match="overloaded"):
        translator.translate(_event(message="overloaded"))


# -- errors and faults ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "mapped"),
    [
        (400, InvalidRequestError, 400),
        (401, AuthenticationError, 401),
        (404, NotFoundError, 404),
        (422, UnprocessableError, 422),
        (429, RateLimitError, 429),
        (498, AuthenticationError, 401),
        (499, UpstreamError, 502),
        (500, UpstreamError, 502),
        (503, ServiceUnavailableError, 503),
    ],
)
async def test_error_statuses_map(
    mock: CohereMock, adapter: CohereAdapter, status: int, error: type[LLMKitError], mapped: int
) -> None:
    mock.faults.append(Fault("status", status=status, retry_after=2 if status == 429 else None))
    with pytest.raises(error) as caught:
        await adapter.complete(call(), target(mock))
    assert type(caught.value) is error and caught.value.status == mapped
    assert caught.value.message == f"mock upstream says {status}"
    if status == 429:
        assert caught.value.retry_after == 2
    mock.faults.append(Fault("status", status=status))
    with pytest.raises(error):
        await collect(adapter.stream(call(stream=True), target(mock)))


async def test_bad_key_is_401_without_the_key(mock: CohereMock, adapter: CohereAdapter) -> None:
    with pytest.raises(AuthenticationError, match="invalid api token") as caught:
        await adapter.complete(call(), target(mock, key="co-wrong-secret"))
    assert "co-wrong-secret" not in str(caught.value)


@pytest.mark.parametrize("kind", ["reset", "malformed"])
async def test_broken_answers_are_502(mock: CohereMock, adapter: CohereAdapter, kind: str) -> None:
    mock.faults.append(Fault(kind))
    with pytest.raises(BadUpstreamResponseError):
        await adapter.complete(call(), target(mock))


@pytest.mark.parametrize(("kind", "after", "received"), [("reset", 3, 2), ("malformed", 2, 1)])
async def test_broken_stream_raises_from_iterator(
    mock: CohereMock, adapter: CohereAdapter, kind: str, after: int, received: int
) -> None:
    mock.faults.append(Fault(kind, after_chunks=after))
    chunks: list[ChatCompletionChunk] = []

    async def consume() -> None:
        async for chunk in adapter.stream(call(stream=True), target(mock)):
            chunks.append(chunk)

    with pytest.raises(BadUpstreamResponseError):
        await asyncio.wait_for(consume(), 5)
    assert len(chunks) == received


@pytest.mark.parametrize("send_done", [True, False])
async def test_stream_ending_before_message_end_is_502(
    mock: CohereMock, adapter: CohereAdapter, send_done: bool
) -> None:
    mock.end_after, mock.send_done = 4, send_done
    chunks: list[ChatCompletionChunk] = []
    with pytest.raises(BadUpstreamResponseError, match="before message-end"):
        async for chunk in adapter.stream(call(stream=True), target(mock)):
            chunks.append(chunk)
    assert text_of(chunks) == "Hello from"


async def test_stream_without_done_line_finishes(mock: CohereMock, adapter: CohereAdapter) -> None:
    mock.send_done = False
    chunks = await collect(adapter.stream(call(stream=True), target(mock)))
    assert text_of(chunks) == f"Hello from {MODEL}: hi"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_timeouts_are_504(mock: CohereMock, adapter: CohereAdapter) -> None:
    mock.faults.append(Fault("timeout", seconds=1.5))
    with pytest.raises(UpstreamTimeoutError):
        await adapter.complete(call(), target(mock, timeout=0.3))
    mock.faults.append(Fault("timeout", seconds=1.5))
    with pytest.raises(UpstreamTimeoutError):
        await collect(adapter.stream(call(stream=True), target(mock, timeout=0.3)))


async def test_latency_still_answers(mock: CohereMock, adapter: CohereAdapter) -> None:
    mock.faults.append(Fault("latency", seconds=0.2))
    answer = await adapter.complete(call(), target(mock))
    assert answer.choices[0].message.content == f"Hello from {MODEL}: hi"


async def test_connection_refused_is_503(adapter: CohereAdapter) -> None:
    provider = Provider("cohere", "cohere", "http://127.0.0.1:9/v2", api_key="k")
    with pytest.raises(ServiceUnavailableError, match="cannot connect to cohere"):
        await adapter.complete(call(), Target(provider, MODEL, "x"))


# -- embeddings ----------------------------------------------------------------------


async def test_embeddings(mock: CohereMock, adapter: CohereAdapter) -> None:
    request = EmbeddingRequest(model="alias", input=["a b", "c"], dimensions=3)
    result = await adapter.embed(request, target(mock))
    sent = mock.requests[-1]
    assert sent.path == "/v2/embed" and set(sent.json()) <= EMBED_FIELDS
    assert sent.json() == {
        "model": MODEL, "texts": ["a b", "c"], "input_type": "search_document",
        "embedding_types": ["float"], "output_dimension": 3,
    }  # fmt: skip
    assert [e.embedding for e in result.data] == [[0.1, 0.2, 0.3], [0.2, 0.4, 0.6]]
    assert [e.index for e in result.data] == [0, 1]
    assert result.usage.prompt_tokens == 3 and result.usage.total_tokens == 3
    assert result.model == f"cohere/{MODEL}"


async def test_embeddings_base64_and_input_type(mock: CohereMock, adapter: CohereAdapter) -> None:
    request = EmbeddingRequest(model="alias", input="a", encoding_format="base64")
    result = await adapter.embed(request, target(mock, input_type="search_query"))
    assert mock.requests[-1].json()["input_type"] == "search_query"
    assert "output_dimension" not in mock.requests[-1].json()
    encoded = result.data[0].embedding
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded)
    assert struct.unpack(f"<{len(raw) // 4}f", raw) == pytest.approx([0.1, 0.2, 0.3, 0.4])


async def test_embedding_errors(mock: CohereMock, adapter: CohereAdapter) -> None:
    before = len(mock.requests)
    with pytest.raises(InvalidRequestError, match="token-id"):
        await adapter.embed(EmbeddingRequest(model="a", input=[[1, 2, 3]]), target(mock))
    assert len(mock.requests) == before
    mock.faults.append(Fault("malformed"))
    with pytest.raises(BadUpstreamResponseError):
        await adapter.embed(EmbeddingRequest(model="a", input="x"), target(mock))
    mock.faults.append(Fault("status", status=429, retry_after=3))
    with pytest.raises(RateLimitError) as caught:
        await adapter.embed(EmbeddingRequest(model="a", input="x"), target(mock))
    assert caught.value.retry_after == 3


# -- the mock speaks what Cohere's SDK parses ------------------------------------------


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client() as pool:
        yield pool


@pytest.fixture
def client(mock: CohereMock, http: httpx.Client) -> cohere.ClientV2:
    return sdk_client(mock, http)


def sdk_client(mock: CohereMock, http: httpx.Client, key: str = "test-key") -> cohere.ClientV2:
    return cohere.ClientV2(api_key=key, base_url=mock.url, max_retries=0, httpx_client=http)


def test_sdk_parses_chat(mock: CohereMock, client: cohere.ClientV2) -> None:
    text = client.chat(model=MODEL, messages=SDK_MESSAGES)
    assert text.finish_reason == "COMPLETE" and text.message.content is not None
    assert text.message.content[0].text == f"Hello from {MODEL}: x"  # type: ignore[union-attr]
    assert text.usage and text.usage.tokens and text.usage.tokens.output_tokens == 4
    tools = client.chat(model=MODEL, messages=SDK_MESSAGES, tools=[COHERE_WEATHER])  # type: ignore[list-item]
    assert tools.finish_reason == "TOOL_CALL" and tools.message.tool_calls
    function = tools.message.tool_calls[0].function
    assert function and function.name == "weather" and function.arguments
    assert json.loads(function.arguments) == {"city": "Paris"}
    assert tools.message.tool_plan == "I will call weather to answer."
    for request in mock.requests[-2:]:
        check_chat_body(request.json())  # what the SDK sends passes our own check


def test_sdk_parses_chat_streams(client: cohere.ClientV2) -> None:
    events = list(client.chat_stream(model=MODEL, messages=SDK_MESSAGES))
    assert [e.type for e in events] == [
        "message-start", "content-start", *["content-delta"] * 4, "content-end",
        "message-end",
    ]  # fmt: skip
    text = "".join(
        e.delta.message.content.text or ""  # type: ignore[union-attr]
        for e in events if e.type == "content-delta"
    )  # fmt: skip
    assert text == f"Hello from {MODEL}: x"
    assert events[-1].delta.finish_reason == "COMPLETE"  # type: ignore[union-attr]
    tools: Any = [COHERE_WEATHER]
    events = list(client.chat_stream(model=MODEL, messages=SDK_MESSAGES, tools=tools))
    starts = [e for e in events if e.type == "tool-call-start"]
    assert len(starts) == 1 and starts[0].delta.message.tool_calls.function.name == "weather"  # type: ignore[union-attr]
    arguments = "".join(
        e.delta.message.tool_calls.function.arguments or ""  # type: ignore[union-attr]
        for e in events if e.type == "tool-call-delta"
    )  # fmt: skip
    assert json.loads(arguments) == {"city": "Paris"}
    assert events[-1].delta.finish_reason == "TOOL_CALL"  # type: ignore[union-attr]


def test_sdk_parses_embed_and_errors(
    mock: CohereMock, client: cohere.ClientV2, http: httpx.Client
) -> None:
    result = client.embed(
        model="embed-v4.0", texts=["a", "b"], input_type="search_document",
        embedding_types=["float"],
    )  # fmt: skip
    assert result.embeddings.float_ and len(result.embeddings.float_) == 2
    assert result.meta and result.meta.billed_units and result.meta.billed_units.input_tokens == 2
    mock.faults.append(Fault("status", status=429, retry_after=1))
    with pytest.raises(cohere.TooManyRequestsError) as caught:
        client.chat(model=MODEL, messages=SDK_MESSAGES)
    assert caught.value.body["message"] == "mock upstream says 429"
    with pytest.raises(cohere.UnauthorizedError):
        sdk_client(mock, http, key="nope").chat(model=MODEL, messages=SDK_MESSAGES)


@pytest.mark.parametrize("tools", [[], [WEATHER]])
def test_raw_answers_match_the_sdk_types_strictly(mock: CohereMock, tools: list[Any]) -> None:
    """The SDK parses leniently; validating the raw JSON catches fields it doesn't know."""
    headers = {"Authorization": "Bearer test-key"}
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    if tools:
        body["tools"] = tools
    answer = httpx.post(mock.url + "/v2/chat", json=body, headers=headers)
    assert_no_extras(CHAT_RESPONSE.validate_python(answer.json()), "response")
    stream = httpx.post(mock.url + "/v2/chat", json={**body, "stream": True}, headers=headers)
    assert stream.headers["content-type"].startswith("text/event-stream")
    frames = stream.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    for frame in frames[:-2]:
        name, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        if event["type"] == "message-start":
            # Cohere also sends empty content/tool_plan/tool_calls/citations here,
            # which the SDK's type does not model.
            event["delta"]["message"] = {"role": event["delta"]["message"]["role"]}
        assert_no_extras(STREAM_EVENT.validate_python(event), event["type"])
    embed = {"model": "embed-v4.0", "texts": ["a"], "input_type": "search_document",
             "embedding_types": ["float"]}  # fmt: skip
    answer = httpx.post(mock.url + "/v2/embed", json=embed, headers=headers)
    assert_no_extras(EMBED_RESPONSE.validate_python(answer.json()), "embed")

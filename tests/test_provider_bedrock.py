"""The Bedrock adapter against the Bedrock mock over real sockets, and the mock against
boto3: requests are checked with botocore's service model, the mock's answers are parsed
by boto3, and the mock's signature check is held to botocore's signatures."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
import msgspec
import pytest
from botocore.validate import ParamValidator

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
from llmkit.providers.bedrock import BedrockAdapter, endpoint, stream_error
from llmkit.providers.bedrock_response import StreamTranslator
from llmkit.providers.eventstream import EventMessage
from llmkit.types import ChatCompletionChunk, ChatRequest
from llmkit.upstream import Upstream
from tests.mocks.base import Fault
from tests.mocks.bedrock import (
    ACCESS_KEY_ID,
    PREAMBLE,
    SECRET_ACCESS_KEY,
    TOOL_INPUT,
    BedrockMock,
    botocore_params,
)

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
ARN = (
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
    "us.anthropic.claude-3-haiku-20240307-v1:0"
)
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "weather", "description": "Weather now", "parameters": CITY},
    }
]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\nnot-really-a-png").decode()
SERVICE_MODEL = botocore.session.get_session().get_service_model("bedrock-runtime")


@pytest.fixture(scope="module")
def mock() -> Iterator[BedrockMock]:
    with BedrockMock() as server:
        yield server


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    pool = Upstream()
    yield pool
    await pool.close()


def provider(base_url: str, *, secret: str | None = SECRET_ACCESS_KEY, timeout: float = 10,
             **credentials: str) -> Provider:  # fmt: skip
    credentials.setdefault("aws_access_key_id", ACCESS_KEY_ID)
    return Provider("bedrock", "bedrock", base_url, auth="sigv4", api_key=secret,
                    timeout_s=timeout, options={"region": "us-east-1"},
                    credentials=credentials, key_env="AWS_SECRET_ACCESS_KEY")  # fmt: skip


def target(mock: BedrockMock, model: str = MODEL, **kw: Any) -> Target:
    return Target(provider(mock.url, **kw), model, f"bedrock/{model}")


def call(*messages: dict[str, Any], **fields: Any) -> Call:
    body = {"model": "alias", "messages": list(messages) or [user("hi")], **fields}
    extras = {k: body.pop(k) for k in list(body) if k not in ChatRequest.__struct_fields__}
    return Call(msgspec.convert(body, ChatRequest), extras)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def tool_turns() -> list[dict[str, Any]]:
    """A user question, an assistant with two tool calls, and both results."""
    calls = [{"id": f"tooluse_{n}", "type": "function",
              "function": {"name": "weather", "arguments": json.dumps({"city": city})}}
             for n, city in ((1, "Paris"), (2, "Oslo"))]  # fmt: skip
    return [
        user("weather in Paris and Oslo?"),
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "tooluse_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "tooluse_2", "content": "rain"},
    ]


def assert_valid_for_botocore(sent_body: dict[str, Any], operation: str) -> None:
    params = botocore_params(MODEL, sent_body)
    report = ParamValidator().validate(params, SERVICE_MODEL.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


async def collect(stream: AsyncIterator[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
    return [chunk async for chunk in stream]


def streamed_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)


def finish_of(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]


# -- requests -------------------------------------------------------------------------


async def test_text_request_and_answer(mock: BedrockMock, upstream: Upstream) -> None:
    request = call(
        {"role": "system", "content": "Be brief."}, {"role": "developer", "content": "No emoji."},
        user("hi"), max_completion_tokens=50, temperature=0.2, top_p=0.9, stop="END",
        seed=7, user="team-a@example.com", logit_bias={"1": 2},
    )  # fmt: skip
    request.headers["traceparent"] = TRACEPARENT
    completion = await BedrockAdapter(upstream).complete(request, target(mock))
    sent = mock.requests[-1]
    assert sent.method == "POST" and sent.path == f"/model/{MODEL}/converse"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["traceparent"] == TRACEPARENT
    assert (
        "SignedHeaders=accept;content-type;host;x-amz-date,"  # trace context is not signed
        in (sent.headers["authorization"])
    )
    assert sent.headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/")
    assert sent.json() == {
        "messages": [{"role": "user", "content": [{"text": "hi"}]}],
        "system": [{"text": "Be brief."}, {"text": "No emoji."}],
        "inferenceConfig": {"maxTokens": 50, "temperature": 0.2, "topP": 0.9,
                            "stopSequences": ["END"]},
        "requestMetadata": {"user": "team-a@example.com"},
    }  # fmt: skip
    assert_valid_for_botocore(sent.json(), "Converse")
    message = completion.choices[0].message
    assert message.content == f"Hello from {MODEL}: hi" and message.tool_calls is msgspec.UNSET
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == f"bedrock/{MODEL}" and completion.id.startswith("chatcmpl-")
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 4)
    assert completion.usage.total_tokens == 9


async def test_tool_history_image_and_merged_turns(mock: BedrockMock, upstream: Upstream) -> None:
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}
    question = user([{"type": "text", "text": "and this?"}, image])
    request = call(*tool_turns(), question, tools=TOOLS, tool_choice="auto")
    completion = await BedrockAdapter(upstream).complete(request, target(mock))
    sent = mock.requests[-1].json()
    assert_valid_for_botocore(sent, "Converse")
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [
        {"toolUse": {"toolUseId": "tooluse_1", "name": "weather", "input": {"city": "Paris"}}},
        {"toolUse": {"toolUseId": "tooluse_2", "name": "weather", "input": {"city": "Oslo"}}},
    ]
    assert sent["messages"][2]["content"] == [
        {"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "sunny"}]}},
        {"toolResult": {"toolUseId": "tooluse_2", "content": [{"text": "rain"}]}},
        {"text": "and this?"},
        {"image": {"format": "png", "source": {"bytes": PIXEL}}},
    ]
    assert sent["toolConfig"] == {"tools": [{"toolSpec": {
        "name": "weather", "description": "Weather now",
        "inputSchema": {"json": TOOLS[0]["function"]["parameters"]}}}]}  # fmt: skip
    # The last user turn holds tool results, so the mock reports what the tools said.
    assert completion.choices[0].message.content == "The tool said: sunny rain"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("required", {"any": {}}), ({"type": "function", "function": {"name": "weather"}},
                                 {"tool": {"name": "weather"}})],
)  # fmt: skip
async def test_tool_choice_translation(
    mock: BedrockMock, upstream: Upstream, choice: Any, expected: dict[str, Any]
) -> None:
    completion = await BedrockAdapter(upstream).complete(
        call(tools=TOOLS, tool_choice=choice), target(mock)
    )
    sent = mock.requests[-1].json()
    assert sent["toolConfig"]["toolChoice"] == expected
    assert_valid_for_botocore(sent, "Converse")
    calls = completion.choices[0].message.tool_calls
    assert isinstance(calls, list) and calls[0].function.name == "weather"


async def test_tool_choice_none_leaves_tools_out(mock: BedrockMock, upstream: Upstream) -> None:
    completion = await BedrockAdapter(upstream).complete(
        call(tools=TOOLS, tool_choice="none"), target(mock)
    )
    assert "toolConfig" not in mock.requests[-1].json()
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("request_call", "param"),
    [
        (call(n=2), "n"),
        (call(temperature=1.5), "temperature"),
        (call(user([{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}])),
         "messages"),
        (call(user([{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA=="}}])),
         "messages"),
        (call(user([{"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}])),
         "messages"),
        (call(*tool_turns(), tools=TOOLS, tool_choice="none"), "tool_choice"),
        (call(*tool_turns()), "tools"),
        (call(tools=TOOLS, response_format={"type": "json_object"}), "response_format"),
        (call(response_format={"type": "xml"}), "response_format"),
        (call(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "other"}}),
         "tool_choice"),
        (call(tools=[{"type": "code_interpreter"}]), "tools"),
        (call({"role": "assistant", "tool_calls": [{"id": "t", "type": "function",
               "function": {"name": "weather", "arguments": "{not json"}}]}), "messages"),
        (call({"role": "tool", "content": "x"}), "messages"),
    ],
)  # fmt: skip
async def test_requests_converse_cannot_express_are_refused_before_sending(
    mock: BedrockMock, upstream: Upstream, request_call: Call, param: str
) -> None:
    sent_before = len(mock.requests)
    with pytest.raises(InvalidRequestError) as caught:
        await BedrockAdapter(upstream).complete(request_call, target(mock))
    assert caught.value.param == param and caught.value.status == 400
    assert len(mock.requests) == sent_before


async def test_metadata_is_left_out_when_bedrock_would_refuse_it(
    mock: BedrockMock, upstream: Upstream
) -> None:
    await BedrockAdapter(upstream).complete(call(user="bad<chars>"), target(mock))
    assert "requestMetadata" not in mock.requests[-1].json()


# -- answers --------------------------------------------------------------------------


async def test_tool_call_answer(mock: BedrockMock, upstream: Upstream) -> None:
    completion = await BedrockAdapter(upstream).complete(call(tools=TOOLS), target(mock))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == PREAMBLE
    assert "toolChoice" not in mock.requests[-1].json()["toolConfig"]
    calls = choice.message.tool_calls
    assert isinstance(calls, list) and len(calls) == 1
    assert (calls[0].id, calls[0].type, calls[0].function.name) == (
        "tooluse_mock1", "function", "weather",
    )  # fmt: skip
    assert json.loads(calls[0].function.arguments) == TOOL_INPUT


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_schema", "json_schema": {"name": "city_answer", "schema": SCHEMA}},
     {"type": "json_object"}],
)  # fmt: skip
async def test_json_response_format_through_a_forced_tool(
    mock: BedrockMock, upstream: Upstream, response_format: dict[str, Any]
) -> None:
    adapter = BedrockAdapter(upstream)
    completion = await adapter.complete(call(response_format=response_format), target(mock))
    sent = mock.requests[-1].json()
    assert_valid_for_botocore(sent, "Converse")
    name = response_format.get("json_schema", {}).get("name", "json_response")
    schema = response_format.get("json_schema", {}).get("schema", {"type": "object"})
    assert sent["toolConfig"]["toolChoice"] == {"tool": {"name": name}}
    assert sent["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"] == {"json": schema}
    choice = completion.choices[0]
    assert json.loads(choice.message.content or "") == TOOL_INPUT
    assert choice.finish_reason == "stop" and choice.message.tool_calls is msgspec.UNSET

    request = call(response_format=response_format, stream=True)
    chunks = await collect(adapter.stream(request, target(mock)))
    assert json.loads(streamed_text(chunks)) == TOOL_INPUT
    assert finish_of(chunks) == ["stop"]
    assert not any(c.delta.tool_calls for chunk in chunks for c in chunk.choices)


@pytest.mark.parametrize(
    ("fields", "text", "finish"),
    [
        ({"max_tokens": 2}, "Hello from", "length"),
        ({"stop": ["from", "zzz"]}, "Hello ", "stop"),
        ({"messages": [user("guardrail test")]}, "Sorry, I can't help with that.",
         "content_filter"),
    ],
)  # fmt: skip
async def test_finish_reasons(
    mock: BedrockMock, upstream: Upstream, fields: dict[str, Any], text: str, finish: str
) -> None:
    adapter = BedrockAdapter(upstream)
    messages = fields.pop("messages", [user("hi")])
    completion = await adapter.complete(call(*messages, **fields), target(mock))
    assert completion.choices[0].message.content == text
    assert completion.choices[0].finish_reason == finish
    chunks = await collect(adapter.stream(call(*messages, stream=True, **fields), target(mock)))
    assert streamed_text(chunks) == text and finish_of(chunks) == [finish]


async def test_cache_reads_count_as_prompt_tokens(upstream: Upstream) -> None:
    with BedrockMock(cache_read_tokens=7) as cached:
        adapter = BedrockAdapter(upstream)
        completion = await adapter.complete(call(), target(cached))
        request = call(stream=True, stream_options={"include_usage": True})
        chunks = await collect(adapter.stream(request, target(cached)))
    for usage in (completion.usage, chunks[-1].usage):
        assert usage is not None
        # inputTokens 1, cache reads 7, cache writes 3: OpenAI's prompt includes them all.
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 4, 15)
        assert usage.prompt_tokens_details == {"cached_tokens": 7}


# -- streams --------------------------------------------------------------------------


async def test_stream_text_in_openai_order(mock: BedrockMock, upstream: Upstream) -> None:
    request = call(stream=True, stream_options={"include_usage": True})
    chunks = await collect(BedrockAdapter(upstream).stream(request, target(mock)))
    sent = mock.requests[-1]
    assert sent.path == f"/model/{MODEL}/converse-stream"
    assert sent.headers["accept"] == "application/vnd.amazon.eventstream"
    assert_valid_for_botocore(sent.json(), "ConverseStream")
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert streamed_text(middle) == f"Hello from {MODEL}: hi"
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is msgspec.UNSET
    assert usage.choices == [] and usage.usage is not None and usage.usage.total_tokens == 5
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert first.id.startswith("chatcmpl-") and first.model == f"bedrock/{MODEL}"


async def test_stream_without_usage_request_has_no_usage_chunk(
    mock: BedrockMock, upstream: Upstream
) -> None:
    chunks = await collect(BedrockAdapter(upstream).stream(call(stream=True), target(mock)))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)


async def test_stream_tool_call_reassembles(mock: BedrockMock, upstream: Upstream) -> None:
    chunks = await collect(
        BedrockAdapter(upstream).stream(call(tools=TOOLS, stream=True), target(mock))
    )
    deltas = [d for chunk in chunks for c in chunk.choices for d in c.delta.tool_calls or []]
    # The call is Converse's content block 1 (after the preamble) but OpenAI's call 0.
    assert {d.index for d in deltas} == {0}
    first = deltas[0]
    assert (first.id, first.type) == ("tooluse_mock1", "function")
    assert first.function and first.function.name == "weather"
    assert all(d.id is msgspec.UNSET for d in deltas[1:])
    arguments = "".join(d.function.arguments for d in deltas if d.function and d.function.arguments)
    assert json.loads(arguments) == TOOL_INPUT
    assert streamed_text(chunks) == PREAMBLE and finish_of(chunks) == ["tool_calls"]


def test_stream_cut_before_message_stop_is_an_error() -> None:
    translator = StreamTranslator("chatcmpl-x", "m", json_tool=None, include_usage=True,
                                  provider="bedrock")  # fmt: skip
    translator.on_event("messageStart", b'{"role":"assistant"}')
    translator.on_event("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"a"}}')
    with pytest.raises(BadUpstreamResponseError, match="before finishing"):
        translator.check_complete()
    with pytest.raises(BadUpstreamResponseError, match="never started"):
        orphan = b'{"contentBlockIndex":3,"delta":{"toolUse":{"input":"{"}}}'
        translator.on_event("contentBlockDelta", orphan)


# -- signing and credentials ----------------------------------------------------------


async def test_arn_model_ids_travel_as_one_signed_segment(
    mock: BedrockMock, upstream: Upstream
) -> None:
    completion = await BedrockAdapter(upstream).complete(call(), target(mock, ARN))
    assert mock.requests[-1].path == f"/model/{ARN}/converse"
    assert completion.choices[0].message.content == f"Hello from {ARN}: hi"


def test_default_endpoint_comes_from_the_region() -> None:
    aws = Provider("bedrock", "bedrock", "", auth="sigv4")
    assert endpoint(aws, "eu-central-1", "amazon.nova-pro-v1:0", "converse") == (
        "https://bedrock-runtime.eu-central-1.amazonaws.com/model/amazon.nova-pro-v1:0/converse"
    )
    assert endpoint(aws, "us-east-1", ARN, "converse").endswith(
        "/model/arn:aws:bedrock:us-east-1:123456789012:inference-profile%2F"
        "us.anthropic.claude-3-haiku-20240307-v1:0/converse"
    )


async def test_session_tokens_are_sent_and_signed(upstream: Upstream) -> None:
    with BedrockMock(session_token="session-token-123") as secured:
        adapter = BedrockAdapter(upstream)
        good = target(secured, aws_session_token="session-token-123")
        await adapter.complete(call(), good)
        sent = secured.requests[-1].headers
        assert sent["x-amz-security-token"] == "session-token-123"
        assert "x-amz-security-token" in sent["authorization"]
        with pytest.raises(AuthenticationError, match="UnrecognizedClientException"):
            await adapter.complete(call(), target(secured))


@pytest.mark.parametrize(
    ("credentials", "error_type"),
    [({"secret": "wrong-secret"}, "InvalidSignatureException"),
     ({"aws_access_key_id": "AKIDSOMEONEELSE"}, "UnrecognizedClientException")],
)  # fmt: skip
async def test_wrong_credentials_are_authentication_errors(
    mock: BedrockMock, upstream: Upstream, credentials: dict[str, str], error_type: str
) -> None:
    with pytest.raises(AuthenticationError) as caught:
        await BedrockAdapter(upstream).complete(call(), target(mock, **credentials))
    assert caught.value.status == 401 and caught.value.message.startswith(error_type)
    assert "wrong-secret" not in caught.value.message


async def test_signatures_use_the_adapters_clock(mock: BedrockMock, upstream: Upstream) -> None:
    adapter = BedrockAdapter(upstream, clock=lambda: datetime(2015, 8, 30, tzinfo=timezone.utc))
    with pytest.raises(AuthenticationError, match="Signature expired: 20150830T000000Z"):
        await adapter.complete(call(), target(mock))


@pytest.mark.parametrize(
    ("credentials", "names"),
    [({"aws_access_key_id": ""}, "AWS_ACCESS_KEY_ID"), ({"secret": None}, "AWS_SECRET_ACCESS_KEY")],
)  # fmt: skip
async def test_missing_credentials_fail_before_sending(
    mock: BedrockMock, upstream: Upstream, credentials: dict[str, Any], names: str
) -> None:
    sent_before = len(mock.requests)
    with pytest.raises(AuthenticationError, match=names):
        await BedrockAdapter(upstream).complete(call(), target(mock, **credentials))
    assert len(mock.requests) == sent_before


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        (Fault("status", status=429, retry_after=7), RateLimitError, 429),
        (Fault("status", status=400), InvalidRequestError, 400),
        (Fault("status", status=403), PermissionDeniedError, 403),
        (Fault("status", status=404), NotFoundError, 404),
        (Fault("status", status=408), UpstreamTimeoutError, 504),
        (Fault("status", status=424), UpstreamError, 502),
        (Fault("status", status=500), UpstreamError, 502),
        (Fault("status", status=503), ServiceUnavailableError, 503),
        (Fault("malformed"), BadUpstreamResponseError, 502),
        (Fault("reset"), BadUpstreamResponseError, 502),
        (Fault("timeout", seconds=2), UpstreamTimeoutError, 504),
    ],
)
async def test_faults_map_to_errors(
    mock: BedrockMock, upstream: Upstream, fault: Fault, error: type[LLMKitError], status: int
) -> None:
    mock.faults.append(fault)
    with pytest.raises(error) as caught:
        await BedrockAdapter(upstream).complete(call(), target(mock, timeout=0.5))
    assert caught.value.status == status
    if fault.kind == "status":
        assert "mock upstream says" in caught.value.message
    if fault.retry_after:
        assert caught.value.retry_after == 7


async def test_latency_is_only_a_wait(mock: BedrockMock, upstream: Upstream) -> None:
    mock.faults.append(Fault("latency", seconds=0.2))
    completion = await BedrockAdapter(upstream).complete(call(), target(mock, timeout=2))
    assert completion.choices[0].message.content == f"Hello from {MODEL}: hi"


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        (Fault("reset", after_chunks=3), BadUpstreamResponseError, 502),
        (Fault("malformed", after_chunks=2), BadUpstreamResponseError, 502),
        (Fault("corrupt", after_chunks=2), BadUpstreamResponseError, 502),
        (Fault("exception", status=429, after_chunks=2), RateLimitError, 429),
        (Fault("exception", status=400, after_chunks=2), InvalidRequestError, 400),
        (Fault("exception", status=500, after_chunks=2), UpstreamError, 502),
        (Fault("exception", status=502, after_chunks=2), UpstreamError, 502),
        (Fault("exception", status=503, after_chunks=2), ServiceUnavailableError, 503),
    ],
)
async def test_mid_stream_failures_raise_from_the_iterator(
    mock: BedrockMock, upstream: Upstream, fault: Fault, error: type[LLMKitError], status: int
) -> None:
    mock.faults.append(fault)
    received: list[ChatCompletionChunk] = []
    with pytest.raises(error) as caught:
        async for chunk in BedrockAdapter(upstream).stream(call(stream=True), target(mock)):
            received.append(chunk)
    assert caught.value.status == status
    assert received and received[0].choices[0].delta.role == "assistant"
    assert not finish_of(received)


@pytest.mark.parametrize(
    ("fault", "error"),
    [(Fault("status", status=429, retry_after=3), RateLimitError),
     (Fault("timeout", seconds=2), UpstreamTimeoutError)],
)  # fmt: skip
async def test_stream_failures_before_the_first_event(
    mock: BedrockMock, upstream: Upstream, fault: Fault, error: type[LLMKitError]
) -> None:
    mock.faults.append(fault)
    stream = BedrockAdapter(upstream).stream(call(stream=True), target(mock, timeout=0.5))
    with pytest.raises(error):
        await stream.__anext__()


@pytest.mark.parametrize(
    ("status", "headers", "body", "error", "message"),
    [
        (400, {"x-amzn-errortype": "ThrottlingException:http://internal.amazon.com/coral/x/"},
         b'{"message":"Too many requests"}', RateLimitError,
         "ThrottlingException: Too many requests"),
        (403, {}, b'{"__type":"com.amazon.coral.service#ExpiredTokenException",'
                  b'"Message":"The security token included in the request is expired"}',
         AuthenticationError, "ExpiredTokenException: The security token"),
        (429, {"x-amzn-errortype": "ModelNotReadyException"}, b'{"message":"warming"}',
         ServiceUnavailableError, "ModelNotReadyException: warming"),
        (409, {"x-amzn-errortype": "SomethingNewException"}, b'{"message":"new"}',
         InvalidRequestError, "new"),
        (502, {}, b"<html>gateway</html>", UpstreamError, "upstream answered HTTP 502"),
    ],
)  # fmt: skip
def test_map_error_goes_by_error_type_then_status(
    status: int, headers: dict[str, str], body: bytes, error: type[LLMKitError], message: str
) -> None:
    mapped = BedrockAdapter(Upstream()).map_error(status, body, headers)
    assert isinstance(mapped, error) and mapped.message.startswith(message)


def test_stream_error_messages_in_headers() -> None:
    error = stream_error(EventMessage({":message-type": "error", ":error-code": "InternalFailure",
                                       ":error-message": "boom"}, b""), "bedrock")  # fmt: skip
    assert type(error) is UpstreamError and "boom" in error.message


# -- the mock against the AWS SDK -----------------------------------------------------


@contextlib.contextmanager
def boto3_client(mock: BedrockMock, secret: str = SECRET_ACCESS_KEY) -> Iterator[Any]:
    """boto3's Bedrock Runtime client pointed at the mock, without retries."""
    client = boto3.client(
        "bedrock-runtime", endpoint_url=mock.url, region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=secret,
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )  # fmt: skip
    try:
        yield client
    finally:
        client.close()


HI = [{"role": "user", "content": [{"text": "hi"}]}]
WEATHER_TOOL = {"toolSpec": {"name": "weather", "inputSchema": {"json": {"type": "object"}}}}


def test_boto3_parses_the_mocks_converse_answers(mock: BedrockMock) -> None:
    with boto3_client(mock) as client:
        answer = client.converse(modelId=MODEL, messages=HI, inferenceConfig={"maxTokens": 100})
        assert answer["output"]["message"]["content"] == [{"text": f"Hello from {MODEL}: hi"}]
        assert answer["stopReason"] == "end_turn" and answer["usage"]["totalTokens"] == 5
        forced = {"tools": [WEATHER_TOOL], "toolChoice": {"tool": {"name": "weather"}}}
        answer = client.converse(modelId=ARN, messages=HI, toolConfig=forced)
    assert answer["output"]["message"]["content"][0]["toolUse"]["input"] == TOOL_INPUT
    assert answer["stopReason"] == "tool_use"
    assert mock.requests[-1].path == f"/model/{ARN}/converse"


def test_boto3_parses_the_mocks_event_stream(mock: BedrockMock) -> None:
    with boto3_client(mock) as client:
        answer = client.converse_stream(modelId=MODEL, messages=HI,
                                        toolConfig={"tools": [WEATHER_TOOL]})  # fmt: skip
        events = list(answer["stream"])
    names = [next(iter(event)) for event in events]
    assert names[0] == "messageStart" and names[-2:] == ["messageStop", "metadata"]
    deltas = [e["contentBlockDelta"]["delta"] for e in events if "contentBlockDelta" in e]
    text = "".join(delta.get("text", "") for delta in deltas)
    tool_input = "".join(delta["toolUse"]["input"] for delta in deltas if "toolUse" in delta)
    assert text == PREAMBLE and json.loads(tool_input) == TOOL_INPUT
    starts = [e["contentBlockStart"] for e in events if "contentBlockStart" in e]
    assert starts == [{"contentBlockIndex": 1, "start": {"toolUse": {
        "toolUseId": "tooluse_mock1", "name": "weather"}}}]  # fmt: skip
    assert events[-2]["messageStop"]["stopReason"] == "tool_use"
    assert events[-1]["metadata"]["usage"]["outputTokens"] == len(PREAMBLE.split()) + 5


def test_boto3_surfaces_the_mocks_stream_exceptions(mock: BedrockMock) -> None:
    mock.faults.append(Fault("exception", status=429, after_chunks=2))
    with boto3_client(mock) as client:
        answer = client.converse_stream(modelId=MODEL, messages=HI)
        with (
            contextlib.closing(answer["stream"]) as stream,
            pytest.raises(botocore.exceptions.EventStreamError) as caught,
        ):
            list(stream)
    assert caught.value.response["Error"]["Code"] == "throttlingException"


@pytest.mark.parametrize(
    ("fault", "secret", "code", "status"),
    [(Fault("status", status=429), SECRET_ACCESS_KEY, "ThrottlingException", 429),
     (None, "not-the-secret", "InvalidSignatureException", 403)],
)  # fmt: skip
def test_boto3_reads_the_mocks_errors(
    mock: BedrockMock, fault: Fault | None, secret: str, code: str, status: int
) -> None:
    """boto3 parses the mock's error shape; the mock refuses a wrong botocore signature."""
    if fault is not None:
        mock.faults.append(fault)
    with (
        boto3_client(mock, secret) as client,
        pytest.raises(botocore.exceptions.ClientError) as caught,
    ):
        client.converse(modelId=MODEL, messages=HI)
    error = caught.value.response
    assert error["Error"]["Code"] == code
    assert error["ResponseMetadata"]["HTTPStatusCode"] == status


def test_mock_refuses_what_bedrock_validates(mock: BedrockMock) -> None:
    assistant_first = [{"role": "assistant", "content": [{"text": "first"}]}]
    with boto3_client(mock) as client:
        with pytest.raises(botocore.exceptions.ClientError, match="must start with a user"):
            client.converse(modelId=MODEL, messages=assistant_first)
        with pytest.raises(botocore.exceptions.ClientError, match="toolConfig field must"):
            client.converse(modelId=MODEL, messages=[*HI, {"role": "assistant", "content": [
                {"toolUse": {"toolUseId": "t1", "name": "weather", "input": {}}}]}])  # fmt: skip

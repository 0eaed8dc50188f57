"""The OpenAI and Azure adapters against the OpenAI mock, over real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import msgspec
import openai
import pytest

from llmkit.errors import (
    AuthenticationError,
    BadUpstreamResponseError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from llmkit.providers.azure import AzureAdapter
from llmkit.providers.base import Call, Provider, Target
from llmkit.providers.openai import OpenAIAdapter, _pass_each, _pass_through
from llmkit.types import ChatRequest, EmbeddingRequest, decode_events
from llmkit.upstream import Upstream
from tests.mocks.base import Fault
from tests.mocks.openai import OpenAIMock

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


@pytest.fixture(scope="module")
def mock() -> Iterator[OpenAIMock]:
    with OpenAIMock() as server:
        yield server


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    pool = Upstream()
    yield pool
    await pool.close()


def target(mock: OpenAIMock, key: str = "test-key", timeout: float = 10) -> Target:
    provider = Provider("openai", "openai", mock.url + "/v1", api_key=key, timeout_s=timeout)
    return Target(provider, "gpt-4o-mini", "openai/gpt-4o-mini")


def call(**fields: object) -> Call:
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi"}], **fields}
    extras = {k: body.pop(k) for k in list(body) if k not in ChatRequest.__struct_fields__}
    return Call(msgspec.convert(body, ChatRequest), extras)


async def test_request_goes_out_as_sent_with_model_renamed(
    mock: OpenAIMock, upstream: Upstream
) -> None:
    adapter = OpenAIAdapter(upstream)
    completion = await adapter.complete(call(temperature=0.2, logit_bias={"42": 1}), target(mock))
    sent = mock.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer test-key"
    assert sent.json() == {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2, "logit_bias": {"42": 1}, "stream": False,
    }  # fmt: skip
    assert completion.choices[0].message.content == "Hello from gpt-4o-mini: hi"
    assert completion.usage is not None and completion.usage.total_tokens > 0


async def test_stream_tool_call_arguments_reassemble(mock: OpenAIMock, upstream: Upstream) -> None:
    adapter = OpenAIAdapter(upstream)
    stream = adapter.stream(call(tools=TOOLS, stream=True), target(mock))
    arguments, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.function and delta.function.arguments:
                    arguments += delta.function.arguments
            finish = choice.finish_reason or finish
    assert json.loads(arguments) == {"city": "Paris"} and finish == "tool_calls"


async def test_embeddings_and_azure_deployment_urls(mock: OpenAIMock, upstream: Upstream) -> None:
    request = EmbeddingRequest(model="alias", input=["a", "b"], dimensions=3)
    result = await OpenAIAdapter(upstream).embed(request, target(mock))
    assert [len(e.embedding) for e in result.data] == [3, 3]
    assert mock.requests[-1].json()["model"] == "gpt-4o-mini"

    azure = Provider("azure", "azure", mock.url, auth="api-key", api_key="test-key",
                     options={"api_version": "2024-10-21"})  # fmt: skip
    azure_target = Target(azure, "my-deployment", "azure/my-deployment")
    completion = await AzureAdapter(upstream).complete(call(), azure_target)
    sent = mock.requests[-1]
    assert sent.path == "/openai/deployments/my-deployment/chat/completions"
    assert sent.query == {"api-version": "2024-10-21"} and sent.headers["api-key"] == "test-key"
    assert "authorization" not in sent.headers
    assert completion.choices[0].message.content == "Hello from my-deployment: hi"


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault("status", status=429, retry_after=7), RateLimitError),
        (Fault("status", status=503), ServiceUnavailableError),
        (Fault("status", status=500), UpstreamError),
        (Fault("malformed"), BadUpstreamResponseError),
        (Fault("timeout", seconds=2), UpstreamTimeoutError),
    ],
)
async def test_faults_map_to_errors(
    mock: OpenAIMock, upstream: Upstream, fault: Fault, error: type[Exception]
) -> None:
    mock.faults.append(fault)
    with pytest.raises(error) as caught:
        await OpenAIAdapter(upstream).complete(call(), target(mock, timeout=0.5))
    if fault.retry_after:
        assert caught.value.retry_after == 7  # type: ignore[attr-defined]


async def test_bad_key_is_401_without_the_key(mock: OpenAIMock, upstream: Upstream) -> None:
    with pytest.raises(AuthenticationError) as caught:
        await OpenAIAdapter(upstream).complete(call(), target(mock, key="sk-wrong-secret"))
    assert "sk-wrong-secret" not in str(caught.value)


@pytest.mark.parametrize("kind", ["reset", "malformed"])
async def test_broken_stream_raises_from_iterator(
    mock: OpenAIMock, upstream: Upstream, kind: str
) -> None:
    mock.faults.append(Fault(kind, after_chunks=2))
    received = 0
    with pytest.raises(BadUpstreamResponseError):
        async for _ in OpenAIAdapter(upstream).stream(call(stream=True), target(mock)):
            received += 1
    assert received == 2


async def test_connection_refused_is_503(upstream: Upstream) -> None:
    provider = Provider("openai", "openai", "http://127.0.0.1:9", api_key="k")
    with pytest.raises(ServiceUnavailableError, match="cannot connect to openai"):
        await OpenAIAdapter(upstream).complete(call(), Target(provider, "m", "openai/m"))


def test_mock_speaks_what_the_openai_sdk_parses(mock: OpenAIMock) -> None:
    client = openai.OpenAI(base_url=mock.url + "/v1", api_key="test-key", max_retries=0)
    completion = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "x"}],
        tools=TOOLS,  # type: ignore[list-item]
    )
    tool_call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    parts = list(stream)
    assert parts[-1].usage is not None and parts[-1].choices == []
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=mock.url + "/v1", api_key="nope", max_retries=0).models.list()


async def test_frames_pass_events_through_and_keep_usage_apart(
    mock: OpenAIMock, upstream: Upstream
) -> None:
    adapter = OpenAIAdapter(upstream)
    wanted = call(stream=True, stream_options={"include_usage": True})
    frames = [f async for f in adapter.frames(wanted, target(mock))]
    chunks = [c async for c in adapter.stream(wanted, target(mock))]
    events = b"".join(f.events for f in frames)
    assert all(e.startswith(b"data: {") for e in events.split(b"\n\n") if e)
    passed = decode_events(events)
    usage_chunks = [c for c in chunks if not c.choices]
    assert [c.choices for c in passed] == [c.choices for c in chunks if c.choices]
    [usage_frames] = [f for f in frames if f.usage_event]
    assert decode_events(usage_frames.usage_event)[0].usage == usage_chunks[0].usage
    assert usage_frames.usage == usage_chunks[0].usage and frames[-1].last
    # Nothing follows the usage chunk but the end ([DONE] may come in a read of its own).
    assert not any(f.events for f in frames[frames.index(usage_frames) + 1 :])


@pytest.mark.parametrize("kind", ["reset", "malformed"])
async def test_broken_passthrough_raises_after_what_arrived(
    mock: OpenAIMock, upstream: Upstream, kind: str
) -> None:
    mock.faults.append(Fault(kind, after_chunks=2))
    events = b""
    with pytest.raises(BadUpstreamResponseError):
        async for frames in OpenAIAdapter(upstream).frames(call(stream=True), target(mock)):
            events += frames.events
    assert len(decode_events(events)) == 2


def _chunk(content: str | None = None, finish: str | None = None, usage: bool = False) -> bytes:
    choices = [] if content is None else [
        {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    ]  # fmt: skip
    data: dict[str, object] = {"id": "c1", "object": "chat.completion.chunk", "choices": choices}
    if usage:
        data["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return json.dumps(data).encode()


BATCHES = {
    "plain": [_chunk("a"), _chunk("b"), _chunk("", "stop")],
    "ends with done": [_chunk("a"), _chunk("", "stop"), b"[DONE]"],
    "usage apart": [_chunk("a"), _chunk("", "stop"), _chunk(usage=True), b"[DONE]"],
    "usage inline": [_chunk("a", usage=True), _chunk("b")],
    "empty choices kept": [_chunk(), _chunk("a")],
    "done mid-read": [_chunk("a"), b"[DONE]", _chunk("b")],
    "malformed": [_chunk("a"), b'{"id": 1}', _chunk("b")],
    "not json": [_chunk("a"), b"{oops", _chunk("b")],
    "error body": [_chunk("a"), b'{"error": {"message": "overloaded"}}'],
    "only done": [b"[DONE]"],
}


@pytest.mark.parametrize("name", BATCHES)
def test_batch_check_answers_as_chunk_by_chunk(name: str) -> None:
    """The one-decode path for a whole read gives exactly what checking each chunk does:
    the same events, usage, finish, end and error (type and message)."""
    provider = Provider("openai", "openai", "http://127.0.0.1:1/v1", api_key="key")
    the_target = Target(provider, "gpt-4o-mini", "openai/gpt-4o-mini")
    fast = _pass_through(BATCHES[name], the_target)
    each = _pass_each(BATCHES[name], the_target)
    assert fast[:3] == each[:3]
    assert type(fast[3]) is type(each[3])
    assert str(fast[3]) == str(each[3])

"""The official openai SDK against ``llmkit-serve``, in front of the OpenAI mock.

Covers the front door (SDK compatibility: JSON, streams, tools, json_schema,
embeddings, models, typed exceptions) and the faults of the back door (429, reset
mid-stream, timeout, malformed JSON), with the workers surviving all of them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import Server
from tests.mocks.base import Fault
from tests.mocks.openai import OpenAIMock

pytestmark = pytest.mark.multiprocess

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
HELLO = [{"role": "user", "content": "hi"}]
PLACE = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE}}


def config(mock_url: str) -> str:
    return f"""
[[providers]]
name = "openai"
base_url = "{mock_url}/v1"
api_key_env = "LLMKIT_TEST_OPENAI_KEY"
timeout_s = 1.0

[[providers]]
name = "azure"
base_url = "{mock_url}"
api_key_env = "LLMKIT_TEST_AZURE_KEY"

[[models]]
name = "gpt"
[[models.deployments]]
provider = "openai"
model = "gpt-4o-mini"

[[models]]
name = "az"
[[models.deployments]]
provider = "azure"
model = "my-deployment"

[[models]]
name = "gpt-limited"
[[models.deployments]]
provider = "openai"
model = "gpt-4o-mini"
"""


@pytest.fixture(scope="module")
def mock() -> Iterator[OpenAIMock]:
    with OpenAIMock() as server:
        yield server


@pytest.fixture(scope="module")
def server(mock: OpenAIMock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LLMKIT_TEST_OPENAI_KEY", "test-key")
        env.setenv("LLMKIT_TEST_AZURE_KEY", "test-key")
        running = Server(tmp_path_factory.mktemp("e2e-openai"), config(mock.url))
    yield running
    assert running.stop() == 0


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["gpt", "openai/gpt-4o-mini", "az"])
def test_chat_json_and_stream(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(model=model, messages=HELLO)  # type: ignore[arg-type]
    assert completion.choices[0].message.content.startswith("Hello from ")  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model=model,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_tool_call_streams_reassemble_into_json(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt",
        messages=HELLO,
        tools=TOOLS,
        stream=True,  # type: ignore[arg-type]
    )
    arguments, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                arguments += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    assert json.loads(arguments) == {"city": "Paris"} and finish == "tool_calls"
    completion = client.chat.completions.create(model="gpt", messages=HELLO, tools=TOOLS)  # type: ignore[arg-type]
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "weather"  # type: ignore[union-attr]


def test_json_schema_and_embeddings_and_models(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt",
        messages=HELLO,
        response_format=SCHEMA,  # type: ignore[arg-type]
    )
    assert json.loads(completion.choices[0].message.content) == {"city": "Paris"}  # type: ignore[arg-type]
    embeddings = client.embeddings.create(model="gpt", input=["a", "b"], dimensions=3)
    assert [len(e.embedding) for e in embeddings.data] == [3, 3]
    ids = [m.id for m in client.models.list()]
    assert ids[:3] == ["gpt", "az", "gpt-limited"] and "demo/default" in ids


def test_cost_header_from_usage_and_price(server: Server) -> None:
    payload = {"model": "openai/gpt-4o-mini", "messages": HELLO}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=10)
    usage = response.json()["usage"]
    expected = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.60) / 1e6
    assert float(response.headers["x-llmkit-cost-usd"]) == pytest.approx(expected, abs=1e-8)
    unpriced = httpx.post(f"{server.url}/v1/chat/completions", json={**payload, "model": "az"})
    assert "x-llmkit-cost-usd" not in unpriced.headers


def test_async_client(server: Server) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
            results = await asyncio.gather(
                *(c.chat.completions.create(model="gpt", messages=HELLO) for _ in range(20))  # type: ignore[arg-type]
            )
        return [r.choices[0].message.content or "" for r in results]

    assert set(asyncio.run(run())) == {"Hello from gpt-4o-mini: hi"}


def test_typed_exceptions(client: openai.OpenAI, mock: OpenAIMock) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope/nothing", messages=HELLO)  # type: ignore[arg-type]
    mock.faults.append(Fault("status", status=429, retry_after=3))
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="gpt-limited", messages=HELLO)  # type: ignore[arg-type]
    assert limited.value.response.headers["retry-after"] == "3"
    mock.faults.append(Fault("status", status=401))
    with pytest.raises(openai.AuthenticationError) as denied:
        client.chat.completions.create(model="gpt", messages=HELLO)  # type: ignore[arg-type]
    assert "test-key" not in str(denied.value)


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (Fault("timeout", seconds=3), 504),
        (Fault("malformed"), 502),
        (Fault("status", status=503), 503),
    ],
)
def test_upstream_faults_become_statuses(
    server: Server, mock: OpenAIMock, fault: Fault, status: int
) -> None:
    pids = server.worker_pids()
    mock.faults.append(fault)
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "gpt", "messages": HELLO}, timeout=10
    )
    assert response.status_code == status
    assert response.json()["error"]["message"]
    assert server.worker_pids() == pids


def test_reset_mid_stream_ends_with_error_event(server: Server, mock: OpenAIMock) -> None:
    mock.faults.append(Fault("reset", after_chunks=3))
    payload = {"model": "gpt", "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=payload, timeout=10) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 4 and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "bad_upstream_response"


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_passes_upstream_events_through_and_ends_once(
    server: Server, mock: OpenAIMock, include_usage: bool
) -> None:
    # A direct provider/model: the fault tests above have opened the alias's breaker.
    payload = {"model": "openai/gpt-4o-mini", "messages": HELLO, "stream": True,
               "stream_options": {"include_usage": include_usage}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=payload, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        body = r.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and body.count(b"[DONE]") == 1
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finished) == 1
    usage = [c for c in chunks if not c["choices"]]
    assert len(usage) == (1 if include_usage else 0)

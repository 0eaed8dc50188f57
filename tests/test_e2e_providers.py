"""Every native adapter through a real ``llmkit-serve``, judged by the official openai SDK.

One server fronts five mocks (OpenAI, Anthropic, Gemini, Bedrock, Cohere) plus Azure's
paths on the OpenAI mock; the same SDK calls go to each. Each mock speaks its wire as
the provider's own SDK parses it (see tests/test_provider_*.py), so a pass here means
an OpenAI client gets the same answers whichever wire a model lives behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from tests.conftest import Server
from tests.mocks.anthropic import AnthropicMock
from tests.mocks.base import Fault, MockUpstream
from tests.mocks.bedrock import ACCESS_KEY_ID, SECRET_ACCESS_KEY, BedrockMock
from tests.mocks.cohere import CohereMock
from tests.mocks.gemini import GeminiMock
from tests.mocks.openai import OpenAIMock

pytestmark = pytest.mark.multiprocess

TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}}]  # fmt: skip
PLACE = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE}}
HELLO = [{"role": "user", "content": "hello"}]
WIRES = ["openai", "azure", "anthropic", "gemini", "bedrock", "cohere"]
EMBEDDING_WIRES = ["openai", "azure", "gemini", "cohere"]


@dataclass
class Mocks:
    openai: OpenAIMock
    anthropic: AnthropicMock
    gemini: GeminiMock
    bedrock: BedrockMock
    cohere: CohereMock

    def of(self, wire: str) -> MockUpstream:
        return self.openai if wire == "azure" else getattr(self, wire)  # type: ignore[no-any-return]

    def config(self) -> str:
        rows = {
            "openai": (f"{self.openai.url}/v1", "LLMKIT_T_OPENAI", "gpt-4o-mini"),
            "azure": (self.openai.url, "LLMKIT_T_AZURE", "my-deployment"),
            "anthropic": (f"{self.anthropic.url}/v1", "LLMKIT_T_ANTHROPIC", "claude-sonnet-4-5"),
            "gemini": (self.gemini.base_url, "LLMKIT_T_GEMINI", "gemini-2.5-flash"),
            "bedrock": (self.bedrock.url, "LLMKIT_T_AWS_SECRET", "anthropic.claude-v2:1"),
            "cohere": (f"{self.cohere.url}/v2", "LLMKIT_T_COHERE", "command-a-03-2025"),
        }
        parts = []
        for wire, (url, env, model) in rows.items():
            parts.append(
                f'[[providers]]\nname = "{wire}"\nbase_url = "{url}"\napi_key_env = "{env}"\n'
                "timeout_s = 5.0\n"
            )
            # "limit-" aliases take the upstream 429s, whose cooldown must not
            # reach the other tests' deployments.
            for alias in (f"m-{wire}", f"limit-{wire}"):
                parts.append(
                    f'[[models]]\nname = "{alias}"\n'
                    f'[[models.deployments]]\nprovider = "{wire}"\nmodel = "{model}"\n'
                )
        return "\n".join(parts)


@pytest.fixture(scope="module")
def mocks() -> Iterator[Mocks]:
    with (
        OpenAIMock() as oai, AnthropicMock() as ant, GeminiMock() as gem,
        BedrockMock() as bed, CohereMock() as coh,
    ):  # fmt: skip
        yield Mocks(oai, ant, gem, bed, coh)


@pytest.fixture(scope="module")
def server(mocks: Mocks, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with pytest.MonkeyPatch.context() as env:
        for name in ("OPENAI", "AZURE", "ANTHROPIC", "GEMINI", "COHERE"):
            env.setenv(f"LLMKIT_T_{name}", "test-key")
        env.setenv("LLMKIT_T_AWS_SECRET", SECRET_ACCESS_KEY)
        env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        running = Server(tmp_path_factory.mktemp("e2e-wires"), mocks.config())
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("wire", WIRES)
def test_chat_json_and_stream_agree(client: openai.OpenAI, wire: str) -> None:
    completion = client.chat.completions.create(model=f"m-{wire}", messages=HELLO)  # type: ignore[arg-type]
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    stream = client.chat.completions.create(
        model=f"m-{wire}", messages=HELLO, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("wire", WIRES)
def test_streamed_tool_call_reassembles_into_json(client: openai.OpenAI, wire: str) -> None:
    stream = client.chat.completions.create(
        model=f"m-{wire}",
        messages=HELLO,
        tools=TOOLS,
        stream=True,  # type: ignore[arg-type]
    )
    names, arguments, finish = set(), "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                if call.function and call.function.name:
                    names.add(call.function.name)
                arguments += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    assert names == {"weather"} and finish == "tool_calls"
    assert json.loads(arguments) == {"city": "Paris"}


@pytest.mark.parametrize("wire", WIRES)
def test_tool_result_round_trip_and_json_schema(client: openai.OpenAI, wire: str) -> None:
    first = client.chat.completions.create(model=f"m-{wire}", messages=HELLO, tools=TOOLS)  # type: ignore[arg-type]
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    followup = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(model=f"m-{wire}", messages=followup, tools=TOOLS)  # type: ignore[arg-type]
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    structured = client.chat.completions.create(
        model=f"m-{wire}",
        messages=HELLO,
        response_format=SCHEMA,  # type: ignore[arg-type]
    )
    assert isinstance(json.loads(structured.choices[0].message.content or ""), dict)


@pytest.mark.parametrize("wire", EMBEDDING_WIRES)
def test_embeddings(client: openai.OpenAI, wire: str) -> None:
    result = client.embeddings.create(model=f"m-{wire}", input=["a", "b"], encoding_format="float")
    assert [e.index for e in result.data] == [0, 1]
    assert all(len(e.embedding) > 0 for e in result.data)


def test_embeddings_on_a_chat_only_wire_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
        client.embeddings.create(model="m-anthropic", input="a")


@pytest.mark.parametrize("wire", WIRES)
def test_upstream_429_keeps_retry_after(client: openai.OpenAI, mocks: Mocks, wire: str) -> None:
    mocks.of(wire).faults.append(Fault("status", status=429, retry_after=4))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=f"limit-{wire}", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.response.headers["retry-after"] == "4"
    # The deployment now cools down for those 4 s: the gateway answers for it.
    served = len(mocks.of(wire).requests)
    with pytest.raises(openai.RateLimitError) as again:
        client.chat.completions.create(model=f"limit-{wire}", messages=HELLO)  # type: ignore[arg-type]
    assert len(mocks.of(wire).requests) == served
    assert int(again.value.response.headers["retry-after"]) in (3, 4)


# Bedrock never answers 401: its credential failures are 403 + an x-amzn-errortype,
# which tests/test_provider_bedrock.py maps to 401 case by case.
@pytest.mark.parametrize("wire", [w for w in WIRES if w != "bedrock"])
def test_upstream_auth_failure_is_401(client: openai.OpenAI, mocks: Mocks, wire: str) -> None:
    mocks.of(wire).faults.append(Fault("status", status=401))
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=f"m-{wire}", messages=HELLO)  # type: ignore[arg-type]
    assert "test-key" not in str(caught.value.body)


@pytest.mark.parametrize("wire", WIRES)
def test_reset_mid_stream_is_an_error_not_a_hang(
    client: openai.OpenAI, mocks: Mocks, wire: str
) -> None:
    mocks.of(wire).faults.append(Fault("reset", after_chunks=2))
    long = [{"role": "user", "content": "tell me a long story about the sea please"}]
    stream = client.chat.completions.create(model=f"m-{wire}", messages=long, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_models_list_names_every_alias(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert [i for i in ids if i.startswith("m-")] == [f"m-{w}" for w in WIRES]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="m-nothing", messages=HELLO)  # type: ignore[arg-type]

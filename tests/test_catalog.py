"""Every catalog row, table-driven: the right URL, auth header and model reach a mock.

Each row's base URL is replaced by a mock's address with the row's own path kept
(``https://api.groq.com/openai/v1`` -> ``http://127.0.0.1:PORT/openai/v1``), and its key
variable gets a value unique to the row, so a request that reached the wrong path, sent
another row's key or renamed the model would show here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import msgspec
import pytest

from llmkit.config import Config
from llmkit.gateway import Gateway
from llmkit.providers.base import Call
from llmkit.providers.catalog import CATALOG, CatalogEntry
from llmkit.types import ChatRequest
from tests.mocks.anthropic import AnthropicMock
from tests.mocks.base import MockUpstream
from tests.mocks.bedrock import ACCESS_KEY_ID, SECRET_ACCESS_KEY, BedrockMock
from tests.mocks.cohere import CohereMock
from tests.mocks.gemini import GeminiMock
from tests.mocks.openai import OpenAIMock

MODEL = "some-model.v1"


def key_of(entry: CatalogEntry) -> str:
    return SECRET_ACCESS_KEY if entry.wire == "bedrock" else f"key-{entry.name}"


@pytest.fixture(scope="module")
def mocks() -> Iterator[dict[str, MockUpstream]]:
    with (
        OpenAIMock(key=None) as oai, AnthropicMock(api_key="key-anthropic") as ant,
        GeminiMock(api_key="key-gemini") as gem, BedrockMock() as bed,
        CohereMock(key="key-cohere") as coh,
    ):  # fmt: skip
        yield {"openai": oai, "azure": oai, "anthropic": ant, "gemini": gem,
               "bedrock": bed, "cohere": coh}  # fmt: skip


def base_path(entry: CatalogEntry) -> str:
    """The row's own path; rows whose URL is per-account get a made-up one."""
    if entry.base_url:
        return urlsplit(entry.base_url).path
    return "" if entry.wire == "bedrock" else "/custom/v1"


@pytest.fixture
async def gateway(
    mocks: dict[str, MockUpstream], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Gateway]:
    providers = []
    for entry in CATALOG:
        monkeypatch.setenv(entry.key_env, key_of(entry))
        url = mocks[entry.wire].url
        providers.append({"name": entry.name, "base_url": url + base_path(entry)})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    gw = Gateway(msgspec.convert({"providers": providers}, Config))
    yield gw
    await gw.close()


def test_catalog_has_at_least_54_providers() -> None:
    assert len({e.name for e in CATALOG}) == len(CATALOG) >= 54


@pytest.mark.parametrize("entry", CATALOG, ids=lambda e: e.name)
async def test_row_reaches_its_mock(
    entry: CatalogEntry, gateway: Gateway, mocks: dict[str, MockUpstream]
) -> None:
    mock = mocks[entry.wire]
    request = msgspec.convert(
        {"model": f"{entry.name}/{MODEL}", "messages": [{"role": "user", "content": "hi"}]},
        ChatRequest,
    )
    target, completion = await gateway.chat(Call(request))
    assert target.provider.name == entry.name and completion.choices
    sent = mock.requests[-1]
    expected_path, auth_ok, sent_model = expectations(entry, sent.headers, sent)
    assert sent.path == expected_path
    assert auth_ok, sent.headers
    assert sent_model == MODEL


def expectations(
    entry: CatalogEntry, headers: dict[str, str], sent: object
) -> tuple[str, bool, str]:
    """(path the request must reach, whether its auth is the row's, model it named)."""
    path = base_path(entry)
    body = sent.json()  # type: ignore[attr-defined]
    key = key_of(entry)
    if entry.wire == "openai":
        return (
            f"{path}/chat/completions",
            headers.get("authorization") == f"Bearer {key}",
            body["model"],
        )
    if entry.wire == "azure":
        return (f"{path}/openai/deployments/{MODEL}/chat/completions",
                headers.get("api-key") == key, MODEL)  # fmt: skip
    if entry.wire == "anthropic":
        return f"{path}/messages", headers.get("x-api-key") == key, body["model"]
    if entry.wire == "gemini":
        return (f"{path}/models/{MODEL}:generateContent", headers.get("x-goog-api-key") == key,
                MODEL)  # fmt: skip
    if entry.wire == "bedrock":
        signed = f"Credential={ACCESS_KEY_ID}/" in headers.get("authorization", "")
        return f"{path}/model/{MODEL}/converse", signed, MODEL
    assert entry.wire == "cohere"
    return f"{path}/chat", headers.get("authorization") == f"Bearer {key}", body["model"]

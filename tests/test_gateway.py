"""The transport-independent pipeline and the demo provider, in one process."""

from __future__ import annotations

import msgspec
import pytest

from llmkit.config import Config, ConfigError, DemoConfig, default_config
from llmkit.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    error_for_status,
)
from llmkit.gateway import Gateway
from llmkit.providers.base import Call
from llmkit.types import ChatRequest, Message, decode_events


def request(**fields: object) -> Call:
    body = {"model": "demo/fast", "messages": [{"role": "user", "content": "hi"}], **fields}
    return Call(msgspec.convert(body, ChatRequest))


def with_demo(**demo: object) -> Config:
    return msgspec.structs.replace(default_config(), demo=DemoConfig(**demo))  # type: ignore[arg-type]


async def test_demo_is_deterministic_and_stream_matches_json() -> None:
    gateway = Gateway(default_config())
    _, first = await gateway.chat(request(seed=1))
    _, again = await gateway.chat(request(seed=1))
    _, other = await gateway.chat(request(seed=2))
    text = first.choices[0].message.content
    assert text == again.choices[0].message.content != other.choices[0].message.content
    target, chunks = await gateway.stream(request(seed=1, stream=True))
    chunks_seen = [c for events in [e async for e in chunks] for c in decode_events(events)]
    parts = [c.choices[0].delta.content for c in chunks_seen if c.choices]
    assert target.provider.name == "demo" and "".join(p for p in parts if p) == text


async def test_alias_resolves_to_its_deployments_in_order(tmp_path: object) -> None:
    config = msgspec.convert(
        {"models": [{"name": "fast", "deployments": [
            {"provider": "demo", "model": "a"}, {"provider": "demo", "model": "b"}]}]},
        Config,
    )  # fmt: skip
    gateway = Gateway(config)
    assert [t.label for t in gateway.resolve("fast")] == ["demo/a", "demo/b"]
    assert [m.id for m in gateway.models().data] == ["fast", "demo/default"]
    with pytest.raises(NotFoundError, match="model 'nope' not found"):
        gateway.resolve("nope")
    with pytest.raises(NotFoundError):
        gateway.resolve("unknownprovider/x")


async def test_fallback_moves_past_failing_deployment() -> None:
    config = msgspec.convert(
        {"models": [{"name": "m", "deployments": [
            {"provider": "demo", "model": "status-503"}, {"provider": "demo", "model": "ok"}]}]},
        Config,
    )  # fmt: skip
    gateway = Gateway(config)
    target, completion = await gateway.chat(request(model="m"))
    assert target.model == "ok" and completion.choices[0].message.content
    target, _ = await gateway.stream(request(model="m", stream=True))
    assert target.model == "ok"


async def test_client_errors_do_not_fall_back_and_last_error_wins() -> None:
    gateway = Gateway(default_config())
    with pytest.raises(RateLimitError) as caught:
        await gateway.chat(request(model="demo/status-429"))
    assert caught.value.retry_after_header() == "1"
    with pytest.raises(InvalidRequestError):
        await gateway.chat(request(model="demo/status-400"))


async def test_failure_injection_rate() -> None:
    gateway = Gateway(with_demo(failure_rate=0.5, seed=7))
    failures = 0
    for _ in range(400):
        try:
            await gateway.chat(request())
        except ServiceUnavailableError:
            failures += 1
    assert 140 < failures < 260


def test_decode_errors_are_400_with_msgspec_words() -> None:
    gateway = Gateway(default_config())
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        gateway.decode_chat(b"{nope")
    with pytest.raises(InvalidRequestError, match="missing required field `messages`"):
        gateway.decode_chat(b'{"model": "demo/x"}')
    with pytest.raises(InvalidRequestError, match="temperature"):
        gateway.decode_chat(b'{"model": "m", "messages": [{"role": "user"}], "temperature": 9}')
    parsed = gateway.decode_chat(
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2}}'
    )
    assert parsed.request.messages == [Message(role="user", content="x")]
    assert parsed.extras == {"logit_bias": {"1": 2}}


def test_auth_accepts_master_and_virtual_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_MASTER", "master-secret")
    monkeypatch.setenv("T_TEAM", "team-secret")
    config = msgspec.convert(
        {"server": {"master_key_env": "T_MASTER"},
         "keys": [{"name": "team-a", "key_env": "T_TEAM"}]},
        Config,
    )  # fmt: skip
    gateway = Gateway(config)
    assert gateway.authenticate("Bearer master-secret") == "master"
    assert gateway.authenticate("bearer team-secret") == "team-a"
    for header in (None, "", "Bearer", "Basic team-secret", "Bearer wrong", "Bearer ünïcode"):
        with pytest.raises(AuthenticationError) as caught:
            gateway.authenticate(header)
        assert "secret" not in caught.value.message


def test_auth_off_without_keys_and_missing_env_is_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Gateway(default_config()).authenticate(None) is None
    monkeypatch.delenv("T_UNSET", raising=False)
    config = msgspec.convert({"server": {"master_key_env": "T_UNSET"}}, Config)
    with pytest.raises(ConfigError, match="T_UNSET is not set"):
        Gateway(config)


def test_error_for_status_keeps_meaning() -> None:
    assert error_for_status(429, "slow down", retry_after=2.2).retry_after_header() == "3"
    assert error_for_status(418, "teapot").status == 418
    assert error_for_status(500, "boom").status == 502
    assert error_for_status(504, "late").code == "upstream_timeout"
    body = error_for_status(401, "bad key").body()
    assert body["error"]["type"] == "authentication_error"

"""``llmkit chat``, ``llmkit models`` and ``llmkit state`` against a real server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server
from tests.test_cli import llmkit

pytestmark = pytest.mark.multiprocess

MASTER = "sk-cli-master"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = (
        '[server]\nmaster_key_env = "LLMKIT_T_CLI_MASTER"\n'
        '[[models]]\nname = "fast"\n[[models.deployments]]\nprovider = "demo"\nmodel = "x"\n'
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LLMKIT_T_CLI_MASTER", MASTER)
        running = Server(tmp_path_factory.mktemp("cli"), config)
    yield running
    assert running.stop() == 0


def expected_answer(server: Server, model: str, prompt: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    headers = {"Authorization": f"Bearer {MASTER}"}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
    content: str = reply.json()["choices"][0]["message"]["content"]
    return content


def test_chat_streams_the_answer_over_the_socket_and_http(server: Server) -> None:
    answer = expected_answer(server, "demo/x", "say hi")
    by_socket = llmkit("chat", "-m", "demo/x", "say hi", "--socket", server.uds, "--key", MASTER)
    assert by_socket.returncode == 0, by_socket.stderr
    assert by_socket.stdout == answer + "\n"
    env = {"LLMKIT_URL": server.url, "LLMKIT_API_KEY": MASTER}
    by_url = llmkit("chat", "-m", "fast", "say hi", "--no-stream", env=env)
    assert by_url.returncode == 0 and by_url.stdout.strip() == expected_answer(
        server, "fast", "say hi"
    )


def test_models_lists_aliases_and_demo(server: Server) -> None:
    env = {"LLMKIT_SOCKET": server.uds, "LLMKIT_API_KEY": MASTER}
    result = llmkit("models", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fast", "demo/default"]


def test_exit_codes(server: Server) -> None:
    clean = {k: "" for k in ("LLMKIT_SOCKET", "LLMKIT_URL", "LLMKIT_API_KEY") if k in os.environ}
    assert llmkit("chat", "-m", "demo/x", "hi", env=clean).returncode == 2
    assert llmkit("chat", "hi").returncode == 2  # no --model: argparse's usage error
    refused = llmkit("models", "--socket", server.uds)
    assert refused.returncode == 1 and "401" in refused.stderr
    missing = llmkit("chat", "-m", "nope/x", "hi", "--socket", server.uds, "--key", MASTER)
    assert missing.returncode == 1 and "model 'nope/x' not found" in missing.stderr
    gone = llmkit("models", "--socket", server.uds + ".missing")
    assert gone.returncode == 1 and "is the server running" in gone.stderr


def test_state_prints_breakers_limits_and_workers(server: Server) -> None:
    expected_answer(server, "fast", "warm up")
    result = llmkit("state", "--url", server.url, env={"LLMKIT_MASTER_KEY": MASTER})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["DEPLOYMENT", "BREAKER"]
    assert lines[1].split()[:2] == ["fast#0", "closed"]
    assert any(line.startswith("global ") for line in lines)
    assert sum(1 for line in lines if line.split()[-1:] and "serving" in line) == 2
    refused = llmkit("state", "--url", server.url, "--key", "wrong")
    assert refused.returncode == 1 and "401" in refused.stderr
    assert llmkit("state", env={"LLMKIT_URL": ""}).returncode == 2


def test_help_everywhere() -> None:
    for command in (["chat"], ["models"], ["state"], ["providers"], ["config", "check"]):
        result = llmkit(*command, "--help")
        assert result.returncode == 0 and "usage: llmkit" in result.stdout

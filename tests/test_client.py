"""``llmkit.Client`` and ``llmkit.AsyncClient`` against a real ``llmkit-serve --uds``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from llmkit import AsyncClient, Client, client
from llmkit.types import ChatCompletion, chunk_decoder, completion_decoder
from tests.conftest import Server, StartServer

pytestmark = pytest.mark.multiprocess

HI = [{"role": "user", "content": "hello there"}]
VOLATILE = ("id", "created")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("client"))
    yield running
    assert running.stop() == 0


def stable(value: Any) -> Any:
    """A result as builtins, without the fields that differ between two calls."""
    data = msgspec.to_builtins(value)
    for field in VOLATILE:
        data.pop(field, None)
    return data


def http_post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=10)


def http_stream(server: Server, body: dict[str, Any]) -> list[Any]:
    response = http_post(server, "/v1/chat/completions", {**body, "stream": True})
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [stable(chunk_decoder.decode(e)) for e in events[:-1]]


def test_sync_client_results_equal_the_http_api(server: Server) -> None:
    body = {"model": "demo/equal", "messages": HI}
    with Client(server.uds) as c:
        reply = c.chat.completions.create(**body)
        assert isinstance(reply, ChatCompletion)
        http = completion_decoder.decode(http_post(server, "/v1/chat/completions", body).content)
        assert stable(reply) == stable(http)
        chunks = [stable(ch) for ch in c.chat.completions.create(**body, stream=True)]
        assert chunks == http_stream(server, body)
        embedded = c.embeddings.create(model="demo/e", input=["a", "b"])
        http_embedded = http_post(
            server, "/v1/embeddings", {"model": "demo/e", "input": ["a", "b"]}
        )
        assert msgspec.to_builtins(embedded) == http_embedded.json()
        models = httpx.get(f"{server.url}/v1/models").json()
        assert msgspec.to_builtins(c.models.list()) == models


async def test_async_client_results_equal_the_http_api(server: Server) -> None:
    body = {"model": "demo/equal-async", "messages": HI}
    async with AsyncClient(server.uds) as c:
        reply = await c.chat.completions.create(**body)
        http = completion_decoder.decode(http_post(server, "/v1/chat/completions", body).content)
        assert stable(reply) == stable(http)
        stream = await c.chat.completions.create(**body, stream=True)
        assert [stable(ch) async for ch in stream] == http_stream(server, body)
        embedded = await c.embeddings.create(model="demo/e", input="x")
        http_embedded = http_post(server, "/v1/embeddings", {"model": "demo/e", "input": "x"})
        assert msgspec.to_builtins(embedded) == http_embedded.json()
        assert [m.id for m in (await c.models.list()).data][-1] == "demo/default"
        assert (await c.health())["status"] == "ok"


def test_http_mode_has_the_same_surface(server: Server) -> None:
    body = {"model": "demo/h", "messages": HI}
    with Client(server.uds) as uds, Client(base_url=server.url) as http:
        assert stable(uds.chat.completions.create(**body)) == stable(
            http.chat.completions.create(**body)
        )
        uds_chunks = [stable(ch) for ch in uds.chat.completions.create(**body, stream=True)]
        assert uds_chunks == [
            stable(ch) for ch in http.chat.completions.create(**body, stream=True)
        ]
        assert http.models.list() == uds.models.list()
        with pytest.raises(client.NotFoundError):
            http.chat.completions.create(model="nope/x", messages=HI)


@pytest.mark.parametrize("base", ["uds", "http"])
def test_errors_mirror_the_http_statuses(server: Server, base: str) -> None:
    where: dict[str, Any] = {"path": server.uds} if base == "uds" else {"base_url": server.url}
    with Client(**where) as c:
        with pytest.raises(client.NotFoundError) as missing:
            c.chat.completions.create(model="nope/x", messages=HI)
        assert missing.value.status == 404 and missing.value.code == "model_not_found"
        with pytest.raises(client.RateLimitError) as limited:
            c.chat.completions.create(model="demo/status-429", messages=HI)
        assert limited.value.retry_after is not None and limited.value.retry_after >= 1
        with pytest.raises(client.InvalidRequestError):
            c.chat.completions.create(model="demo/x", messages=[])
        with pytest.raises(client.ServiceUnavailableError):
            c.chat.completions.create(model="demo/status-503", messages=HI, stream=True)
        # The connection survives errors: the next call on it succeeds.
        assert c.chat.completions.create(model="demo/x", messages=HI).choices


async def test_200_concurrent_streams_share_one_connection_unmixed(server: Server) -> None:
    async with AsyncClient(server.uds) as c:

        async def one(i: int) -> tuple[str, set[str], str]:
            messages = [{"role": "user", "content": f"stream number {i}"}]
            expected = await c.chat.completions.create(model=f"demo/m{i}", messages=messages)
            stream = await c.chat.completions.create(
                model=f"demo/m{i}", messages=messages, stream=True
            )
            text, ids = [], set()
            async for chunk in stream:
                ids.add(chunk.id)
                assert chunk.model == f"demo/m{i}"
                text += [d for ch in chunk.choices if isinstance(d := ch.delta.content, str)]
            return "".join(text), ids, expected.choices[0].message.content or ""

        results = await asyncio.gather(*(one(i) for i in range(200)))
        conn = await c._transport.connection()  # type: ignore[attr-defined]
        assert conn is await c._transport.connection()  # type: ignore[attr-defined]
    for text, ids, expected in results:
        assert text == expected and len(ids) == 1
    assert len({next(iter(ids)) for _, ids, _ in results}) == 200


def test_sync_client_is_thread_safe(server: Server) -> None:
    errors: list[BaseException] = []
    with Client(server.uds) as c:

        def work(n: int) -> None:
            try:
                for _ in range(20):
                    reply = c.chat.completions.create(model=f"demo/t{n}", messages=HI)
                    assert reply.model == f"demo/t{n}"
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors


def test_timeout_raises_and_cancels(start_server: StartServer) -> None:
    server = start_server("[demo]\nlatency_ms = 2000\n", workers=1)
    with Client(server.uds, timeout=0.2) as c:
        started = time.monotonic()
        with pytest.raises(client.APITimeoutError):
            c.chat.completions.create(model="demo/slow", messages=HI)
        assert time.monotonic() - started < 1.5
        assert c.models.list().data


def test_restart_while_idle_then_the_next_call_succeeds(tmp_path: Path) -> None:
    first = Server(tmp_path)
    try:
        with Client(first.uds) as c:
            before = c.health()["pid"]
            assert first.stop() == 0
            second = Server(tmp_path)
            try:
                assert c.chat.completions.create(model="demo/x", messages=HI).choices
                assert c.health()["pid"] != before
            finally:
                second.stop()
    finally:
        first.stop()


def test_killed_mid_stream_raises_a_connection_error(start_server: StartServer) -> None:
    server = start_server("[demo]\nchunk_interval_ms = 50\nmax_tokens = 200\n", workers=2)
    with Client(server.uds, timeout=10) as c:
        stream = c.chat.completions.create(model="demo/long", messages=HI, stream=True)
        next(stream)
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(client.APIConnectionError, match="lost"):
            for _ in stream:
                pass
        assert time.monotonic() - started < 5


def test_auth_uses_the_key_from_the_hello(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMKIT_T_UDS_MASTER", "sk-uds-test")
    server = start_server('[server]\nmaster_key_env = "LLMKIT_T_UDS_MASTER"\n', workers=1)
    with Client(server.uds) as anonymous, pytest.raises(client.AuthenticationError):
        anonymous.models.list()
    with Client(server.uds, api_key="wrong") as wrong, pytest.raises(client.AuthenticationError):
        wrong.models.list()
    monkeypatch.setenv("LLMKIT_SOCKET", server.uds)
    monkeypatch.setenv("LLMKIT_API_KEY", "sk-uds-test")
    with Client.from_env() as keyed:
        assert keyed.models.list().data


def test_client_without_permission_gets_a_clear_error(server: Server) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    code = (
        "import os, sys\n"
        "from llmkit.client import Client, APIConnectionError\n"
        "c = Client(sys.argv[1])\n"
        "os.setgid(65534); os.setuid(65534)  # imports done: nobody cannot read them\n"
        "try:\n    c.models.list()\n"
        "except APIConnectionError as e:\n    print(e); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    result = subprocess.run(
        [sys.executable, "-c", code, server.uds], capture_output=True, text=True, env=env,
        timeout=30, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "permission denied" in result.stdout


def test_requests_over_the_socket_are_counted(server: Server) -> None:
    with Client(server.uds) as c:
        c.models.list()
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'llmkit_http_requests_total{route="models",status="200"}' in metrics


def test_chat_and_embeddings_over_the_socket_are_counted_like_http(
    start_server: StartServer,
) -> None:
    """Per deployment, with their tokens, exactly: what a dashboard of /metrics shows
    must not depend on which surface the requests came in by."""
    from prometheus_client.parser import text_string_to_metric_families

    server = start_server("", workers=2)
    tokens = {"input": 0, "output": 0}
    with Client(server.uds) as c:
        for n in range(6):
            answer = c.chat.completions.create(model="demo/fast", messages=HI, max_tokens=n + 1)
            assert answer.usage is not None
            tokens["input"] += answer.usage.prompt_tokens
            tokens["output"] += answer.usage.completion_tokens
        for _ in c.chat.completions.create(
            model="demo/fast", messages=HI, max_tokens=3, stream=True
        ):
            pass
        tokens["output"] += 3
        tokens["input"] += answer.usage.prompt_tokens  # same prompt, same count
        embedded = c.embeddings.create(model="demo/embed", input="hello")
        tokens["input"] += embedded.usage.prompt_tokens
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
        for s in family.samples
    }
    demo = (("deployment", "demo/*"), ("model", "demo/*"), ("provider", "demo"))
    ok = (("route", "chat"), ("status_class", "2xx"))
    assert samples["llmkit_requests_total", tuple(sorted(demo + ok))] == 7
    ok = (("route", "embeddings"), ("status_class", "2xx"))
    assert samples["llmkit_requests_total", tuple(sorted(demo + ok))] == 1
    for direction, count in tokens.items():
        labels = tuple(sorted((*demo, ("direction", direction))))
        assert samples["llmkit_tokens_total", labels] == count


def test_no_socket_is_a_clear_connection_error(tmp_path: Path) -> None:
    with (
        Client(str(tmp_path / "missing.sock")) as c,
        pytest.raises(client.APIConnectionError, match="is the server"),
    ):
        c.models.list()  # fmt: skip
    with pytest.raises(ValueError, match="exactly one"):
        Client()


def test_sigterm_lets_a_stream_in_flight_finish(start_server: StartServer) -> None:
    server = start_server("[demo]\nchunk_interval_ms = 20\nmax_tokens = 30\n", workers=1)
    with Client(server.uds) as c:
        expected = c.chat.completions.create(model="demo/drain", messages=HI)
        stream = c.chat.completions.create(model="demo/drain", messages=HI, stream=True)
        first = next(stream)
        server.signal(signal.SIGTERM)
        rest = list(stream)
    text = "".join(
        d for ch in [first, *rest] for choice in ch.choices
        if isinstance(d := choice.delta.content, str)
    )  # fmt: skip
    assert text == expected.choices[0].message.content
    assert server.proc.wait(10) == 0

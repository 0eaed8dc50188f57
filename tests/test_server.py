"""End-to-end: a real ``llmkit-serve --workers 2`` process tree on the demo provider."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, StartServer

pytestmark = pytest.mark.multiprocess

HELLO = [{"role": "user", "content": "hello"}]


def chat(server: Server, **body: object) -> httpx.Response:
    payload = {"model": "demo/fast", "messages": HELLO, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=10)


def sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_health_models_and_demo_chat(server: Server) -> None:
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["pid"] in server.worker_pids()
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and "demo/default" in [m["id"] for m in models["data"]]

    response = chat(server, max_tokens=5)
    assert response.status_code == 200
    assert response.headers["x-llmkit-provider"] == "demo"
    assert response.headers["x-request-id"]
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert len(body["choices"][0]["message"]["content"].split()) == 5
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_stream_is_openai_chunks_ending_in_done(server: Server) -> None:
    response = chat(server, stream=True, max_tokens=4, stream_options={"include_usage": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == chat(server, max_tokens=4).json()["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_openai_sdk_sync_and_async(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(model="demo/fast", messages=HELLO)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 16
    stream = client.chat.completions.create(model="demo/fast", messages=HELLO, stream=True)  # type: ignore[arg-type]
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == completion.choices[0].message.content
    assert [m.id for m in client.models.list()] == ["demo/default"]

    async def run_async() -> str:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        parts = []
        async with aclient:
            stream = await aclient.chat.completions.create(
                model="demo/fast",
                messages=HELLO,
                stream=True,  # type: ignore[arg-type]
            )
            async for chunk in stream:
                parts.extend(c.delta.content or "" for c in chunk.choices)
        return "".join(parts)

    import asyncio

    assert asyncio.run(run_async()) == streamed


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b'{"model": "demo/fast"}', 400, "invalid_request"),
        (b'{"model": "demo/fast", "messages": "hi"}', 400, "invalid_request"),
        (b'{"model": "nope/x", "messages": [{"role": "user", "content": "x"}]}', 404,
         "model_not_found"),
        (b'{"model": "demo/fast", "messages": [{"role": "user", "content": "%s"}]}' % (b"x" * 4096),
         413, "request_too_large"),
    ],
)  # fmt: skip
def test_bad_input_gets_openai_error_and_worker_survives(
    start_server: StartServer, body: bytes, status: int, code: str
) -> None:
    server: Server = start_server("[server]\nmax_body_bytes = 2048\n", workers=1)
    pid = server.health_pid()
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == code
    assert server.health_pid() == pid  # same worker, still serving


def test_upstream_status_maps_with_retry_after(server: Server) -> None:
    response = chat(server, model="demo/status-429")
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert chat(server, model="demo/status-503").status_code == 503


def test_metrics_aggregate_every_worker_exactly(server: Server) -> None:
    sent = 40
    for _ in range(sent):
        assert httpx.get(f"{server.url}/health").status_code == 200
    for _ in range(3):
        chat(server, model="unknown/x")
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    }
    samples = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["llmkit_http_requests"].samples
        if s.name.endswith("_total")
    }
    assert samples[("health", "200")] == sent
    assert samples[("chat", "404")] == 3
    assert families["llmkit_workers"].samples[0].value == 2
    assert len(server.worker_pids()) == 2


def test_sigkill_worker_is_replaced_and_state_survives(server: Server) -> None:
    pids = server.wait_workers(2)
    for _ in range(10):
        chat(server)
    victim, survivor = sorted(pids)
    failures: list[BaseException] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            try:  # a fresh connection each time: any live worker may take it
                assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(exc)
            time.sleep(0.01)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        new = server.wait_workers(2, exclude={victim}, timeout=5) - {survivor}
        replaced_in = time.monotonic() - killed_at
    finally:
        stop.set()
        asker.join()
    assert len(new) == 1 and replaced_in < 2.0, replaced_in
    assert survivor in server.worker_pids()
    assert not failures, failures[:3]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'llmkit_http_requests_total{route="chat",status="200"} 10.0' in metrics
    assert "llmkit_worker_restarts_total 1.0" in metrics


def health_pids_of_a_burst(server: Server, connections: int) -> list[int]:
    """Open ``connections`` at once, then ask /health on each: which worker took each."""
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
             for _ in range(connections)]  # fmt: skip
    try:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        pids = []
        for sock in socks:
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            pids.append(json.loads(body)["pid"])
        return pids
    finally:
        for sock in socks:
            sock.close()


def listeners(pid: int, port: int) -> int:
    """How many TCP sockets listening on ``port`` process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
        listening += local_port == port and state == "0A" and inode in inodes
    return listening


def test_reuse_port_gives_each_worker_its_own_listener(start_server: StartServer) -> None:
    """server.reuse_port: the supervisor only holds the port, each worker listens on its
    own socket, a burst of connections reaches both workers (the kernel hashes each to
    one listener: all 32 on one would be a 1 in 2**31 event), and a killed worker's
    replacement binds its own again."""
    server: Server = start_server("[server]\nreuse_port = true\n")
    pids = server.wait_workers(2)
    assert listeners(server.proc.pid, server.port) == 0
    assert all(listeners(pid, server.port) == 1 for pid in pids)
    assert set(health_pids_of_a_burst(server, 32)) == pids

    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    new = server.wait_workers(2, exclude={victim}, timeout=10)
    assert all(listeners(pid, server.port) == 1 for pid in new)
    assert set(health_pids_of_a_burst(server, 32)) == new
    assert chat(server).status_code == 200


def test_by_default_workers_share_the_supervisors_socket(start_server: StartServer) -> None:
    """Without reuse_port, the one listening socket is the supervisor's, shared by the
    workers (a stalled worker strands no connection on a socket of its own). How they
    share out a burst (``workers.accept``) is measured in bench/serve_bench.py: the
    split depends on timing a loaded machine does not keep."""
    server: Server = start_server(workers=1)
    (pid,) = server.wait_workers(1)
    assert listeners(server.proc.pid, server.port) == 1
    assert listeners(pid, server.port) == 1  # the same socket, inherited


@pytest.mark.parametrize(
    ("config", "scrape"),
    [("", {1}), ("[server]\nreuse_port = true\n", {0, 1})],
    ids=["shared socket", "reuse_port"],
)
def test_each_worker_counts_its_open_connections(
    start_server: StartServer, config: str, scrape: set[int]
) -> None:
    """``llmkit_worker_connections`` (the count the shared socket's accept compares)
    follows connections as they open and close, however the worker accepts them. The
    /metrics request's own connection is in it: on the shared socket the count is
    written as each connection is accepted; with reuse_port only at each heartbeat, so
    a scrape may come before the beat that counts it."""
    server: Server = start_server(config, workers=1)
    server.wait_workers(1)
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    assert wait_for(lambda: worker_connections(server) - 5 in scrape), worker_connections(server)
    for sock in socks:
        sock.close()
    assert wait_for(lambda: worker_connections(server) in scrape), worker_connections(server)


def worker_connections(server: Server) -> float:
    """The one worker's ``llmkit_worker_connections``, asked over a new connection."""
    text = httpx.get(f"{server.url}/metrics", headers={"Connection": "close"}).text
    (family,) = (f for f in text_string_to_metric_families(text)
                 if f.name == "llmkit_worker_connections")  # fmt: skip
    (sample,) = family.samples
    return sample.value


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_sigterm_drains_stream_and_cleans_up(start_server: StartServer) -> None:
    server: Server = start_server("[demo]\nchunk_interval_ms = 100\n")
    assert stat.S_IMODE(os.stat(server.uds).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(f"/dev/shm{server.shm_name}").st_mode) == 0o600
    payload = {"model": "demo/fast", "messages": HELLO, "stream": True, "max_tokens": 15}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=payload) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        server.signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    assert rest[-1] == "data: [DONE]" and len(rest) == 15 + 2
    assert server.proc.wait(30) == 0
    assert not Path(server.uds).exists()
    assert not Path(f"/dev/shm{server.shm_name}").exists()


def test_stalled_worker_is_killed_and_replaced(start_server: StartServer) -> None:
    server: Server = start_server("[server]\nheartbeat_timeout_s = 1.0\n")
    pids = server.wait_workers(2)
    victim = min(pids)
    os.kill(victim, signal.SIGSTOP)
    new = server.wait_workers(2, exclude={victim}, timeout=10)
    assert victim not in new
    assert "missed its heartbeat" in server.log()


def test_sighup_rolls_workers_onto_new_config(start_server: StartServer) -> None:
    server: Server = start_server("[demo]\nmax_tokens = 16\n")
    old = server.wait_workers(2)
    server.config_path.write_text("[demo]\nmax_tokens = 3\n")
    server.signal(signal.SIGHUP)
    new = server.wait_workers(2, exclude=old, timeout=15)
    assert not new & old
    for _ in range(10):
        assert chat(server).json()["usage"]["completion_tokens"] == 3


def test_reload_with_bad_config_keeps_serving(start_server: StartServer) -> None:
    server: Server = start_server()
    old = server.wait_workers(2)
    server.config_path.write_text("[server]\nbogus = 1\n")
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reload refused" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "server.bogus" in server.log()
    assert server.worker_pids() == old
    assert chat(server).status_code == 200


def test_config_error_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import serve_command

    config = tmp_path / "bad.toml"
    config.write_text("[router]\nattempts = 0\n")
    result = subprocess.run(
        [*serve_command(), "--config", str(config), "--port", "0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "router.attempts" in result.stderr and "bad.toml" in result.stderr


def test_master_key_required_when_configured(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMKIT_TEST_MASTER", "sk-test-master-123")
    config = '[server]\nmaster_key_env = "LLMKIT_TEST_MASTER"\n'
    server = start_server(config, workers=1)
    assert chat(server).status_code == 401
    bad = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "demo/x", "messages": HELLO},
        headers={"Authorization": "Bearer wrong"},
    )  # fmt: skip
    assert bad.status_code == 401 and "sk-test" not in bad.text
    good = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "demo/x", "messages": HELLO},
        headers={"Authorization": "Bearer sk-test-master-123"},
    )  # fmt: skip
    assert good.status_code == 200
    assert "sk-test-master-123" not in server.log()


def test_oversized_header_gets_an_openai_style_431(server: Server) -> None:
    pid = server.health_pid()
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "demo/x", "messages": HELLO},
        headers={"x-padding": "p" * 20_000},
    )  # fmt: skip
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_too_large"
    assert "p" * 100 not in server.log()  # the header's content is never logged
    assert server.health_pid() in server.worker_pids() and pid in server.worker_pids()


def test_unparseable_request_gets_a_json_400(server: Server) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nBroken header line\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400"  # aiohttp answers a broken request as HTTP/1.0
    assert json.loads(body)["error"]["type"] == "invalid_request_error"

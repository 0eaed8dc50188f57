"""The multiplexer across real worker processes: one upstream call for identical
requests spread over two workers, owner death, accounting.

Each client is an aiohttp session with a single connection, so its ``/health`` answer
tells which worker serves it; that is how tests put followers on the other worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import Server, StartServer
from tests.test_multiplexer import PacedMock

pytestmark = pytest.mark.multiprocess

TEXT = " ".join(f"w{i}" for i in range(15))
BODY = {"model": "local/m", "messages": [{"role": "user", "content": TEXT}], "seed": 7,
        "stream": True}  # fmt: skip


@pytest.fixture
def mock() -> Iterator[PacedMock]:
    with PacedMock() as upstream:
        yield upstream


def config_for(mock: PacedMock, extra: str = "") -> str:
    return f'[[providers]]\nname = "local"\nbase_url = "{mock.url}/v1"\n{extra}'


class Client:
    """One connection to the server, and the worker pid behind it."""

    def __init__(self, session: aiohttp.ClientSession, pid: int) -> None:
        self.session = session
        self.pid = pid


async def clients_on(server: Server, per_worker: int, workers: int = 2) -> list[Client]:
    """At least ``per_worker`` single-connection clients on each of ``workers`` workers.

    Connections open in concurrent batches: one after another, they tend to land on
    whichever worker is idle, which is always the same one.
    """
    by_pid: dict[int, list[Client]] = {}
    spare: list[Client] = []

    async def connect() -> Client:
        session = aiohttp.ClientSession(
            server.url, connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=60),
        )  # fmt: skip
        async with session.get("/health") as r:
            return Client(session, (await r.json())["pid"])

    for _ in range(20):
        for client in await asyncio.gather(*(connect() for _ in range(per_worker * workers))):
            group = by_pid.setdefault(client.pid, [])
            (group if len(group) < per_worker else spare).append(client)
        if len(by_pid) == workers and all(len(g) >= per_worker for g in by_pid.values()):
            break
    await close_all(spare)
    assert len(by_pid) == workers, f"connections reached {len(by_pid)} workers only"
    return [c for group in by_pid.values() for c in group]


async def close_all(clients: list[Client]) -> None:
    await asyncio.gather(*(c.session.close() for c in clients))


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


def text_of(raw: bytes) -> str:
    out = []
    for event in events(raw):
        if event == b"data: [DONE]":
            continue
        chunk = json.loads(event[6:])
        out += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
    return "".join(out)


async def stream_once(client: Client, body: dict[str, Any]) -> tuple[str, bytes, float]:
    """(x-llmkit-dedup, the whole body, seconds from start to its first content event)."""
    started = time.monotonic()
    first = 0.0
    raw = b""
    async with client.session.post("/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for piece in r.content.iter_any():
            if not first and b'"content"' in piece:
                first = time.monotonic() - started
            raw += piece
        return r.headers.get("x-llmkit-dedup", ""), raw, first


def test_a_hundred_identical_streams_over_two_workers_make_one_upstream_call(
    start_server: StartServer, mock: PacedMock
) -> None:
    mock.delay_s = 0.5  # every client is in before the first chunk
    mock.chunk_delay_s = 0.01
    server = start_server(config_for(mock), workers=2)

    async def run() -> list[tuple[Client, tuple[str, bytes, float]]]:
        clients = await clients_on(server, 50)
        try:
            results = await asyncio.gather(*(stream_once(c, BODY) for c in clients))
            return list(zip(clients, results, strict=True))
        finally:
            await close_all(clients)

    results = asyncio.run(run())
    assert len(results) == 100
    assert len(mock.requests) == 1
    bodies = {raw for _, (_, raw, _) in results}
    assert len(bodies) == 1  # byte-identical
    assert text_of(bodies.pop()) == f"Hello from m: {TEXT}"
    roles = sorted(role for _, (role, _, _) in results)
    assert roles == ["follower"] * 99 + ["leader"]
    firsts = [first for _, (_, _, first) in results]
    print(f"first content chunk: min {min(firsts):.3f}s max {max(firsts):.3f}s")
    assert max(firsts) - min(firsts) < 1.0  # generous: a loaded machine, 100 clients in one loop
    metrics = _metrics(server)
    assert metrics["llmkit_multiplexer_leaders_total"] == 1
    assert metrics["llmkit_multiplexer_followers_total"] == 99
    assert metrics["llmkit_multiplexer_upstream_calls_avoided_total"] == 99


def test_requests_that_differ_in_an_output_field_each_get_their_own_call(
    start_server: StartServer, mock: PacedMock
) -> None:
    mock.delay_s = 0.4
    server = start_server(config_for(mock), workers=2)
    tool = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    system = [{"role": "system", "content": "be brief"}, *BODY["messages"]]  # type: ignore[list-item]
    variants = [BODY, {**BODY, "temperature": 0.2}, {**BODY, "tools": [tool]},
                {**BODY, "stop": ["w9"]}, {**BODY, "messages": system}]  # fmt: skip

    async def run() -> None:
        clients = await clients_on(server, 5)
        try:
            await asyncio.gather(*(stream_once(c, variants[i % 5]) for i, c in enumerate(clients)))
        finally:
            await close_all(clients)

    asyncio.run(run())
    assert len(mock.requests) == 5
    assert sorted(json.dumps(r.json(), sort_keys=True) for r in mock.requests) == sorted(
        json.dumps({**v, "model": "m", "stream_options": {"include_usage": True}}, sort_keys=True)
        for v in variants
    )


def test_a_late_joiner_on_the_other_worker_gets_all_twenty_chunks_in_order(
    start_server: StartServer, mock: PacedMock
) -> None:
    import threading

    mock.gate, mock.gate_at = threading.Event(), 10
    server = start_server(config_for(mock), workers=2)

    async def run() -> tuple[bytes, bytes, str]:
        clients = await clients_on(server, 1)
        leader_client, late_client = clients
        try:
            async with leader_client.session.post("/v1/chat/completions", json=BODY) as r:
                early = b""
                while early.count(b"\n\n") < 10:
                    early += await r.content.readany()
                joining = asyncio.ensure_future(stream_once(late_client, BODY))
                await asyncio.sleep(0.5)  # the late request is in and waiting on the owner
                mock.gate.set()  # type: ignore[union-attr]
                rest = await r.content.read()
            role, late, _ = await joining
            return early + rest, late, role
        finally:
            await close_all(clients)

    leader_raw, late_raw, role = asyncio.run(run())
    assert role == "follower"
    assert len(mock.requests) == 1
    assert late_raw == leader_raw
    assert len(events(late_raw)) == 21  # 20 chunks and [DONE]
    assert text_of(late_raw) == f"Hello from m: {TEXT}"


def test_when_every_client_disconnects_the_upstream_request_is_cancelled(
    start_server: StartServer, mock: PacedMock
) -> None:
    mock.chunk_delay_s = 0.2  # 20 chunks: four seconds if nobody cancels
    server = start_server(config_for(mock), workers=2)

    async def run() -> None:
        clients = await clients_on(server, 2)
        try:
            responses = [await c.session.post("/v1/chat/completions", json=BODY) for c in clients]
            for r in responses:
                await r.content.readany()
            for r in responses:
                r.close()  # drops the connection mid-stream
        finally:
            await close_all(clients)

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while mock.disconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(mock.requests) == 1
    assert mock.disconnects == 1
    assert mock.in_flight == 0


def test_killing_the_owner_mid_stream_ends_the_followers_with_an_error_event(
    start_server: StartServer, mock: PacedMock
) -> None:
    mock.chunk_delay_s = 0.2
    server = start_server(config_for(mock), workers=2)

    async def run() -> tuple[bytes, float, tuple[str, bytes, float]]:
        clients = await clients_on(server, 2)
        owner = clients[0].pid
        followers = [c for c in clients if c.pid != owner]
        try:
            leader = await clients[0].session.post("/v1/chat/completions", json=BODY)
            await leader.content.readany()
            opened = [await f.session.post("/v1/chat/completions", json=BODY) for f in followers]
            assert all(r.headers["x-llmkit-dedup"] == "follower" for r in opened)
            for r in opened:
                await r.content.readany()
            os.kill(owner, signal.SIGKILL)
            killed = time.monotonic()
            tails = await asyncio.wait_for(
                asyncio.gather(*(r.content.read() for r in opened)), timeout=10
            )
            took = time.monotonic() - killed
            again = await stream_once(followers[0], BODY)
            return tails[0], took, again
        finally:
            await close_all(clients)

    tail, took, (role, raw, _) = asyncio.run(run())
    last = events(tail)[-1]
    assert b"[DONE]" not in tail
    error = json.loads(last[6:])["error"]
    assert error["type"] == "upstream_error" and "stopped mid-stream" in error["message"]
    assert took < 5  # promptly, not a hang until some timeout
    assert role == "leader"  # the dead owner's claim was cleared: it starts afresh
    assert text_of(raw) == f"Hello from m: {TEXT}"
    assert len(mock.requests) == 2


def test_followers_pay_requests_per_minute_but_not_tokens(
    start_server: StartServer, mock: PacedMock
) -> None:
    mock.delay_s = 0.5
    # max_tokens 20 + a short prompt: the estimate is ~26 tokens, so without sharing a
    # second request would not fit in 40 tokens/min; requests/min lets 6 through.
    server = start_server(config_for(mock, "[limits]\nrpm = 6\ntpm = 40\n"), workers=2)
    body = {**BODY, "max_tokens": 20, "messages": [{"role": "user", "content": "hey"}]}

    async def run() -> list[int]:
        clients = await clients_on(server, 5)
        try:

            async def status(c: Client) -> int:
                async with c.session.post("/v1/chat/completions", json=body) as r:
                    await r.read()
                    return r.status

            return await asyncio.gather(*(status(c) for c in clients))
        finally:
            await close_all(clients)

    statuses = asyncio.run(run())
    assert sorted(statuses) == [200] * 6 + [429] * 4
    assert len(mock.requests) == 1


def test_opting_out_and_disabling(start_server: StartServer, mock: PacedMock) -> None:
    mock.delay_s = 0.3
    server = start_server(config_for(mock, '[multiplexer]\neligible = "all"\n'), workers=2)
    no_seed = {k: v for k, v in BODY.items() if k != "seed"}

    async def run(headers: dict[str, str]) -> list[str]:
        async with aiohttp.ClientSession(server.url) as s:

            async def one() -> str:
                async with s.post("/v1/chat/completions", json=no_seed, headers=headers) as r:
                    await r.read()
                    return r.headers.get("x-llmkit-dedup", "")

            return await asyncio.gather(*(one() for _ in range(4)))

    assert sorted(asyncio.run(run({}))) == ["follower"] * 3 + ["leader"]  # widened
    assert asyncio.run(run({"x-llmkit-dedup": "off"})) == [""] * 4
    assert len(mock.requests) == 1 + 4


def _metrics(server: Server) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("llmkit_multiplexer"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values

"""The control plane across real worker processes: limits, breakers and routing.

Every test runs ``llmkit-serve`` with several workers, so anything that was kept per
process instead of in shared memory shows up as a wrong count.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server, StartServer
from tests.mocks.base import Fault
from tests.mocks.openai import OpenAIMock

pytestmark = pytest.mark.multiprocess

# Three characters: the gateway's estimate (len // 4 + 1 + max_tokens) equals the demo's
# reported usage (max(1, len // 4) + max_tokens), so tokens/min needs no reconciliation.
SHORT = [{"role": "user", "content": "hey"}]
MASTER = {"Authorization": "Bearer sk-admin-test"}


async def _burst(
    url: str, body: dict[str, object], count: int, headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/v1/chat/completions", json=body) for _ in range(count))
        )


def burst(
    server: Server, body: dict[str, object], count: int, headers: dict[str, str] | None = None
) -> Counter[int]:
    responses = asyncio.run(_burst(server.url, body, count, headers))
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
    return Counter(r.status_code for r in responses)


def demo_alias(limits: str) -> str:
    deployment = '[[models.deployments]]\nprovider = "demo"\nmodel = "x"\n'
    return f'[[models]]\nname = "m"\n{deployment}{limits}\n'


@pytest.mark.parametrize("workers", [2, 4])
def test_requests_per_minute_are_exact_across_workers(
    start_server: StartServer, workers: int
) -> None:
    server = start_server(demo_alias("rpm = 60"), workers=workers)
    counts = burst(server, {"model": "m", "messages": SHORT, "max_tokens": 1}, 300)
    assert counts == {200: 60, 429: 240}


def test_tokens_per_minute_are_exact_across_workers(start_server: StartServer) -> None:
    server = start_server(demo_alias("tpm = 550"), workers=2)
    counts = burst(server, {"model": "m", "messages": SHORT, "max_tokens": 10}, 120)
    assert counts == {200: 50, 429: 70}  # 11 tokens each: 550 // 11


@pytest.fixture
def slow_mock() -> Iterator[OpenAIMock]:
    with OpenAIMock(key=None) as mock:
        mock.delay_s = 0.3
        yield mock


def test_concurrency_never_exceeds_the_limit_at_the_upstream(
    start_server: StartServer, slow_mock: OpenAIMock
) -> None:
    config = (
        f'[[providers]]\nname = "local"\nbase_url = "{slow_mock.url}/v1"\n\n'
        '[[models]]\nname = "m"\n[[models.deployments]]\nprovider = "local"\n'
        'model = "gpt"\nmax_concurrency = 5\n'
    )
    server = start_server(config, workers=2)
    counts = burst(server, {"model": "m", "messages": SHORT}, 40)
    assert slow_mock.max_in_flight == 5
    assert counts[200] >= 5 and counts[200] + counts[429] == 40
    # Every slot came back: the next wave gets the same five.
    again = burst(server, {"model": "m", "messages": SHORT}, 5)
    assert again == {200: 5}


def test_refusal_at_deployment_leaves_upper_levels_untouched(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMKIT_T_MASTER", "sk-admin-test")
    # Global: 3 requests (one back per 20 s) and 30 tokens (one back per 2 s) a minute.
    config = (
        '[server]\nmaster_key_env = "LLMKIT_T_MASTER"\n[limits]\nrpm = 3\ntpm = 30\n\n'
        + demo_alias("rpm = 1")
    )
    server = start_server(config, workers=2)
    body = {"model": "m", "messages": SHORT, "max_tokens": 5}  # 6 tokens each
    ok = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=MASTER)
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"]
    before = _levels(server)["global"]
    for _ in range(5):
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=MASTER)
        assert refused.status_code == 429
        assert "deployment:m#0" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    after = _levels(server)["global"]
    assert before["requests_remaining"] == after["requests_remaining"] == 2
    # Five leaked charges would be 30 tokens; time may give back at most one.
    assert 0 <= after["tokens_remaining"] - before["tokens_remaining"] <= 1  # type: ignore[operator]


def _levels(server: Server) -> dict[str, object]:
    state = httpx.get(f"{server.url}/admin/state", headers=MASTER).json()
    return {entry["name"]: entry for entry in state["limits"]}


def two_deployments(a_url: str, b_url: str, extra_a: str = "", extra_b: str = "") -> str:
    return (
        f'[[providers]]\nname = "a"\nbase_url = "{a_url}/v1"\n\n'
        f'[[providers]]\nname = "b"\nbase_url = "{b_url}/v1"\n\n'
        '[[models]]\nname = "m"\n'
        f'[[models.deployments]]\nprovider = "a"\nmodel = "gpt-a"\n{extra_a}\n'
        f'[[models.deployments]]\nprovider = "b"\nmodel = "gpt-b"\n{extra_b}\n'
    )


@pytest.fixture
def pair() -> Iterator[tuple[OpenAIMock, OpenAIMock]]:
    with OpenAIMock(key=None) as a, OpenAIMock(key=None) as b:
        yield a, b


def test_breaker_opens_falls_back_probes_once_and_recovers(
    start_server: StartServer, pair: tuple[OpenAIMock, OpenAIMock], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    monkeypatch.setenv("LLMKIT_T_MASTER", "sk-admin-test")
    config = (
        '[server]\nmaster_key_env = "LLMKIT_T_MASTER"\n'
        # "cost" keeps the cheap deployment a first for as long as its breaker allows.
        '[router]\nprofile = "cost"\nbackoff_base_s = 0.0\nbackoff_max_s = 0.0\n'
        "[breaker]\nmin_requests = 5\nerror_rate = 0.5\nwindow_s = 30\nopen_s = 3.0\n"
        "half_open_probes = 1\nconsecutive_failures = 1000\n\n"
        + two_deployments(a.url, b.url, "input_cost_per_mtok = 0.1", "input_cost_per_mtok = 9.0")
    )
    server = start_server(config, workers=2)
    a.faults.append(Fault("status", status=500, times=10_000))
    body = {"model": "m", "messages": SHORT}
    url = f"{server.url}/v1/chat/completions"
    statuses = [httpx.post(url, json=body, headers=MASTER).status_code for _ in range(30)]
    assert set(statuses) == {200}  # every failure on a fell back to b
    tried_a = len(a.requests)
    assert 5 <= tried_a <= 7  # min_requests, plus what raced past across two workers
    for _ in range(20):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=MASTER)
    assert len(a.requests) == tried_a  # open: no attempt on a at all
    time.sleep(3.2)  # past open_s: half-open
    asyncio.run(_burst(server.url, body, 20, MASTER))
    assert len(a.requests) == tried_a + 1  # exactly one probe across both workers
    a.faults.clear()
    time.sleep(3.2)
    for _ in range(10):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=MASTER)
    state = httpx.get(f"{server.url}/admin/state", headers=MASTER).json()
    assert state["breakers"][0]["state"] == "closed"
    assert len(a.requests) > tried_a + 1


def test_latency_profile_prefers_the_fast_deployment(
    start_server: StartServer, pair: tuple[OpenAIMock, OpenAIMock]
) -> None:
    fast, slow = pair
    fast.delay_s, slow.delay_s = 0.02, 0.2
    server = start_server('[router]\nprofile = "latency"\n' + two_deployments(slow.url, fast.url))
    body = {"model": "m", "messages": SHORT}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(20):  # warm both up
            client.post("/v1/chat/completions", json=body)
        before_fast, before_slow = len(fast.requests), len(slow.requests)
        for _ in range(40):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    to_fast = len(fast.requests) - before_fast
    to_slow = len(slow.requests) - before_slow
    assert to_fast / (to_fast + to_slow) >= 0.9, (to_fast, to_slow)


def test_cost_profile_prefers_the_cheap_deployment_and_moves_when_it_fails(
    start_server: StartServer, pair: tuple[OpenAIMock, OpenAIMock]
) -> None:
    dear, cheap = pair
    router = '[router]\nprofile = "cost"\nbackoff_base_s = 0.0\nbackoff_max_s = 0.0\n'
    config = router + two_deployments(
        dear.url, cheap.url, "input_cost_per_mtok = 10.0\noutput_cost_per_mtok = 30.0",
        "input_cost_per_mtok = 0.1\noutput_cost_per_mtok = 0.3",
    )  # fmt: skip
    server = start_server(config)
    body = {"model": "m", "messages": SHORT}
    asyncio.run(_burst(server.url, body, 40))
    assert len(cheap.requests) / (len(cheap.requests) + len(dear.requests)) >= 0.9
    cheap.faults.append(Fault("status", status=503, times=10_000))
    responses = asyncio.run(_burst(server.url, body, 20))
    assert {r.status_code for r in responses} == {200}
    assert {r.headers["x-llmkit-deployment"] for r in responses} == {"m#0"}


def test_latency_spike_opens_the_breaker_by_zscore(
    start_server: StartServer, slow_mock: OpenAIMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMKIT_T_MASTER", "sk-admin-test")
    slow_mock.delay_s = 0.02
    config = (
        '[server]\nmaster_key_env = "LLMKIT_T_MASTER"\n'
        "[breaker]\nanomaly_min_s = 0.05\nmin_requests = 1000\nconsecutive_failures = 1000\n\n"
        f'[[providers]]\nname = "local"\nbase_url = "{slow_mock.url}/v1"\n\n'
        '[[models]]\nname = "m"\n[[models.deployments]]\nprovider = "local"\nmodel = "gpt"\n'
    )
    server = start_server(config, workers=2)
    body = {"model": "m", "messages": SHORT}
    with httpx.Client(base_url=server.url, headers=MASTER, timeout=10) as client:
        for _ in range(30):  # the EWMA learns ~20 ms
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        slow_mock.delay_s = 0.2  # ten times slower, and still answering
        statuses = [client.post("/v1/chat/completions", json=body).status_code for _ in range(8)]
        breaker = client.get("/admin/state").json()["breakers"][0]
    assert breaker["opened"] == 1 and breaker["window_failures"] == 0
    assert statuses[:5] == [200] * 5 and 503 in statuses[5:]


def test_concurrency_slots_of_a_killed_worker_are_reclaimed(
    start_server: StartServer, slow_mock: OpenAIMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrency slots, and the attempts the router sees in flight: with the second
    leaked, the cold deployment (no outcome yet) would never be picked again."""
    import os
    import signal
    import threading

    monkeypatch.setenv("LLMKIT_T_MASTER", "sk-admin-test")
    slow_mock.delay_s = 5.0
    config = (
        '[server]\nmaster_key_env = "LLMKIT_T_MASTER"\n'
        f'[[providers]]\nname = "local"\nbase_url = "{slow_mock.url}/v1"\n\n'
        '[[models]]\nname = "m"\n[[models.deployments]]\nprovider = "local"\nmodel = "gpt"\n'
        "max_concurrency = 2\n"
    )
    server = start_server(config, workers=2)
    body = {"model": "m", "messages": SHORT}

    def in_flight() -> int:
        state = httpx.get(f"{server.url}/admin/state", headers=MASTER).json()
        return int(state["breakers"][0]["in_flight"])

    def hang() -> None:
        try:
            httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=MASTER, timeout=10)
        except httpx.HTTPError:
            pass  # its worker is about to be killed

    threads = [threading.Thread(target=hang) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while slow_mock.in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert burst(server, body, 3, MASTER) == {429: 3}  # both slots are taken
    assert in_flight() == 2
    old = server.worker_pids()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    server.wait_workers(2, exclude=old)
    assert in_flight() == 0  # the dead workers' attempts are no longer "in flight"
    slow_mock.delay_s = 0.0
    assert burst(server, body, 2, MASTER) == {200: 2}  # the dead workers' slots came back
    assert in_flight() == 0
    for t in threads:
        t.join()


def test_failed_requests_give_their_tokens_back(start_server: StartServer) -> None:
    config = (
        "[limits]\ntpm = 22\n\n"  # two requests of 11 tokens
        '[[models]]\nname = "bad"\n[[models.deployments]]\nprovider = "demo"\n'
        'model = "status-503"\n\n'
        '[[models]]\nname = "good"\n[[models.deployments]]\nprovider = "demo"\nmodel = "x"\n'
    )
    server = start_server(config, workers=2)
    url = f"{server.url}/v1/chat/completions"
    failing = [httpx.post(url, json={"model": "bad", "messages": SHORT, "max_tokens": 10})
               for _ in range(5)]  # fmt: skip
    assert [r.status_code for r in failing] == [503] * 5  # none of them kept its charge
    good = [httpx.post(url, json={"model": "good", "messages": SHORT, "max_tokens": 10})
            for _ in range(3)]  # fmt: skip
    assert [r.status_code for r in good] == [200, 200, 429]


def test_embeddings_answer_with_rate_limit_headers(start_server: StartServer) -> None:
    server = start_server(demo_alias("rpm = 5"), workers=1)
    for remaining in ("4", "3"):
        answer = httpx.post(f"{server.url}/v1/embeddings", json={"model": "m", "input": "hi"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-ratelimit-limit-requests"] == "5"
        assert answer.headers["x-ratelimit-remaining-requests"] == remaining

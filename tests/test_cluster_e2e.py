"""Cluster mode across real servers: several ``llmkit-serve`` trees, one real redis-server.

Each server is a supervisor, two workers and its sync task, exactly as on separate
hosts; only Redis connects them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, StartServer
from tests.mocks.base import Fault
from tests.mocks.openai import OpenAIMock
from tests.redis_server import RedisServer, redis_server_binary

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SHORT = [{"role": "user", "content": "hey"}]
BODY = {"model": "demo/x", "messages": SHORT, "max_tokens": 1}
MASTER = {"Authorization": "Bearer sk-cluster-test"}
_names = itertools.count()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis") as server:
        yield server


def cluster_section(redis: RedisServer, extra: str = "") -> str:
    name = f"e2e{os.getpid()}-{next(_names)}"
    return f'[cluster]\nredis_url = "{redis.url}"\nname = "{name}"\n{extra}\n'


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def _spread(servers: list[Server], count: int, concurrency: int) -> Counter[int]:
    """``count`` requests, round-robin over ``servers``, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, url: str) -> int:
        async with gate:
            response = await client.post(f"{url}/v1/chat/completions", json=BODY)
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["code"] == "rate_limit_exceeded"
            return response.status_code

    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        urls = [servers[i % len(servers)].url for i in range(count)]
        return Counter(await asyncio.gather(*(one(client, url) for url in urls)))


def spread(servers: list[Server], count: int, concurrency: int = 48) -> Counter[int]:
    return asyncio.run(_spread(servers, count, concurrency))


def wait_metric(servers: list[Server], name: str, value: float, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while any(metric(s, name) != value for s in servers):
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.05)


def test_three_hosts_share_one_limit(start_server: StartServer, redis_server: RedisServer) -> None:
    config = "[limits]\nrpm = 600\n" + cluster_section(redis_server)
    servers = [start_server(config, workers=2) for _ in range(3)]
    wait_metric(servers, 'llmkit_cluster_mode{mode="synced"}', 1)
    started = time.monotonic()
    counts = spread(servers, 3000)
    elapsed = time.monotonic() - started
    admitted = counts[200]
    batch = math.ceil(600 * 0.05)
    refill = math.ceil(elapsed * 600 / 60)  # the limit's own rate during the burst
    print(
        f"\nadmitted {admitted} of 3000 in {elapsed:.2f}s: overshoot {admitted - 600} "
        f"(bound 3 x batch {batch} + refill {refill} = {3 * batch + refill})"
    )
    assert counts[200] + counts[429] == 3000
    assert 600 <= admitted <= 600 + 3 * batch + refill
    # One server alone would have admitted 600 by itself: the limit really is shared.
    leased = sum(
        metric(s, 'llmkit_cluster_leased_units_total{dimension="requests"}') for s in servers
    )
    assert all(metric(s, "llmkit_cluster_hosts") == 3 for s in servers)
    assert admitted <= leased


@pytest.fixture
def failing_mock() -> Iterator[OpenAIMock]:
    with OpenAIMock(key=None) as mock:
        mock.faults.append(Fault("status", status=500, times=1_000_000))
        yield mock


def _breaker(server: Server) -> dict[str, object]:
    state = httpx.get(f"{server.url}/admin/state", headers=MASTER, timeout=10).json()
    return {b["index"]: b for b in state["breakers"]}[0]  # type: ignore[no-any-return]


def _watch_open(server: Server, seen_open: dict[str, float], name: str) -> None:
    deadline = time.monotonic() + 15
    with httpx.Client(base_url=server.url, headers=MASTER, timeout=10) as client:
        while time.monotonic() < deadline:
            breakers = client.get("/admin/state").json()["breakers"]
            if breakers[0]["state"] == "open":
                seen_open[name] = time.monotonic() * 1000
                return
            time.sleep(0.002)


def test_a_failing_deployment_is_skipped_by_every_host(
    start_server: StartServer,
    redis_server: RedisServer,
    failing_mock: OpenAIMock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMKIT_T_MASTER", "sk-cluster-test")
    interval = 0.1
    config = (
        '[server]\nmaster_key_env = "LLMKIT_T_MASTER"\n'
        f'[[providers]]\nname = "up"\nbase_url = "{failing_mock.url}/v1"\n'
        '[[models]]\nname = "m"\n'
        '[[models.deployments]]\nprovider = "up"\nmodel = "gpt"\nweight = 1000\n'
        '[[models.deployments]]\nprovider = "demo"\nmodel = "x"\n'
        "[breaker]\nopen_s = 60\n" + cluster_section(redis_server, f"sync_interval_s = {interval}")
    )
    a, b, c = (start_server(config, workers=2) for _ in range(3))
    wait_metric([a, b, c], 'llmkit_cluster_mode{mode="synced"}', 1)
    body = {"model": "m", "messages": SHORT, "max_tokens": 1}
    # B and C are watched from before A's breaker opens, so the delay measured is the
    # propagation plus one /admin/state round trip, not the test's own sequencing.
    seen_open = {"B": 0.0, "C": 0.0}
    watchers = [
        threading.Thread(target=_watch_open, args=(host, seen_open, name), daemon=True)
        for name, host in (("B", b), ("C", c))
    ]
    for watcher in watchers:
        watcher.start()
    with httpx.Client(timeout=30, headers=MASTER) as client:
        while _breaker(a)["state"] != "open":  # A's traffic fails upstream, falls back
            assert client.post(f"{a.url}/v1/chat/completions", json=body).status_code == 200
            assert len(failing_mock.requests) < 100, "A's breaker never opened"
        opened_ms = int(_breaker(a)["since_ms"])  # type: ignore[call-overload]
        for watcher in watchers:
            watcher.join(15)
        assert all(seen_open.values()), f"not every host learnt it: {seen_open}"
        delays = {name: seen - opened_ms for name, seen in seen_open.items()}  # one clock
        print(f"\nA's breaker opening reached B in {delays['B']:.0f} ms, C in "
              f"{delays['C']:.0f} ms (sync interval {interval * 1000:.0f} ms)")  # fmt: skip
        # Published at once and pushed to subscribers: well within one sync interval,
        # plus a polling round trip and scheduling on a loaded machine.
        assert max(delays.values()) <= interval * 1000 + 150
        sent = len(failing_mock.requests)
        for host in (b, c):
            for _ in range(10):
                assert client.post(f"{host.url}/v1/chat/completions", json=body).status_code == 200
        assert len(failing_mock.requests) == sent  # B and C never tried it
    assert metric(b, "llmkit_cluster_remote_breaker_opens_total") == 1


def test_redis_down_then_back(start_server: StartServer, redis_server: RedisServer) -> None:
    # fail_open share: 600 / 4 = 150 a minute per host, so "degraded" admits visibly
    # less than "synced" (600 a minute across both).
    extra = 'hosts = 4\nfailure_policy = "fail_open"\nmax_backoff_s = 0.5\nredis_timeout_s = 0.2'
    config = "[limits]\nrpm = 600\n" + cluster_section(redis_server, extra)
    servers = [start_server(config, workers=2) for _ in range(2)]
    wait_metric(servers, "llmkit_cluster_degraded", 0)
    wait_metric(servers, 'llmkit_cluster_mode{mode="synced"}', 1)
    redis_server.kill()
    spread(servers, 20)  # traffic while it fails
    wait_metric(servers, "llmkit_cluster_degraded", 1)
    wait_metric(servers, 'llmkit_cluster_mode{mode="fail_open"}', 1)
    time.sleep(2.0)  # 2.5 a second per host of local share
    degraded = spread(servers, 600)
    print(f"\nwhile Redis was down: {dict(degraded)}")
    assert degraded[200] >= 2  # requests keep flowing
    assert degraded[200] <= 2 * (150 + 30) + 10  # the local shares, not the cluster limit
    for server in servers:
        assert server.log().count("Redis unavailable") == 1  # one line per transition
    redis_server.start()
    wait_metric(servers, "llmkit_cluster_degraded", 0)
    for server in servers:
        assert "Redis is back" in server.log()
    started = time.monotonic()
    recovered = spread(servers, 1500)
    refill = math.ceil((time.monotonic() - started) * 10)
    print(f"after Redis came back: {dict(recovered)}")
    # The restarted Redis has a full bucket again: 600 cluster-wide, not 2 x 150.
    assert 600 <= recovered[200] <= 600 + 2 * 30 + refill


# -- the sync task as a process -------------------------------------------------------


def test_the_sync_task_is_not_counted_as_a_worker(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    server = start_server("[limits]\nrpm = 600\n" + cluster_section(redis_server), workers=2)
    wait_metric([server], 'llmkit_cluster_mode{mode="synced"}', 1)
    children = server.children()
    sync = server.sync_pid()
    assert len(children) == 3 and sync is not None  # two workers and the sync task
    assert Path(f"/proc/{sync}/comm").read_text().strip() == "llmkit-sync"
    workers = server.wait_workers(2)
    assert workers == server.worker_pids() == set(children) - {sync}
    # Replacing a worker is seen as such, with the sync task still running beside it.
    victim = min(workers)
    os.kill(victim, 9)
    replaced = server.wait_workers(2, exclude={victim}, timeout=20)
    assert victim not in replaced and sync not in replaced
    assert server.sync_pid() == sync


def test_a_killed_sync_task_is_respawned_and_leases_resume(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    config = "[limits]\nrpm = 600\n" + cluster_section(redis_server)  # batch 30
    server = start_server(config, workers=2)
    wait_metric([server], 'llmkit_cluster_mode{mode="synced"}', 1)
    workers = server.wait_workers(2)
    first = server.sync_pid()
    assert first is not None
    leased_name = 'llmkit_cluster_leased_units_total{dimension="requests"}'
    os.kill(first, 9)
    deadline = time.monotonic() + 20
    while (second := server.sync_pid()) in (None, first):
        assert time.monotonic() < deadline, "the sync task was not respawned"
        time.sleep(0.02)
    assert "cluster sync task pid" in server.log()
    wait_metric([server], 'llmkit_cluster_mode{mode="synced"}', 1)
    leased = metric(server, leased_name)
    # More than one batch (30): only new leases from the new task can admit them all.
    # Waves, not one burst: how fast leases follow demand depends on the machine's load.
    admitted, deadline = 0, time.monotonic() + 20
    while admitted < 60:
        assert time.monotonic() < deadline, f"only {admitted} admitted: leases did not resume"
        counts = spread([server], 20, concurrency=4)
        assert counts[200] + counts[429] == 20
        admitted += counts[200]
        time.sleep(0.05)
    assert metric(server, leased_name) >= leased + admitted - 30
    assert server.sync_pid() == second and server.worker_pids() == workers  # no worker lost


def _bucket(redis: RedisServer, key: str) -> tuple[float, int]:
    """A cluster bucket as (tokens, µs of its last change); a missing key is full."""
    tokens, stamp = redis.client().hmget(key, "t", "ts")
    assert tokens is not None and stamp is not None, f"{key} is full or missing"
    return float(tokens), int(stamp)


def test_sigterm_gives_unused_budget_back(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    # batch 300, reserve 75, refill 10 a second: the held budget is large enough to see
    # in Redis, and the bucket stays far from full (a full bucket is deleted).
    name = f"drain{os.getpid()}-{next(_names)}"
    config = (
        "[limits]\nrpm = 600\n"
        f'[cluster]\nredis_url = "{redis_server.url}"\nname = "{name}"\nbatch_fraction = 0.5\n'
    )
    server = start_server(config, workers=2)
    wait_metric([server], 'llmkit_cluster_mode{mode="synced"}', 1)
    admitted = spread([server], 400, concurrency=16)[200]
    assert admitted >= 300
    key = f"{{llmkit:{name}}}:limit:global:requests"
    # Idle again, the sync task settles between the reserve and twice it, then stops
    # writing the bucket.
    last, quiet_since = _bucket(redis_server, key), time.monotonic()
    while time.monotonic() - quiet_since < 1.0:
        time.sleep(0.1)
        now = _bucket(redis_server, key)
        if now != last:
            last, quiet_since = now, time.monotonic()
    leased = metric(server, 'llmkit_cluster_leased_units_total{dimension="requests"}')
    returned = metric(server, 'llmkit_cluster_returned_units_total{dimension="requests"}')
    held = leased - returned - admitted
    assert 75 <= held <= 150, (leased, returned, admitted)
    before, before_us = last
    assert server.stop() == 0
    after, after_us = _bucket(redis_server, key)
    refill = (after_us - before_us) / 1e6 * 10
    given = after - before - refill
    print(f"\nheld {held:.0f} units at SIGTERM; Redis got {given:.3f} back")
    assert abs(given - held) < 0.01

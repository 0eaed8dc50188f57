"""Cluster mode in one process: real Redis, real shm segments, the sync task driven by hand.

Each "host" is its own segment with its own ``Syncer``; workers are stood in for by a
``Limiter`` on that segment, which is all a worker touches. What only real server
processes show (three ``llmkit-serve`` trees) is in ``test_cluster_e2e.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from llmkit.cluster import FAIL_CLOSED, FAIL_OPEN, SYNCED, ClusterStatus, key_prefix
from llmkit.cluster_redis import RedisLink
from llmkit.cluster_sync import Syncer
from llmkit.config import Config, ConfigError, load_config
from llmkit.control import ControlPlane, Plan
from llmkit.errors import RateLimitError
from llmkit.limiter import LEASES
from llmkit.state import SharedState, build_layout
from tests.redis_server import RedisServer, redis_server_binary

_names = itertools.count()
REQUESTS = 0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer(tmp_path) as server:
        yield server


def cluster_config(url: str, cluster: dict[str, object], **sections: object) -> Config:
    raw = {"cluster": {"redis_url": url, "name": f"t{os.getpid()}-{next(_names)}", **cluster}}
    return msgspec.convert({**raw, **sections}, Config)


class Host:
    """One host's segment, sync task and a worker's-eye view of the control plane."""

    def __init__(self, config: Config, number: int) -> None:
        self.config = config
        self.state = SharedState.create(f"/llmkit-ct{os.getpid()}-{next(_names)}", config)
        self.control: ControlPlane = self.state.control(config, 1)
        c = config.cluster
        self.link = RedisLink(c.redis_url, None, c.redis_timeout_s, key_prefix(c.name))
        self.syncer = Syncer(config, self.state, self.link, f"host-{number}")

    def admit(self, n: int) -> int:
        """Try ``n`` requests now; how many were admitted."""
        admitted = 0
        for _ in range(n):
            try:
                self.control.admit_request(None, 1, time.monotonic_ns())
            except RateLimitError:
                continue
            admitted += 1
        return admitted

    def budget(self, entity: int = 0, dimension: int = REQUESTS) -> int:
        return self.control.limiter.lease_budget(entity, dimension).budget()

    def status(self, field: int) -> int:
        return self.syncer.status.word(field)

    async def close(self) -> None:
        await self.link.close()
        self.state.segment.unlink()
        self.state.close()


MakeHosts = Callable[[Config, int], list[Host]]


@pytest.fixture
async def hosts() -> AsyncIterator[MakeHosts]:
    made: list[Host] = []

    def make(config: Config, count: int) -> list[Host]:
        new = [Host(config, len(made) + i) for i in range(count)]
        made.extend(new)
        return new

    yield make
    for host in made:
        await host.close()


async def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- leases ---------------------------------------------------------------------------


async def test_workers_admit_only_what_was_leased(
    redis_server: RedisServer, hosts: MakeHosts
) -> None:
    config = cluster_config(redis_server.url, {}, limits={"rpm": 60})
    a, b = hosts(config, 2)
    assert a.admit(1) == 0  # nothing leased yet: refused, and the demand is noted
    started = time.monotonic()
    await a.syncer.sync()
    assert a.syncer.mode == SYNCED
    admitted = a.admit(1)
    for _ in range(40):  # two hosts hammering one 60/min limit
        for host in (a, b):
            admitted += host.admit(10)
            await host.syncer.sync()
    elapsed = time.monotonic() - started
    leased = sum(h.status(ClusterStatus.LEASED) for h in (a, b))
    held = a.budget() + b.budget()
    assert admitted + held == leased  # nothing admitted that was not leased
    # The cluster bucket: 60 at once, then one a second.
    assert 60 <= leased <= 60 + elapsed + 1
    assert admitted >= 60 - 2 * 3  # at most one batch (3) stranded per host


async def test_refusal_waits_for_the_cluster_bucket(
    redis_server: RedisServer, hosts: MakeHosts
) -> None:
    config = cluster_config(redis_server.url, {"batch_fraction": 1.0}, limits={"rpm": 6})
    (a,) = hosts(config, 1)
    await a.syncer.sync()
    a.admit(10)
    await a.syncer.sync()
    assert a.admit(10) == 6 - 1  # the reserve (one) came first, the rest on demand
    await a.syncer.sync()  # the bucket is empty: one unit in 10 s
    with pytest.raises(RateLimitError) as refused:
        a.control.admit_request(None, 1, time.monotonic_ns())
    assert 5 <= (refused.value.retry_after or 0) <= 10


async def test_unused_budget_goes_back(redis_server: RedisServer, hosts: MakeHosts) -> None:
    config = cluster_config(redis_server.url, {}, limits={"rpm": 600})  # batch 30, reserve 7
    (a,) = hosts(config, 1)
    await a.syncer.sync()
    a.admit(40)
    await a.syncer.sync()
    assert a.budget() == 30
    await a.syncer.sync()  # no demand now: down to the reserve
    assert a.budget() == 7
    assert a.status(ClusterStatus.RETURNED) == 23
    key = f"{key_prefix(config.cluster.name)}:limit:global:requests"
    tokens = float(redis_server.client().hget(key, "t") or 0)
    assert 600 - 7 - 7 <= tokens <= 600 - 7 + 1  # 7 spent, 7 held


async def test_a_respawned_sync_task_counts_what_shm_still_holds(
    redis_server: RedisServer, hosts: MakeHosts
) -> None:
    config = cluster_config(redis_server.url, {}, limits={"rpm": 600})  # batch 30, reserve 7
    (a,) = hosts(config, 1)
    await a.syncer.sync()
    assert a.budget() == 7
    # The supervisor's replacement for a sync task that died: same segment, new state.
    respawned = Syncer(config, a.state, a.link, "host-0-respawned")
    await respawned.sync()
    assert respawned.mode == SYNCED
    assert a.budget() == 7  # the reserve the dead task leased is still there: no more
    assert a.status(ClusterStatus.LEASED) == 7
    a.admit(7)
    await respawned.sync()
    assert a.budget() >= 7  # and it leases again as demand comes


async def test_tokens_are_leased_and_reconciled(
    redis_server: RedisServer, hosts: MakeHosts
) -> None:
    config = cluster_config(redis_server.url, {}, limits={"tpm": 10_000})  # batch 500
    (a,) = hosts(config, 1)
    await a.syncer.sync()
    limiter = a.control.limiter
    with pytest.raises(RateLimitError):  # larger than the reserve: refused, noted
        limiter.admit([0], 800, time.monotonic_ns())
    await a.syncer.sync()
    assert a.budget(0, 1) >= 800  # the batch grew to the largest refused request
    admission = limiter.admit([0], 800, time.monotonic_ns())
    before = a.budget(0, 1)
    limiter.reconcile(admission, 900, time.monotonic_ns())
    assert a.budget(0, 1) == before - 100


# -- failure policy -------------------------------------------------------------------


async def test_fail_open_uses_the_local_share_and_recovers(
    redis_server: RedisServer,
    hosts: MakeHosts,
) -> None:
    # A share of 600/2 per minute is 5 a second.
    cluster = {"hosts": 2, "sync_interval_s": 0.02, "max_backoff_s": 0.1, "redis_timeout_s": 0.2}
    config = cluster_config(redis_server.url, cluster, limits={"rpm": 600})
    (a,) = hosts(config, 1)
    stop = asyncio.Event()
    task = asyncio.create_task(a.syncer.run(stop))
    await wait_for(lambda: a.syncer.mode == SYNCED)
    redis_server.kill()
    await wait_for(lambda: a.syncer.mode == FAIL_OPEN)
    assert a.status(ClusterStatus.ERRORS) >= 1
    spent = a.admit(1000)
    await asyncio.sleep(1.2)
    refilled = a.admit(1000)
    assert 3 <= refilled <= 8, (spent, refilled)  # ~6 at 5 a second, none from Redis
    redis_server.start()
    await wait_for(lambda: a.syncer.mode == SYNCED)
    assert a.budget() <= 30  # the unleased share was dropped, then one batch leased
    stop.set()
    await task
    assert a.status(ClusterStatus.TRANSITIONS) == 3  # starting -> synced -> open -> synced


async def test_fail_closed_refuses_once_the_lease_is_spent(
    redis_server: RedisServer,
    hosts: MakeHosts,
) -> None:
    cluster = {"failure_policy": "fail_closed", "max_backoff_s": 0.5, "redis_timeout_s": 0.2}
    config = cluster_config(redis_server.url, cluster, limits={"rpm": 600})
    (a,) = hosts(config, 1)
    await a.syncer.sync()
    held = a.budget()
    redis_server.kill()
    assert a.admit(100) == held  # what was leased is still good, Redis or not
    await a.syncer.sync()  # demand: it needs Redis now
    assert a.syncer.mode == FAIL_CLOSED
    stop = asyncio.Event()
    task = asyncio.create_task(a.syncer.run(stop))
    await asyncio.sleep(0.5)
    with pytest.raises(RateLimitError) as refused:
        a.control.admit_request(None, 1, time.monotonic_ns())
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    stop.set()
    await task


# -- shared health --------------------------------------------------------------------

DEMO_MODEL = {"name": "m", "deployments": [{"provider": "demo", "model": "x"}]}


async def test_a_breaker_opening_reaches_the_other_hosts(
    redis_server: RedisServer,
    hosts: MakeHosts,
) -> None:
    config = cluster_config(
        redis_server.url, {"sync_interval_s": 0.05}, models=[DEMO_MODEL], breaker={"open_s": 30}
    )
    a, b, c = hosts(config, 3)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(h.syncer.run(stop)) for h in (a, b, c)]
    await wait_for(lambda: all(h.syncer.mode == SYNCED for h in (a, b, c)))
    breakers = a.control.breakers
    for _ in range(config.breaker.consecutive_failures):
        now = time.monotonic_ns()
        assert breakers.acquire(0, now)
        breakers.record(0, False, 0.01, now)
    opened = time.monotonic()
    assert not breakers.available(0, time.monotonic_ns())
    await wait_for(lambda: not b.control.breakers.available(0, time.monotonic_ns()))
    await wait_for(lambda: not c.control.breakers.available(0, time.monotonic_ns()))
    delay = time.monotonic() - opened
    print(f"breaker opening reached the other hosts in {delay * 1000:.0f} ms")
    assert b.control.breakers.snapshot(time.monotonic_ns())[0]["state"] == "open"
    assert b.status(ClusterStatus.REMOTE_OPENS) == 1
    assert a.status(ClusterStatus.PUBLISHED) == 1
    assert a.status(ClusterStatus.REMOTE_OPENS) == 0  # its own news is not news to it
    # An upstream 429's cooldown travels the same way.
    until = time.monotonic_ns() + 5_000_000_000
    b.control.breakers.cooldown(0, until)
    await wait_for(lambda: c.control.breakers.cooling_s(0, time.monotonic_ns()) > 4)
    assert abs(c.control.breakers.cooldown_until(0) - until) < 50_000_000
    stop.set()
    await asyncio.gather(*tasks)


# -- off by default -------------------------------------------------------------------


def test_without_cluster_nothing_changes() -> None:
    layout = build_layout(Config())
    assert LEASES not in layout and "cluster.status" not in layout
    code = (
        "import sys, llmkit.gateway, llmkit.state, workers.supervisor, workers.worker;"
        "print('redis' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_leased_levels_follow_the_config() -> None:
    raw = {
        "limits": {"rpm": 10, "max_concurrency": 3},
        "keys": [{"name": "a", "key_env": "K_A", "tpm": 100}],
        "models": [{"name": "m", "deployments": [{"provider": "demo", "model": "x", "rpm": 5}]}],
    }
    config = msgspec.convert(
        {**raw, "cluster": {"redis_url": "redis://127.0.0.1:1", "levels": ["global", "keys"]}},
        Config,
    )
    assert Plan.of(config).leased(config) == [(0, 0), (1, 1)]  # not the deployment
    assert Plan.of(Config()).leased(Config()) == []


def test_credentials_in_the_redis_url_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[cluster]\nredis_url = "redis://:hunter2@127.0.0.1:6379/0"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "password_env" in str(err.value) and "hunter2" not in str(err.value)

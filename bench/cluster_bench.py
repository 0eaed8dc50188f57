"""Cluster mode: what it costs a request, how much Redis it needs, how far limits overshoot.

Usage: ``python bench/cluster_bench.py [--quick] [--json PATH]``

Needs ``redis-server`` (a private one is started on a free port, no persistence) and,
for the end-to-end rows, ``wrk``. Three measurements, each comparing inside one run:

1. Hot path, in process: one request's limiter work (``admit_request`` at the global
   level with requests/min and tokens/min, ``limit_headers``, ``reconcile``,
   ``release``) on a segment with ``[cluster]`` off (GCRA buckets) and on (leased
   budgets), limits high enough that nothing is refused. Off and on alternate by
   repetition; medians of ns per request.
2. End to end: ``llmkit-serve --workers 1`` with the same limits, cluster off and on
   (its sync task leasing from the private Redis), under ``wrk``; alternating, medians.
   The same run reads Redis ``INFO commandstats`` before and after the cluster-on load:
   Redis operations per 1,000 requests (and per second of wall time: the sync task
   makes a fixed number of round trips per interval, whatever the load).
3. Overshoot vs batch size: three hosts in this process (each a segment, a ``Syncer``
   running its real loop against the private Redis, and a loop of admissions standing
   in for its workers) share 600 requests/min. After an idle second (reserves leased,
   the cluster bucket full again) every host admits as fast as it can for two seconds.
   Overshoot = admitted - 600 - the limit's own refill during the burst, against the
   bound of one batch per host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import LLMKitServer, machine, wrk  # noqa: E402

from llmkit.cluster import ClusterStatus, key_prefix  # noqa: E402
from llmkit.cluster_redis import RedisLink  # noqa: E402
from llmkit.cluster_sync import Syncer  # noqa: E402
from llmkit.config import Config  # noqa: E402
from llmkit.errors import RateLimitError  # noqa: E402
from llmkit.state import SharedState  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

BIG = {"rpm": 1_000_000_000, "tpm": 1_000_000_000}
BODY = '{"model":"demo/fast","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
_segments = iter(range(1_000_000))
CLIENT_COMMANDS = {"evalsha", "eval", "script", "subscribe", "hello", "client", "ping"}


def _config(limits: dict[str, int], cluster: dict[str, object] | None) -> Config:
    raw: dict[str, object] = {"limits": limits}
    if cluster is not None:
        raw["cluster"] = cluster
    return msgspec.convert(raw, Config)


def _segment(config: Config) -> SharedState:
    return SharedState.create(f"/llmkit-cb{os.getpid()}-{next(_segments)}", config)


# -- 1. hot path ------------------------------------------------------------------------


def _admission_ns(state: SharedState, config: Config, n: int) -> float:
    control = state.control(config, 1)
    clock = time.monotonic_ns
    started = time.perf_counter_ns()
    for _ in range(n):
        now = clock()
        admission = control.admit_request(None, 20, now)
        control.limit_headers(None, None, now)
        control.limiter.reconcile(admission, 18, now)
        control.limiter.release(admission)
    return (time.perf_counter_ns() - started) / n


def hot_path(redis_url: str, quick: bool) -> dict[str, Any]:
    off_config = _config(BIG, None)
    on_config = _config(BIG, {"redis_url": redis_url, "name": "bench-hot"})
    off, on = _segment(off_config), _segment(on_config)
    try:
        control = on.control(on_config, 0)
        for dimension in (0, 1):  # a lease big enough for the whole run
            control.limiter.lease_budget(0, dimension).credit(10**15)
        n, reps = (20_000, 5) if quick else (200_000, 11)
        samples: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(reps):
            samples["off"].append(_admission_ns(off, off_config, n))
            samples["on"].append(_admission_ns(on, on_config, n))
    finally:
        for state in (off, on):
            state.segment.unlink()
            state.close()
    off_ns, on_ns = statistics.median(samples["off"]), statistics.median(samples["on"])
    return {"off_ns": off_ns, "on_ns": on_ns, "ratio": on_ns / off_ns, "samples": samples}


# -- 2. end to end, and Redis operations ------------------------------------------------


def _toml(limits: dict[str, int], cluster: str) -> str:
    lines = ["[limits]", *(f"{k} = {v}" for k, v in limits.items())]
    return "\n".join(lines) + "\n" + cluster


def _served(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith('llmkit_http_requests_total{route="chat"')
    )


def end_to_end(redis: RedisServer, quick: bool) -> dict[str, Any]:
    seconds, reps = (2.0, 2) if quick else (5.0, 5)
    # A realistic cluster-wide limit that still never refuses at this load.
    limits = {"rpm": 6_000_000, "tpm": 600_000_000}
    cluster = f'[cluster]\nredis_url = "{redis.url}"\nname = "bench-e2e"\n'
    rps: dict[str, list[float]] = {"off": [], "on": []}
    with (
        LLMKitServer(workers=1, config=_toml(limits, "")) as off,
        LLMKitServer(workers=1, config=_toml(limits, cluster)) as on,
    ):
        url = "/v1/chat/completions"
        for server in (off, on):
            wrk(server.url + url, BODY, 1, 32)  # warm up
        calls_before, served_before, t0 = redis.command_calls(), _served(on.url), time.monotonic()
        for _ in range(reps):
            rps["off"].append(wrk(off.url + url, BODY, seconds, 32).requests_per_s)
            rps["on"].append(wrk(on.url + url, BODY, seconds, 32).requests_per_s)
        calls_after, served_after, t1 = redis.command_calls(), _served(on.url), time.monotonic()
        time.sleep(2.0)
        idle_after = redis.command_calls()
    ops = _ops(calls_before, calls_after)
    idle_ops = _ops(calls_after, idle_after)
    requests = served_after - served_before
    trips = _round_trips(ops)
    off_rps, on_rps = statistics.median(rps["off"]), statistics.median(rps["on"])
    return {
        "off_rps": off_rps,
        "on_rps": on_rps,
        "cost_ratio": off_rps / on_rps,  # time per request, on / off
        "samples": rps,
        "redis_commands": ops,
        "requests": requests,
        "round_trips_per_1000_requests": 1000 * trips / max(1, requests),
        "commands_per_1000_requests": 1000 * sum(ops.values()) / max(1, requests),
        "round_trips_per_s_loaded": trips / (t1 - t0),
        "round_trips_per_s_idle": _round_trips(idle_ops) / 2.0,
    }


def _round_trips(ops: dict[str, int]) -> int:
    """What clients sent; the rest ran inside those scripts (commandstats counts both)."""
    return sum(n for name, n in ops.items() if name.split("|")[0] in CLIENT_COMMANDS)


def _ops(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands run between two readings, not counting the readings (INFO) themselves."""
    return {
        name: after[name] - before.get(name, 0)
        for name in after
        if name != "info" and after[name] != before.get(name, 0)
    }


# -- 3. overshoot vs batch size ---------------------------------------------------------


async def _burst_hosts(redis: RedisServer, fraction: float, name: str) -> dict[str, Any]:
    redis_url = redis.url
    config = _config(
        {"rpm": 600},
        {"redis_url": redis_url, "name": name, "batch_fraction": fraction},
    )
    states = [_segment(config) for _ in range(3)]
    links = [RedisLink(redis_url, None, 0.5, key_prefix(name)) for _ in states]
    syncers = [Syncer(config, state, links[i], f"h{i}") for i, state in enumerate(states)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in syncers]
    await asyncio.sleep(1.0)  # reserves leased
    # The worst case: the cluster bucket has refilled completely behind the reserves
    # (a missing bucket is a full one), as it does after a few idle seconds.
    redis.client().delete(syncers[0].ledgers[0].key)
    controls = [s.control(config, 1) for s in states]
    admitted = [0, 0, 0]
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        for i, control in enumerate(controls):
            for _ in range(20):
                try:
                    control.admit_request(None, 1, time.monotonic_ns())
                    admitted[i] += 1
                except RateLimitError:
                    pass
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.gather(*tasks)
    leased = sum(s.status.word(ClusterStatus.LEASED) for s in syncers)
    for link, state in zip(links, states, strict=True):
        await link.close()
        state.segment.unlink()
        state.close()
    batch = syncers[0].ledgers[0].batch
    refill = elapsed * 10
    total = sum(admitted)
    return {
        "batch_fraction": fraction,
        "batch": batch,
        "admitted": total,
        "per_host": admitted,
        "refill": refill,
        "overshoot": total - 600 - refill,
        "bound": 3 * batch,
        "leased": leased,
    }


def overshoot(redis: RedisServer, quick: bool) -> list[dict[str, Any]]:
    fractions = (0.01, 0.05, 0.25) if quick else (0.01, 0.02, 0.05, 0.1, 0.25)
    return [
        asyncio.run(_burst_hosts(redis, f, f"bench-burst-{i}-{os.getpid()}"))
        for i, f in enumerate(fractions)
    ]


# -- report -----------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    """The suite's entry (``python -m bench cluster``): every measurement, as report data."""
    with tempfile.TemporaryDirectory(prefix="llmkit-cluster-bench-") as tmp:
        with RedisServer(Path(tmp)) as redis:
            figures = {
                "machine": machine(),
                "quick": quick,
                "hot_path": hot_path(redis.url, quick),
                "end_to_end": end_to_end(redis, quick),
                "overshoot": overshoot(redis, quick),
            }
    hot, e2e = figures["hot_path"], figures["end_to_end"]
    return {
        "title": "cluster mode: hot-path cost, Redis operations, overshoot vs batch size",
        "summary": [
            f"limiter work per request, cluster on / off: {hot['ratio']:.3f} (in process)",
            f"llmkit-serve time per request, cluster on / off: {e2e['cost_ratio']:.3f}",
            f"Redis round trips per 1,000 requests: {e2e['round_trips_per_1000_requests']:.2f}",
        ],
        "tables": _tables(figures),
        "metrics": [
            {"name": "hot_path.on_off", "value": hot["ratio"], "unit": "x", "better": "lower"},
            {"name": "e2e.on_off", "value": e2e["cost_ratio"], "unit": "x", "better": "lower"},
            {
                "name": "redis.round_trips_per_1000",
                "unit": "ops",
                "value": e2e["round_trips_per_1000_requests"],
                "better": "lower",
            },
        ],  # fmt: skip
        "commands": ["python bench/cluster_bench.py" + (" --quick" if quick else "")],
        "raw": figures,
    }


def _tables(figures: dict[str, Any]) -> list[dict[str, Any]]:
    hot, e2e = figures["hot_path"], figures["end_to_end"]
    cost = {
        "title": "Hot-path cost, cluster off vs on (medians, alternating repetitions)",
        "columns": ["measurement", "cluster off", "cluster on", "on / off"],
        "rows": [
            [
                "limiter work per request, in process (ns)",
                round(hot["off_ns"]),
                round(hot["on_ns"]),
                round(hot["ratio"], 3),
            ],
            [
                "llmkit-serve --workers 1 under wrk (requests/s)",
                round(e2e["off_rps"]),
                round(e2e["on_rps"]),
                f"{e2e['cost_ratio']:.3f} (time per request)",
            ],
        ],  # fmt: skip
    }
    redis = {
        "title": "Redis operations (INFO commandstats deltas, cluster-on server under wrk)",
        "columns": ["figure", "value"],
        "rows": [
            ["requests served", e2e["requests"]],
            ["round trips per 1,000 requests", round(e2e["round_trips_per_1000_requests"], 2)],
            [
                "commands per 1,000 requests, incl. inside scripts",
                round(e2e["commands_per_1000_requests"], 1),
            ],
            ["round trips per second under load", round(e2e["round_trips_per_s_loaded"], 1)],
            ["round trips per second idle", round(e2e["round_trips_per_s_idle"], 1)],
        ],  # fmt: skip
        "note": f"commands: {e2e['redis_commands']}",
    }
    burst = {
        "title": "Overshoot vs batch size (3 hosts, 600 requests/min, 2 s burst)",
        "columns": ["batch fraction", "batch", "admitted", "refill in burst", "overshoot",
                    "bound 3 x batch"],
        "rows": [
            [r["batch_fraction"], r["batch"], r["admitted"], round(r["refill"]),
             round(r["overshoot"]), r["bound"]]
            for r in figures["overshoot"]
        ],
    }  # fmt: skip
    return [cost, redis, burst]


def report(result: dict[str, Any]) -> str:
    """The tables as Markdown."""
    lines = [f"Machine: {result['raw']['machine']}{' (quick)' if result['raw']['quick'] else ''}"]
    for table in result["tables"]:
        lines += ["", table["title"], "", "| " + " | ".join(table["columns"]) + " |"]
        lines.append("|" + "---|" * len(table["columns"]))
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in table["rows"]]
        if table.get("note"):
            lines += ["", table["note"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions")
    parser.add_argument("--json", metavar="PATH", help="also save the figures here")
    args = parser.parse_args()
    result = run(args.quick)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

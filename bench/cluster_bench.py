"""Cluster mode: what it costs a request, how much Redis it needs, how far limits overshoot.

Usage: ``python bench/cluster_bench.py [--quick] [--json PATH]``

Needs ``redis-server`` (a private one is started on a free port, no persistence),
``nginx`` (the mock upstream of ``_upstreams.py``) and ``wrk``. Three measurements,
each comparing inside one run:

1. Hot path, end to end, in CPU: two ``llmkit-serve --workers 1`` (cluster off; on,
   with its sync task leasing from the private Redis) proxy to one nginx mock upstream
   through an OpenAI-wire deployment, as ``e2e_bench.py`` does, with a master key and
   global requests- and tokens-per-minute limits high enough that nothing is refused.
   wrk loads one, then the other (the order flips every repetition); the worker's
   utime + stime from ``/proc/<pid>/stat`` is read around each run and the totals are
   divided by the requests wrk completed. CPU per request, unlike requests/s, does not
   move when other processes take the cores. The sync task's own CPU over the same runs
   is reported beside it: it is part of what cluster mode costs the host.
   In process: ``Limiter.admit`` with a leased vs a GCRA dimension (ns per admit), and
   one request's whole limiter work (admit, ``limit_headers``, ``reconcile``,
   ``release``); off and on alternate by repetition; medians.
2. Redis operations: ``INFO commandstats`` read around each cluster-on run: round
   trips and commands per 1,000 requests, and per second loaded and idle (the sync task
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
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import LLMKitServer, machine  # noqa: E402
from _upstreams import mock_upstream  # noqa: E402
from e2e_bench import (  # noqa: E402
    AUTH,
    JSON_BODY,
    KEY_ENV,
    MASTER_ENV,
    MASTER_KEY,
    llmkit_config,
)

from llmkit.cluster import SYNC_PROCESS_NAME, ClusterStatus, key_prefix  # noqa: E402
from llmkit.cluster_redis import RedisLink  # noqa: E402
from llmkit.cluster_sync import Syncer  # noqa: E402
from llmkit.config import Config  # noqa: E402
from llmkit.errors import RateLimitError  # noqa: E402
from llmkit.state import SharedState  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

BIG = {"rpm": 1_000_000_000, "tpm": 1_000_000_000}
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


def _admit_ns(state: SharedState, config: Config, n: int) -> float:
    """``Limiter.admit`` alone, one global level with requests and tokens per minute."""
    admit = state.control(config, 1).limiter.admit
    chain, now = [0], time.monotonic_ns()
    started = time.perf_counter_ns()
    for _ in range(n):
        admit(chain, 20, now)
    return (time.perf_counter_ns() - started) / n


def hot_path(redis_url: str, quick: bool) -> dict[str, Any]:
    off_config = _config(BIG, None)
    on_config = _config(BIG, {"redis_url": redis_url, "name": "bench-hot"})
    off, on = _segment(off_config), _segment(on_config)
    try:
        control = on.control(on_config, 0)
        for dimension in (0, 1):  # a lease big enough for the whole run
            control.limiter.lease_budget(0, dimension).credit(10**15)
        n, reps = (20_000, 5) if quick else (50_000, 41)  # short, alternating: drift cancels
        samples: dict[str, list[float]] = {"off": [], "on": [], "gcra": [], "leased": []}
        for _ in range(reps):
            samples["off"].append(_admission_ns(off, off_config, n))
            samples["on"].append(_admission_ns(on, on_config, n))
            samples["gcra"].append(_admit_ns(off, off_config, n))
            samples["leased"].append(_admit_ns(on, on_config, n))
    finally:
        for state in (off, on):
            state.segment.unlink()
            state.close()
    med = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "off_ns": med["off"],
        "on_ns": med["on"],
        "ratio": med["on"] / med["off"],
        "admit_gcra_ns": med["gcra"],
        "admit_leased_ns": med["leased"],
        "admit_ratio": med["leased"] / med["gcra"],
        "samples": samples,
    }


# -- 2. end to end: CPU per request from /proc, and Redis operations ---------------------

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _gateway_toml(mock_url: str, cluster: str) -> str:
    """``e2e_bench.py``'s gateway (an OpenAI-wire deployment on the nginx mock, a master
    key) with cluster-wide-capable limits high enough that nothing is refused."""
    limits = "\n[limits]\nrpm = 60000000\ntpm = 6000000000\n"
    return llmkit_config(mock_url) + limits + cluster


def _children(pid: int) -> dict[int, str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {
        c: Path(f"/proc/{c}/comm").read_text().strip() for c in map(int, path.read_text().split())
    }


def _processes(server: LLMKitServer) -> tuple[list[int], int | None]:
    """(worker pids, the sync task's pid or None), told apart by process name."""
    children = _children(server.proc.pid)
    workers = [pid for pid, name in children.items() if name != SYNC_PROCESS_NAME]
    sync = [pid for pid, name in children.items() if name == SYNC_PROCESS_NAME]
    return workers, (sync[0] if sync else None)


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads, live and exited), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _wrk_requests(url: str, seconds: float, connections: int) -> tuple[int, float]:
    """wrk POSTing the chat body: (requests completed, requests/s); non-2xx is an error."""
    script = (
        f"wrk.method = 'POST'\nwrk.body = '{JSON_BODY}'\n"
        "wrk.headers['Content-Type'] = 'application/json'\n"
        f"wrk.headers['Authorization'] = '{AUTH['Authorization']}'\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "-s", lua.name, url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(lua.name)
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors; the comparison would be void:\n{out}")
    count = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert count and rps, out
    return int(count.group(1)), float(rps.group(1))


def end_to_end(redis: RedisServer, quick: bool) -> dict[str, Any]:
    """Worker CPU per request, cluster off vs on, and the sync task's own CPU per request.

    Two ``llmkit-serve --workers 1`` behind one nginx mock upstream, loaded in turn
    (the order flips every repetition) with wrk at saturation. CPU is utime + stime
    from ``/proc/<pid>/stat`` read around each run; totals over every repetition are
    divided by the requests wrk completed, so the 10 ms tick is a small fraction of
    each total (reported). Redis commands are counted around the cluster-on runs only.
    """
    # Many short runs rather than a few long ones: background load drifts, and
    # alternating often spreads it evenly over off and on.
    seconds, reps, connections = (2.0, 4, 16) if quick else (3.0, 16, 16)
    os.environ[MASTER_ENV], os.environ[KEY_ENV] = MASTER_KEY, "bench-key"
    cluster = f'[cluster]\nredis_url = "{redis.url}"\nname = "bench-e2e"\n'
    url = "/v1/chat/completions"
    ticks = {"off": 0, "on": 0, "sync": 0}
    requests = {"off": 0, "on": 0}
    pairs: list[float] = []
    rps: dict[str, list[float]] = {"off": [], "on": []}
    ops: dict[str, int] = {}
    with (
        mock_upstream(workers=1) as mock,
        LLMKitServer(workers=1, config=_gateway_toml(mock.url, "")) as off,
        LLMKitServer(workers=1, config=_gateway_toml(mock.url, cluster)) as on,
    ):
        servers = {"off": off, "on": on}
        (off_worker,), no_sync = _processes(off)
        (on_worker,), sync = _processes(on)
        assert no_sync is None and sync is not None, "expected a sync task on the on server"
        worker = {"off": off_worker, "on": on_worker}
        for server in (off, on):
            _wrk_requests(server.url + url, 1, connections)  # warm pools and caches
        for rep in range(reps):
            per_rep: dict[str, float] = {}
            for side in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                before = _cpu_ticks(worker[side])
                sync_before = _cpu_ticks(sync) if side == "on" else 0
                calls_before = redis.command_calls() if side == "on" else {}
                done, rate = _wrk_requests(servers[side].url + url, seconds, connections)
                spent = _cpu_ticks(worker[side]) - before
                if side == "on":
                    ticks["sync"] += _cpu_ticks(sync) - sync_before
                    for name, n in _ops(calls_before, redis.command_calls()).items():
                        ops[name] = ops.get(name, 0) + n
                ticks[side] += spent
                requests[side] += done
                rps[side].append(rate)
                per_rep[side] = spent / done
            pairs.append(per_rep["on"] / per_rep["off"])
        time.sleep(0.5)
        idle_sync_before, idle_calls_before = _cpu_ticks(sync), redis.command_calls()
        time.sleep(5.0 if not quick else 2.0)
        idle_s = 5.0 if not quick else 2.0
        idle_sync = _cpu_ticks(sync) - idle_sync_before
        idle_ops = _ops(idle_calls_before, redis.command_calls())
    us = {side: ticks[side] * TICK_S * 1e6 / requests[side] for side in ("off", "on")}
    sync_us = ticks["sync"] * TICK_S * 1e6 / requests["on"]
    trips = _round_trips(ops)
    return {
        "worker_us_off": us["off"],
        "worker_us_on": us["on"],
        "cost_ratio": us["on"] / us["off"],
        "pair_ratios": pairs,
        "sync_us_on": sync_us,
        "host_ratio": (us["on"] + sync_us) / us["off"],
        "ticks": ticks,
        "tick_fraction": {side: 1 / max(1, ticks[side]) for side in ticks},
        "requests": requests,
        "off_rps": statistics.median(rps["off"]),
        "on_rps": statistics.median(rps["on"]),
        "rps_samples": rps,
        "redis_commands": ops,
        "round_trips_per_1000_requests": 1000 * trips / requests["on"],
        "commands_per_1000_requests": 1000 * sum(ops.values()) / requests["on"],
        "round_trips_per_s_loaded": trips / (len(rps["on"]) * seconds),
        "round_trips_per_s_idle": _round_trips(idle_ops) / idle_s,
        "sync_cpu_idle_pct": 100 * idle_sync * TICK_S / idle_s,
    }


def _round_trips(ops: dict[str, int]) -> int:
    """What clients sent; the rest ran inside those scripts (commandstats counts both)."""
    return sum(n for name, n in ops.items() if name.split("|")[0] in CLIENT_COMMANDS)


READER_COMMANDS = {"info", "hello"}  # each reading opens a connection (HELLO), runs INFO


def _ops(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands run between two readings, not counting the readings themselves."""
    return {
        name: after[name] - before.get(name, 0)
        for name in after
        if name not in READER_COMMANDS and after[name] != before.get(name, 0)
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
            f"worker CPU per request, cluster on / off: {e2e['cost_ratio']:.3f} "
            f"(with the sync task's CPU: {e2e['host_ratio']:.3f})",
            f"Limiter.admit, leased / GCRA dimension: {hot['admit_ratio']:.3f} (in process)",
            f"Redis round trips per 1,000 requests: {e2e['round_trips_per_1000_requests']:.2f}",
        ],
        "tables": _tables(figures),
        "metrics": [
            {
                "name": "e2e.worker_cpu_on_off",
                "value": e2e["cost_ratio"],
                "unit": "x",
                "better": "lower",
            },
            {
                "name": "e2e.host_cpu_on_off",
                "value": e2e["host_ratio"],
                "unit": "x",
                "better": "lower",
            },
            {
                "name": "admit.leased_gcra",
                "value": hot["admit_ratio"],
                "unit": "x",
                "better": "lower",
            },
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
    pairs = e2e["pair_ratios"]
    ticks = e2e["ticks"]
    cost = {
        "title": "Hot-path cost, cluster off vs on (same run, alternating repetitions)",
        "columns": ["measurement", "cluster off", "cluster on", "on / off"],
        "rows": [
            ["worker CPU per request, llmkit-serve --workers 1, nginx mock, wrk (µs)",
             f"{e2e['worker_us_off']:.1f}", f"{e2e['worker_us_on']:.1f}",
             f"{e2e['cost_ratio']:.3f} (pairs: median {statistics.median(pairs):.3f}, "
             f"{min(pairs):.3f}–{max(pairs):.3f})"],
            ["+ the sync task's CPU per request (µs)", "-", f"{e2e['sync_us_on']:.2f}",
             f"{e2e['host_ratio']:.3f} (worker + sync task)"],
            ["requests/s at saturation (median)", round(e2e["off_rps"]), round(e2e["on_rps"]),
             f"{e2e['off_rps'] / e2e['on_rps']:.3f} (time per request)"],
            ["Limiter.admit, one level, requests + tokens (ns): GCRA vs leased",
             round(hot["admit_gcra_ns"]), round(hot["admit_leased_ns"]),
             round(hot["admit_ratio"], 3)],
            ["limiter work per request: admit, headers, reconcile, release (ns)",
             round(hot["off_ns"]), round(hot["on_ns"]), round(hot["ratio"], 3)],
        ],
        "note": (
            f"CPU = utime + stime from /proc/<pid>/stat around each wrk run, summed over "
            f"{len(pairs)} repetitions: {e2e['requests']['off']:,} / {e2e['requests']['on']:,}"
            f" requests, {ticks['off']} / {ticks['on']} ticks of {TICK_S * 1000:.0f} ms "
            f"(one tick = {100 * e2e['tick_fraction']['off']:.3f}% / "
            f"{100 * e2e['tick_fraction']['on']:.3f}% of the total); sync task "
            f"{ticks['sync']} ticks under load, {e2e['sync_cpu_idle_pct']:.1f}% of a core idle."
        ),
    }  # fmt: skip
    redis = {
        "title": "Redis operations (INFO commandstats around the cluster-on runs)",
        "columns": ["figure", "value"],
        "rows": [
            ["requests served (cluster on)", e2e["requests"]["on"]],
            ["round trips per 1,000 requests", round(e2e["round_trips_per_1000_requests"], 2)],
            ["commands per 1,000 requests, incl. inside scripts",
             round(e2e["commands_per_1000_requests"], 1)],
            ["round trips per second under load", round(e2e["round_trips_per_s_loaded"], 1)],
            ["round trips per second idle", round(e2e["round_trips_per_s_idle"], 1)],
        ],
        "note": f"commands: {e2e['redis_commands']}",
    }  # fmt: skip
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

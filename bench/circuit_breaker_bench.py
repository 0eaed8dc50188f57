"""Benchmark ``llmkit.breaker`` against LiteLLM's Router cooldowns, in one run.

Usage: ``python bench/circuit_breaker_bench.py [--seconds S] [--reps N] [--json PATH]
[--litellm-python PATH]``

Throughput (calls/s per process, median of N repetitions, min-max; 1 process, then 2
forked processes hammering the SAME deployment's shm words, as two workers do):

- LLMKit, on a closed, warmed breaker in an anonymous shared ``mmap``, ``now_ns``
  precomputed (the gateway reads the clock once per request anyway):
  ``available(0)``; ``acquire(0)``; the check ``available(0) + acquire(0)``; the router
  filter over 2 deployments ``available(0), available(1)``; ``health(0)`` (what a
  router scoring candidates reads); a full attempt
  ``available + acquire + record(ok)``; and the anomaly check, ``record(ok, latency)``
  alone, whose success path reads the latency EWMA, computes the z-score and folds the
  sample in (plus the window count, the outcome EWMA and the streak word).
- LiteLLM (its own venv, run as a subprocess; in-memory caches, no Redis), a Router
  with the same 2 deployments: ``get_cooldown_deployments(router)``, the call its
  ``_get_healthy_deployments`` makes to filter candidates (sync, with no deployment
  cooling down and with one cooling down); ``await async_get_cooldown_deployments(router)``
  (the async routing path); ``router.sync_deployment_callback_on_success(...)``, its
  per-success bookkeeping (the counterpart of ``record(ok)``). It has no latency anomaly
  detection: no equivalent of the z-score row.

Failure detection (deterministic, so one run): requests from the first failure of a
100%-failing upstream until the deployment is skipped, with failing requests arriving
every 1 ms of simulated time; "cold" = no earlier traffic, "warm" = 100 successes in the
second before. LLMKit runs with the default ``[breaker]`` config; LiteLLM's Router with
its defaults, failures fed to ``router.deployment_callback_on_failure`` (what its
failure callback runs: count the failure, decide the cooldown) until the deployment
shows in ``get_cooldown_deployments``. With 2 workers LLMKit's breaker is one shm
breaker (real forked processes, the count is what reached the upstream); LiteLLM's
state is per process without Redis (two Routers, requests alternating), so the
deployment is skipped everywhere only once both have cooled it down.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit.breaker import Breakers, declare
from llmkit.config import BreakerConfig
from shm import LayoutBuilder
from shm._atomics import Atomics

BATCH = 1_000
CHECK_TARGET = 1_000_000
LITELLM_PYTHON = "/opt/litellm-venv/bin/python"
ARRIVAL_MS = 1  # simulated time between failing requests
NOISE = [0.1 * (1 + random.Random(5).uniform(-0.1, 0.1)) for _ in range(1024)]

Batch = Callable[[int], None]


# --------------------------------------------------------------------------- LLMKit


def make_breakers(buffer: Any, config: BreakerConfig | None = None) -> Breakers:
    builder = LayoutBuilder()
    declare(builder, 2)
    layout = builder.build()
    return Breakers(Atomics(buffer), layout, config or BreakerConfig(), 2)


def op_available(b: Breakers, now: int) -> Batch:
    available = b.available

    def run(n: int) -> None:
        for _ in range(n):
            available(0, now)

    return run


def op_acquire(b: Breakers, now: int) -> Batch:
    acquire = b.acquire

    def run(n: int) -> None:
        for _ in range(n):
            acquire(0, now)

    return run


def op_check(b: Breakers, now: int) -> Batch:
    available, acquire = b.available, b.acquire

    def run(n: int) -> None:
        for _ in range(n):
            if available(0, now):
                acquire(0, now)

    return run


def op_health(b: Breakers, now: int) -> Batch:
    health = b.health

    def run(n: int) -> None:
        for _ in range(n):
            health(0, now)

    return run


def op_filter_two(b: Breakers, now: int) -> Batch:
    available = b.available

    def run(n: int) -> None:
        for _ in range(n):
            available(0, now)
            available(1, now)

    return run


def op_attempt(b: Breakers, now: int) -> Batch:
    available, acquire, record = b.available, b.acquire, b.record

    def run(n: int) -> None:
        for i in range(n):
            if available(0, now) and acquire(0, now):
                record(0, True, NOISE[i & 1023], now)

    return run


def op_anomaly_check(b: Breakers, now: int) -> Batch:
    record = b.record

    def run(n: int) -> None:
        for i in range(n):
            record(0, True, NOISE[i & 1023], now)

    return run


OURS: dict[str, tuple[str, Callable[[Breakers, int], Batch]]] = {
    "available": ("available(0)", op_available),
    "acquire": ("acquire(0)", op_acquire),
    "check": ("check: available(0) + acquire(0)", op_check),
    "filter2": ("router filter, 2 deployments: available(0), available(1)", op_filter_two),
    "health": ("health(0): Health with EWMA figures", op_health),
    "attempt": ("available + acquire + record(ok)", op_attempt),
    "anomaly": ("anomaly check: record(ok, latency), z-score path", op_anomaly_check),
}


def ours_worker(buffer: mmap.mmap, op: str, seconds: float, barrier: Any, out: Any) -> None:
    b = make_breakers(buffer)
    run = OURS[op][1](b, time.monotonic_ns())
    run(BATCH)  # warm the bound methods and caches
    barrier.wait()
    out.put(timed(run, seconds))


def timed(run: Batch, seconds: float) -> tuple[float, float]:
    """Run batches until the deadline; (calls/s, CPU time / wall time)."""
    calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
    now = start
    while now < start + seconds:
        run(BATCH)
        calls += BATCH
        now = time.perf_counter()
    return calls / (now - start), (time.process_time() - cpu_start) / (now - start)


def measure_ours(op: str, procs: int, seconds: float) -> list[tuple[float, float]]:
    buffer = mmap.mmap(-1, 64 * 1024)
    b = make_breakers(buffer)
    now = time.monotonic_ns()
    for i in range(200):  # a warmed EWMA: the z-score path, not the warm-up path
        b.acquire(0, now)
        b.record(0, True, NOISE[i], now)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=ours_worker, args=(buffer, op, seconds, barrier, out))
        for _ in range(procs)
    ]
    for proc in workers:
        proc.start()
    results = [out.get(timeout=seconds + 60) for _ in workers]
    for proc in workers:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"{op} worker exited with {proc.exitcode}")
    snap = b.snapshot(time.monotonic_ns())[0]
    if snap["state"] != "closed":
        raise RuntimeError(f"{op}: the breaker left the closed state: {snap}")
    return results


# --------------------------------------------------------------------------- LiteLLM

LITELLM_SCRIPT = r"""
import asyncio, json, os, sys, time
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import logging
import litellm
from litellm import Router
from litellm.router_utils.cooldown_handlers import (
    async_get_cooldown_deployments, get_cooldown_deployments)
from litellm.router_utils.router_callbacks.track_deployment_metrics import (
    increment_deployment_successes_for_current_minute)
logging.getLogger("LiteLLM").setLevel(logging.ERROR)
logging.getLogger("LiteLLM Router").setLevel(logging.ERROR)

BATCH = 1000
MODELS = [
    {"model_name": "fast", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x",
     "api_base": "http://127.0.0.1:9/v1"}, "model_info": {"id": "a"}},
    {"model_name": "fast", "litellm_params": {"model": "openai/gpt-4o", "api_key": "x",
     "api_base": "http://127.0.0.1:9/v1"}, "model_info": {"id": "b"}},
]
EXC = litellm.InternalServerError(message="upstream 500", llm_provider="openai",
                                  model="gpt-4o-mini")
PARAMS = {"model_info": {"id": "a"}, "metadata": {"model_group": "fast"}}
FAIL = {"exception": EXC, "litellm_params": PARAMS}
OK = {"litellm_params": PARAMS}

def router():
    return Router(model_list=MODELS)

def timed(run, seconds):
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    now = start
    while now < start + seconds:
        run(BATCH)
        calls += BATCH
        now = time.perf_counter()
    return calls / (now - start), (time.process_time() - cpu) / (now - start)

async def atimed(run, seconds):
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    now = start
    while now < start + seconds:
        await run(BATCH)
        calls += BATCH
        now = time.perf_counter()
    return calls / (now - start), (time.process_time() - cpu) / (now - start)

def detection(workers, warm):
    routers = [router() for _ in range(workers)]
    if warm:
        for i in range(100):
            increment_deployment_successes_for_current_minute(routers[i % workers], "a")
    cooled, sent = set(), 0
    while len(cooled) < workers and sent < 100000:
        for w, r in enumerate(routers):
            if w in cooled:
                continue
            sent += 1
            r.deployment_callback_on_failure(FAIL, None, 0, 0)
            if "a" in get_cooldown_deployments(r, None):
                cooled.add(w)
    return sent

async def main(seconds, reps, measure_detection):
    idle, cooling, r_async, r_ok = router(), router(), router(), router()
    cooling.cooldown_cache.add_deployment_to_cooldown(
        model_id="a", original_exception=EXC, exception_status=500, cooldown_time=86400)
    def sync_check(r):
        def run(n):
            for _ in range(n):
                get_cooldown_deployments(r, None)
        return run
    async def async_check(n):
        for _ in range(n):
            await async_get_cooldown_deployments(r_async, None)
    def on_success(n):
        for _ in range(n):
            r_ok.sync_deployment_callback_on_success(OK, None, 0, 0)
    ops = {"cooldown_sync": sync_check(idle), "cooldown_sync_cooling": sync_check(cooling),
           "success_callback": on_success}
    for op in ops.values():
        op(BATCH)
    await async_check(BATCH)
    print("ready", flush=True)
    sys.stdin.readline()
    results = {name: [] for name in [*ops, "cooldown_async"]}
    for _ in range(reps):
        for name, op in ops.items():
            results[name].append(timed(op, seconds))
        results["cooldown_async"].append(await atimed(async_check, seconds))
    if measure_detection:
        results["detection"] = {f"{w}w_{'warm' if warm else 'cold'}": detection(w, warm)
                                for w in (1, 2) for warm in (False, True)}
    await asyncio.sleep(0)  # let the cooldown callback tasks run before the loop closes
    print(json.dumps({"results": results}), flush=True)

asyncio.run(main(float(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"))
"""


def run_litellm(
    python: str, procs: int, seconds: float, reps: int, detect: bool
) -> list[dict[str, Any]]:
    """Run the LiteLLM side in ``procs`` concurrent subprocesses, started together."""
    env = os.environ | {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONWARNINGS": "ignore"}
    children = [
        subprocess.Popen(
            [python, "-c", LITELLM_SCRIPT, str(seconds), str(reps), str(int(detect and i == 0))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd="/",
        )  # fmt: skip
        for i in range(procs)
    ]
    for child in children:
        assert child.stdout is not None
        line = child.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"LiteLLM side did not start: {line!r}")
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    outputs = []
    for child in children:
        stdout, _ = child.communicate(timeout=600)
        if child.returncode != 0:
            raise RuntimeError(f"LiteLLM side exited with {child.returncode}")
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outputs


def litellm_version(python: str) -> str:
    out = subprocess.run(
        [python, "-m", "pip", "show", "litellm"], capture_output=True, text=True, check=False
    ).stdout
    versions = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Version")]
    return versions[0] if versions else "?"


LITELLM_OPS = {
    "cooldown_sync": "get_cooldown_deployments(router), 2 deployments, none cooling",
    "cooldown_sync_cooling": "get_cooldown_deployments(router), 2 deployments, 1 cooling",
    "cooldown_async": "await async_get_cooldown_deployments(router), 2 deployments",
    "success_callback": "router.sync_deployment_callback_on_success(kwargs)",
}


# --------------------------------------------------------------------------- detection


def ours_detection(warm: bool) -> int:
    """Failing requests, one per simulated ms, until ``available()`` turns False."""
    b = make_breakers(bytearray(64 * 1024))
    now = 10_000 * 10**9
    if warm:
        for i in range(100):
            b.acquire(0, now - 10**9 + i * 10**7)
            b.record(0, True, NOISE[i], now - 10**9 + i * 10**7)
    sent = 0
    while b.available(0, now) and b.acquire(0, now):
        b.record(0, False, 0.0, now)
        sent += 1
        now += ARRIVAL_MS * 1_000_000
    return sent


def _fail_until_open(buffer: mmap.mmap, barrier: Any, out: Any) -> None:
    b = make_breakers(buffer)
    barrier.wait()
    sent = 0
    while b.available(0, time.monotonic_ns()) and b.acquire(0, time.monotonic_ns()):
        b.record(0, False, 0.0, time.monotonic_ns())
        sent += 1
    out.put(sent)


def ours_detection_two_processes(warm: bool) -> int:
    buffer = mmap.mmap(-1, 64 * 1024)
    if warm:
        b = make_breakers(buffer)
        now = time.monotonic_ns()
        for i in range(100):
            b.acquire(0, now)
            b.record(0, True, NOISE[i], now)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fail_until_open, args=(buffer, barrier, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    sent = sum(int(out.get(timeout=60)) for _ in procs)
    for proc in procs:
        proc.join()
    return sent


def ours_spike_detection() -> int:
    """Successes 10x slower than a warmed 100 ms baseline until the breaker opens."""
    b = make_breakers(bytearray(64 * 1024))
    now = 10_000 * 10**9
    for i in range(200):
        b.acquire(0, now)
        b.record(0, True, NOISE[i], now)
        now += 10_000_000
    sent = 0
    while b.available(0, now) and b.acquire(0, now):
        b.record(0, True, 1.0, now)
        sent += 1
    return sent


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    side: str
    what: str
    procs: int
    per_process: list[float] = field(default_factory=list)
    cpu_share: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.per_process) if self.per_process else float("nan")


def run_ours(seconds: float, reps: int) -> dict[tuple[str, int], Row]:
    rows = {(op, p): Row("LLMKit", label, p) for op, (label, _) in OURS.items() for p in (1, 2)}
    for rep in range(reps):
        for (op, procs), row in rows.items():
            print(f"rep {rep + 1}/{reps}: LLMKit {op}, {procs}p", file=sys.stderr)
            rates, shares = zip(*measure_ours(op, procs, seconds), strict=True)
            row.per_process.append(statistics.fmean(rates))
            row.cpu_share.append(min(shares))
    return rows


def litellm_rows(outputs: dict[int, list[dict[str, Any]]]) -> dict[tuple[str, int], Row]:
    rows = {}
    for procs, per_child in outputs.items():
        for op, label in LITELLM_OPS.items():
            row = Row("LiteLLM", label, procs)
            reps = zip(*(child["results"][op] for child in per_child), strict=True)
            for rep in reps:
                row.per_process.append(statistics.fmean(rate for rate, _ in rep))
                row.cpu_share.append(min(share for _, share in rep))
            rows[(op, procs)] = row
    return rows


def throughput_table(rows: list[Row], scaling: dict[str, float]) -> str:
    lines = [
        "| side | what is timed | procs | calls/s per process (median) | min–max "
        "| 2p/1p aggregate | CPU share |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = f"{min(row.per_process):,.0f}–{max(row.per_process):,.0f}"
        ratio = f"{scaling[row.what]:.2f}×" if row.procs == 2 else ""
        lines.append(
            f"| {row.side} | {row.what} | {row.procs} | {row.median:,.0f} | {spread} | {ratio} "
            f"| {statistics.median(row.cpu_share):.0%} |"
        )
    return "\n".join(lines)


def detection_table(detection: dict[str, Any]) -> str:
    lines = [
        "| scenario | LLMKit requests | LLMKit simulated ms | LiteLLM requests "
        "| LiteLLM simulated ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in [
        ("1w_cold", "100% failures, cold, 1 worker"),
        ("1w_warm", "100% failures after 100 successes, 1 worker"),
        ("2w_cold", "100% failures, cold, 2 workers"),
        ("2w_warm", "100% failures after 100 successes, 2 workers"),
    ]:
        ours, theirs = detection["llmkit"][key], detection["litellm"][key]
        lines.append(
            f"| {label} | {ours} | {(ours - 1) * ARRIVAL_MS} | {theirs} "
            f"| {(theirs - 1) * ARRIVAL_MS} |"
        )
    spike = detection["llmkit"]["spike"]
    lines.append(
        f"| latency spike 10× the EWMA (successes), 1 worker | {spike} "
        f"| {(spike - 1) * ARRIVAL_MS} | no equivalent (never opens) | — |"
    )
    return "\n".join(lines)


def scaling_ratios(rows: dict[tuple[str, int], Row]) -> dict[str, float]:
    return {
        rows[(op, 2)].what: 2 * rows[(op, 2)].median / rows[(op, 1)].median
        for op, procs in rows
        if procs == 1
    }


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "seconds_per_cell": args.seconds,
        "reps": args.reps,
        "litellm": litellm_version(args.litellm_python),
        "unix_time": time.time(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="duration of each cell")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per cell")
    parser.add_argument("--json", type=Path, default=None, help="also save results here")
    parser.add_argument("--litellm-python", default=LITELLM_PYTHON)
    return parser.parse_args(argv)


def measure_all(seconds: float, reps: int, python: str) -> tuple[Any, Any, dict[str, Any]]:
    """(our rows, LiteLLM's rows, detection) of one run."""
    ours = run_ours(seconds, reps)
    print("LiteLLM side: 1 process, then 2 (imports take a few seconds)", file=sys.stderr)
    outputs = {p: run_litellm(python, p, seconds, reps, detect=p == 1) for p in (1, 2)}
    detection = {
        "llmkit": {
            "1w_cold": ours_detection(False),
            "1w_warm": ours_detection(True),
            "2w_cold": ours_detection_two_processes(False),
            "2w_warm": ours_detection_two_processes(True),
            "spike": ours_spike_detection(),
        },
        "litellm": outputs[1][0]["results"]["detection"],
    }
    return ours, litellm_rows(outputs), detection


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment(args)
    ours, theirs, detection = measure_all(args.seconds, args.reps, args.litellm_python)
    scaling = scaling_ratios(ours) | scaling_ratios(theirs)
    rows = [*ours.values(), *theirs.values()]
    check = ours[("check", 1)].median
    print(f"Circuit breaker benchmark: {env['cpus']} CPUs, Python {env['python']}, ", end="")
    print(f"LiteLLM {env['litellm']}, {args.seconds} s per cell, median of {args.reps}")
    print(f"(load average at start: {', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])})")
    print()
    print(throughput_table(rows, scaling))
    print()
    print("Failure detection (failing requests 1 simulated ms apart; default [breaker]):")
    print()
    print(detection_table(detection))
    print()
    verdict = "PASS" if check >= CHECK_TARGET else "FAIL"
    print(f"- check (available + acquire), 1 process: {check:,.0f}/s "
          f"(target ≥ {CHECK_TARGET:,}): {verdict}")  # fmt: skip
    if args.json is not None:
        payload = {
            "environment": env,
            "throughput": [asdict(r) | {"median": r.median} for r in rows],
            "scaling_2p_over_1p": scaling,
            "detection": detection,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


def run(quick: bool) -> dict[str, Any]:
    """The suite's entry (``python -m bench circuit_breaker``): the same run, as report data."""
    seconds, reps = (0.3, 1) if quick else (1.0, 3)
    ours, theirs, detection = measure_all(seconds, reps, LITELLM_PYTHON)
    scaling = scaling_ratios(ours) | scaling_ratios(theirs)
    rows = [*ours.values(), *theirs.values()]
    table = [[r.side, r.what, r.procs, r.median,
              f"{min(r.per_process):,.0f}–{max(r.per_process):,.0f}",
              f"{scaling[r.what]:.2f}×" if r.procs == 2 else "",
              f"{statistics.median(r.cpu_share):.0%}"] for r in rows]  # fmt: skip
    metrics = [{"name": f"{side.lower()}.{op}.{procs}p.ops_per_s", "value": row.median,
                "unit": "calls/s", "better": "higher"}
               for side, group in (("LLMKit", ours), ("LiteLLM", theirs))
               for (op, procs), row in group.items()]  # fmt: skip
    for key, sent in detection["llmkit"].items():
        metrics.append({"name": f"llmkit.detection.{key}.requests", "value": sent,
                        "unit": "requests", "better": "lower"})  # fmt: skip
    series: dict[str, list[list[float]]] = {}
    for side, group in (("LLMKit", ours), ("LiteLLM", theirs)):
        for (op, procs), row in group.items():
            if op in ("check", "anomaly", "cooldown_sync", "success_callback"):
                series.setdefault(f"{side} {op}", []).append([procs, row.median * procs])
    detect_md = detection_table(detection).splitlines()
    detect_rows = [[c.strip() for c in line.strip("|").split("|")] for line in detect_md[2:]]
    detect_cols = [c.strip() for c in detect_md[0].strip("|").split("|")]
    return {
        "title": "breaker checks and failure detection vs LiteLLM's Router cooldowns",
        "tables": [
            {
                "columns": [
                    "side",
                    "what is timed",
                    "procs",
                    "calls/s per process",
                    "min–max",
                    "2p/1p aggregate",
                    "CPU share",
                ],
                "rows": table,
            },
            {
                "title": "Failure detection (failing requests 1 simulated ms apart)",
                "columns": detect_cols,
                "rows": detect_rows,
            },
        ],  # fmt: skip
        "metrics": metrics,
        "plots": [
            {
                "file": "breaker_procs.png",
                "kind": "lines",
                "logy": True,
                "title": "Circuit breaker: calls/s (all processes) vs processes",
                "xlabel": "processes",
                "ylabel": "calls/s",
                "series": series,
            }
        ],
        "raw": {"detection": detection},
        "commands": [f"python bench/circuit_breaker_bench.py --seconds {seconds} --reps {reps}"],
    }


if __name__ == "__main__":
    main()

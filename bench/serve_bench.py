"""Demo-provider requests/s through ``llmkit-serve`` at 1 and 2 workers, one run, under wrk.

Usage: ``python bench/serve_bench.py [--seconds S] [--reps N] [--connections C] [--json PATH]``

The demo provider answers from inside the worker, so this measures the gateway itself:
HTTP parsing, decoding, the pipeline, encoding and the shared-memory metrics on every
request. Both servers run side by side and the repetitions alternate between them, so
background load on this shared machine smears over both instead of skewing one. wrk
runs on the same 2 cores with one thread: a 2-worker server competes with it for CPU,
which understates the 2-worker figure.

Two 2-worker servers: one where both workers accept from the supervisor's one listening
socket (the default), one with ``server.reuse_port`` (a SO_REUSEPORT listener per
worker). Half-way through each run the bench counts wrk's connections on each worker
(``ss``): "busiest worker" is the largest share, which stays for the run. (Before the
shared socket's accept looked at the other workers, ``workers.accept``, the worker that
woke first could take a whole burst.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import threading
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from _harness import LLMKitServer, WrkResult, machine, median_and_range, wrk

WORKLOADS = {
    "json": '{"model":"demo/fast","messages":[{"role":"user","content":"hello"}],"max_tokens":16}',
    "stream (20 chunks)": '{"model":"demo/fast","messages":[{"role":"user","content":"hello"}],'
    '"max_tokens":18,"stream":true}',
}


# Server label -> (workers, config).
SERVERS = {
    "1": (1, ""),
    "2": (2, ""),
    "2, reuse_port": (2, "[server]\nreuse_port = true\n"),
}


@dataclass
class Run:
    wrk: WrkResult
    busiest: float | None  # the busiest worker's share of wrk's connections (None: no ss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    results = measure(args.seconds, args.reps, args.connections)
    print(report(results, args))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({w: {k: [asdict(r) for r in v] for k, v in d.items()}
                       for w, d in results.items()}, out, indent=2)  # fmt: skip


def measure(seconds: float, reps: int, connections: int) -> dict[str, dict[str, list[Run]]]:
    results: dict[str, dict[str, list[Run]]] = {w: {k: [] for k in SERVERS} for w in WORKLOADS}
    with contextlib.ExitStack() as stack:
        servers = {label: stack.enter_context(LLMKitServer(workers, config))
                   for label, (workers, config) in SERVERS.items()}  # fmt: skip
        for name, body in WORKLOADS.items():
            for server in servers.values():  # warm up
                wrk(server.url + "/v1/chat/completions", body, 1, connections)
            for _ in range(reps):
                for label, server in servers.items():
                    results[name][label].append(one_run(server.url, body, seconds, connections))
    return results


def one_run(url: str, body: str, seconds: float, connections: int) -> Run:
    """One wrk run, and the connections per worker half-way through it."""
    shares: list[float] = []
    port = urlsplit(url).port
    assert port is not None
    timer = threading.Timer(seconds / 2, lambda: shares.extend(busiest_share(port)))
    timer.start()
    try:
        result = wrk(url + "/v1/chat/completions", body, seconds, connections)
    finally:
        timer.cancel()
    return Run(result, shares[0] if shares else None)


def busiest_share(port: int) -> list[float]:
    """[the largest share of the established connections to ``port`` that one process
    holds], from ``ss``; [] when ``ss`` is not installed or sees none."""
    if shutil.which("ss") is None:
        return []
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    pids = re.findall(r"pid=(\d+)", out)
    if not pids:
        return []
    return [max(pids.count(pid) for pid in set(pids)) / len(pids)]


def run(quick: bool) -> dict[str, Any]:
    """The suite's entry (``python -m bench serve``): the same cells, as report data."""
    seconds, reps, connections = (2, 1, 64) if quick else (5, 3, 64)
    results = measure(seconds, reps, connections)
    rows, metrics, series = [], [], {}
    for name, by_server in results.items():
        for label, runs in by_server.items():
            rps = statistics.median(r.wrk.requests_per_s for r in runs)
            rows.append([name, label, rps, *cells(runs)])
            metrics.append({"name": f"{name}.{metric_key(label)}.rps", "value": rps,
                            "unit": "req/s", "better": "higher"})  # fmt: skip
            if label != "2, reuse_port":
                series.setdefault(name, []).append([SERVERS[label][0], rps])
    return {
        "title": "demo provider (answered inside the worker) under wrk, 1 vs 2 workers",
        "tables": [{"columns": ["workload", "workers", "req/s", "median (min–max)", "p50 ms",
                                "p99 ms", "busiest worker's connections", "errors"],
                    "rows": rows}],
        "metrics": metrics,
        "plots": [{"file": "serve_workers.png", "kind": "lines", "title":
                   "Demo provider: req/s vs workers", "xlabel": "workers",
                   "ylabel": "requests/s", "series": series}],
        "commands": [f"python bench/serve_bench.py --seconds {seconds} --reps {reps} "
                     f"--connections {connections}"],
    }  # fmt: skip


def metric_key(label: str) -> str:
    """``1w``, ``2w``, ``2w_reuse_port``: the suite's metric names before reuse_port."""
    workers, _, option = label.partition(", ")
    return f"{workers}w" + (f"_{option}" if option else "")


def cells(runs: list[Run]) -> list[Any]:
    """median (min–max) req/s, p50 and p99 ms, the busiest worker's share, errors."""
    shares = [r.busiest for r in runs if r.busiest is not None]
    busiest = (f"{statistics.median(shares):.0%} ({min(shares):.0%}–{max(shares):.0%})"
               if shares else "–")  # fmt: skip
    return [median_and_range([r.wrk.requests_per_s for r in runs]),
            statistics.median(r.wrk.p50_ms for r in runs),
            statistics.median(r.wrk.p99_ms for r in runs), busiest,
            sum(r.wrk.errors for r in runs)]  # fmt: skip


def report(results: dict[str, dict[str, list[Run]]], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {machine()}",
        f"wrk -t1 -c{args.connections} -d{args.seconds:g}s, {args.reps} repetitions, "
        "median (min–max)",
        "",
        "| workload | workers | requests/s | p50 ms | p99 ms | busiest worker's connections "
        "| errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_server in results.items():
        for label, runs in by_server.items():
            rps, p50, p99, busiest, errors = cells(runs)
            lines.append(f"| {name} | {label} | {rps} | {p50:.2f} | {p99:.2f} | {busiest} "
                         f"| {errors} |")  # fmt: skip
        one = statistics.median(r.wrk.requests_per_s for r in by_server["1"])
        for label in ("2", "2, reuse_port"):
            two = statistics.median(r.wrk.requests_per_s for r in by_server[label])
            lines.append(f"| {name} | {label} vs 1 | **{two / one:.2f}×** | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

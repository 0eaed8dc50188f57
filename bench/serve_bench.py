"""Demo-provider requests/s through ``llmkit-serve`` at 1 and 2 workers, one run, under wrk.

Usage: ``python bench/serve_bench.py [--seconds S] [--reps N] [--connections C] [--json PATH]``

The demo provider answers from inside the worker, so this measures the gateway itself:
HTTP parsing, decoding, the pipeline, encoding and the shared-memory metrics on every
request. Both servers run side by side and the repetitions alternate between them, so
background load on this shared machine smears over both instead of skewing one. wrk
runs on the same 2 cores with one thread: a 2-worker server competes with it for CPU,
which understates the 2-worker figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from typing import Any

from _harness import LLMKitServer, WrkResult, machine, median_and_range, wrk

WORKLOADS = {
    "json": '{"model":"demo/fast","messages":[{"role":"user","content":"hello"}],"max_tokens":16}',
    "stream (20 chunks)": '{"model":"demo/fast","messages":[{"role":"user","content":"hello"}],'
    '"max_tokens":18,"stream":true}',
}


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


def measure(seconds: float, reps: int, connections: int) -> dict[str, dict[int, list[WrkResult]]]:
    results: dict[str, dict[int, list[WrkResult]]] = {w: {1: [], 2: []} for w in WORKLOADS}
    with LLMKitServer(workers=1) as one, LLMKitServer(workers=2) as two:
        servers = {1: one, 2: two}
        for name, body in WORKLOADS.items():
            wrk(one.url + "/v1/chat/completions", body, 1, connections)  # warm up
            wrk(two.url + "/v1/chat/completions", body, 1, connections)
            for _ in range(reps):
                for workers, server in servers.items():
                    url = server.url + "/v1/chat/completions"
                    results[name][workers].append(wrk(url, body, seconds, connections))
    return results


def run(quick: bool) -> dict[str, Any]:
    """The suite's entry (``python -m bench serve``): the same cells, as report data."""
    seconds, reps, connections = (2, 1, 64) if quick else (5, 3, 64)
    results = measure(seconds, reps, connections)
    rows, metrics, series = [], [], {}
    for name, by_workers in results.items():
        for workers, runs in by_workers.items():
            rps = statistics.median(r.requests_per_s for r in runs)
            rows.append(
                [
                    name,
                    workers,
                    rps,
                    median_and_range([r.requests_per_s for r in runs]),
                    statistics.median(r.p50_ms for r in runs),
                    statistics.median(r.p99_ms for r in runs),
                    sum(r.errors for r in runs),
                ]
            )
            metrics.append(
                {
                    "name": f"{name}.{workers}w.rps",
                    "value": rps,
                    "unit": "req/s",
                    "better": "higher",
                }
            )
            series.setdefault(name, []).append([workers, rps])
    return {
        "title": "demo provider (answered inside the worker) under wrk, 1 vs 2 workers",
        "tables": [{"columns": ["workload", "workers", "req/s", "median (min–max)", "p50 ms",
                                "p99 ms", "errors"], "rows": rows}],
        "metrics": metrics,
        "plots": [{"file": "serve_workers.png", "kind": "lines", "title":
                   "Demo provider: req/s vs workers", "xlabel": "workers",
                   "ylabel": "requests/s", "series": series}],
        "commands": [f"python bench/serve_bench.py --seconds {seconds} --reps {reps} "
                     f"--connections {connections}"],
    }  # fmt: skip


def report(results: dict[str, dict[int, list[WrkResult]]], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {machine()}",
        f"wrk -t1 -c{args.connections} -d{args.seconds:g}s, {args.reps} repetitions, "
        "median (min–max)",
        "",
        "| workload | workers | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_workers in results.items():
        for workers, runs in by_workers.items():
            lines.append(
                f"| {name} | {workers} | {median_and_range([r.requests_per_s for r in runs])} "
                f"| {statistics.median(r.p50_ms for r in runs):.2f} "
                f"| {statistics.median(r.p99_ms for r in runs):.2f} "
                f"| {sum(r.errors for r in runs)} |"
            )
        one = statistics.median(r.requests_per_s for r in by_workers[1])
        two = statistics.median(r.requests_per_s for r in by_workers[2])
        lines.append(f"| {name} | 2 vs 1 | **{two / one:.2f}×** | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

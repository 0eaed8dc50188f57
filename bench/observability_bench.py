"""What observability costs: worker CPU per request off / metrics / +10% / +100% tracing,
metric updates per second in one process, and a ``/metrics`` scrape over 1,000 series.

Usage: ``python bench/observability_bench.py [--quick] [--json PATH]``

CPU per request is the workers' user+system time (``/proc/<pid>/stat``) over a wrk run,
divided by the requests wrk completed, on demo-provider chat requests. The four
configurations run side by side (one worker each) and the repetitions alternate
between them, so background load smears over all four; figures are medians. Traced
configurations export over OTLP/HTTP to a local sink in this process (the export's
CPU in the worker, its batch thread included, is counted; the sink's is not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import LLMKitServer, machine, wrk  # noqa: E402

BODY = '{"model":"demo/fast","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
TICKS = os.sysconf("SC_CLK_TCK")


def configurations(sink: str) -> dict[str, str]:
    traced = f'otlp_endpoint = "{sink}"\n'
    return {
        "off": "[observability]\nmetrics = false\ntrace_sample_rate = 0.0\n",
        "metrics only": "[observability]\ntrace_sample_rate = 0.0\n",
        "metrics + 10% tracing": f"[observability]\ntrace_sample_rate = 0.1\n{traced}",
        "metrics + 100% tracing": f"[observability]\ntrace_sample_rate = 1.0\n{traced}",
    }


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def otlp_sink() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/traces"
    finally:
        httpd.shutdown()
        httpd.server_close()


def worker_cpu_s(server: LLMKitServer) -> float:
    """User + system CPU seconds of the server's worker processes."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for child in children:
        fields = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICKS


def cpu_per_request(seconds: float, reps: int, connections: int) -> dict[str, Any]:
    with otlp_sink() as sink, ExitStack() as stack:
        servers = {
            name: stack.enter_context(LLMKitServer(workers=1, config=config))
            for name, config in configurations(sink).items()
        }
        for server in servers.values():  # warm up: imports, pools, JIT-free caches
            wrk(server.url + "/v1/chat/completions", BODY, 1, connections)
        samples: dict[str, list[float]] = {name: [] for name in servers}
        rates: dict[str, list[float]] = {name: [] for name in servers}
        for rep in range(reps):
            order = list(servers.items())
            if rep % 2:
                order.reverse()
            for name, server in order:
                before, started = worker_cpu_s(server), time.monotonic()
                result = wrk(server.url + "/v1/chat/completions", BODY, seconds, connections)
                elapsed = time.monotonic() - started
                cpu = worker_cpu_s(server) - before
                requests = result.requests_per_s * elapsed
                samples[name].append(cpu / requests * 1e6)
                rates[name].append(result.requests_per_s)
    off = statistics.median(samples["off"])
    return {
        name: {
            "cpu_us_per_request": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "overhead_vs_off_pct": (statistics.median(values) / off - 1) * 100,
            "requests_per_s": statistics.median(rates[name]),
        }
        for name, values in samples.items()
    }


def _rate(fn: Callable[[int], None], n: int, reps: int) -> float:
    """Calls per second of ``fn(n)`` doing ``n`` calls, median of ``reps``."""
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        fn(n)
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates)


def update_rates(n: int, reps: int) -> dict[str, float]:
    """Metric updates per second in this one process, on a real segment."""
    from llmkit.config import Config
    from llmkit.observability import Observability
    from llmkit.state import SharedState

    state = SharedState.create(f"/llmkit-obsbench-{os.getpid()}", Config())
    try:
        metrics = state.metrics
        counter = metrics.http_requests[0]
        add = metrics.atomics.add_i64
        offset = counter.offset
        hist = metrics.duration[0]
        observability = Observability(Config(), metrics)

        def raw_adds(k: int) -> None:
            for _ in range(k):
                add(offset, 1)

        def counter_incs(k: int) -> None:
            for _ in range(k):
                counter.inc()

        def histogram_observes(k: int) -> None:
            for _ in range(k):
                hist.observe(0.0123)

        def request_records(k: int) -> None:
            begin = observability.begin
            for _ in range(k):
                obs = begin(0, "POST", "/v1/chat/completions", "r", None)
                assert obs is not None
                obs.finish(200)

        per_request = request_records  # record_http (3 words) + record_request (5 words)
        return {
            "atomic add_i64 / s": _rate(raw_adds, n, reps),
            "Counter.inc / s": _rate(counter_incs, n, reps),
            "Histogram.observe / s": _rate(histogram_observes, n, reps),
            "request records / s (8 word updates each)": _rate(per_request, n // 4, reps),
        }
    finally:
        state.segment.unlink()
        state.close()


def scrape_time(reps: int) -> dict[str, float]:
    """``/metrics`` encoding time (the collector reads shm) with about 1,000 non-zero series
    (20 deployments with every per-deployment metric set, plus the fixed families)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from llmkit.collector import ShmCollector
    from llmkit.config import load_config
    from llmkit.state import SharedState

    aliases = "".join(
        f'[[models]]\nname = "m{i}"\n[[models.deployments]]\nprovider = "demo"\nmodel = "x{i}"\n'
        for i in range(20)
    )
    path = Path(f"/tmp/llmkit-obsbench-{os.getpid()}.toml")
    path.write_text(aliases)
    config = load_config(path)
    path.unlink()
    state = SharedState.create(f"/llmkit-obsscrape-{os.getpid()}", config)
    try:
        m = state.metrics
        for series in range(len(m.series.deployments)):  # ~50 samples each
            for route in (0, 1):
                for status in (200, 429, 503):
                    m.record_request(series, route, status, 0.05, 0)
            m.record_usage(series, 0, 10, 20, 0.001)
            m.record_ttft(series, 0.02)
            m.record_attempt(series)
            m.record_error(series, 3)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ShmCollector(m))
        text = generate_latest(registry).decode()
        count = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            generate_latest(registry)
            times.append((time.perf_counter() - started) * 1000)
        return {"series": count, "scrape_ms": statistics.median(times), "bytes": len(text)}
    finally:
        state.segment.unlink()
        state.close()


def run(quick: bool) -> dict[str, Any]:
    """Every figure of this benchmark; ``quick`` for a short smoke run."""
    seconds, reps = (2.0, 2) if quick else (5.0, 5)
    return {
        "machine": machine(),
        "cpu_per_request": cpu_per_request(seconds, reps, connections=32),
        "updates_per_s": update_rates(200_000 if quick else 2_000_000, 3 if quick else 5),
        "scrape": scrape_time(20 if quick else 100),
        "settings": {"wrk_seconds": seconds, "reps": reps, "connections": 32, "workers": 1},
    }


def report(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"Machine: {results['machine']}",
        f"wrk -t1 -c{s['connections']} -d{s['wrk_seconds']:g}s, {s['reps']} alternating "
        f"repetitions, {s['workers']} worker each, medians (min–max)",
        "",
        "| configuration | worker CPU µs / request | vs off | requests/s |",
        "|---|---|---|---|",
    ]
    for name, row in results["cpu_per_request"].items():
        lines.append(
            f"| {name} | {row['cpu_us_per_request']:.1f} ({row['min']:.1f}–{row['max']:.1f}) "
            f"| {row['overhead_vs_off_pct']:+.2f}% | {row['requests_per_s']:,.0f} |"
        )
    lines += ["", "| metric updates, one process | per second |", "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in results["updates_per_s"].items()]
    scrape = results["scrape"]
    lines += ["", f"/metrics with {scrape['series']:,} series ({scrape['bytes']:,} bytes): "
              f"{scrape['scrape_ms']:.2f} ms per scrape (median)"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    results = run(args.quick)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

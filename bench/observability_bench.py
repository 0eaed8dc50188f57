"""What observability costs: worker CPU per request off / metrics / +10% / +100% tracing,
on two workloads, metric updates per second in one process, and a ``/metrics`` scrape
over 1,000 series.

Usage: ``python bench/observability_bench.py [--quick] [--instructions | --instructions-only]
[--layouts N] [--json PATH]`` (``--instructions-only``: the callgrind rows alone;
``--layouts N``: those rows once per memory layout, N of them, and their mean and range,
as a difference of ~1K instructions per request is only believable as a mean over
layouts)

CPU per request is the CPU time of the server's worker processes (every thread, from
``/proc/<pid>/task/<tid>/schedstat``: nanoseconds, so clock-tick resolution does not
enter) over a wrk run, divided by the requests wrk completed in it. The loop thread is
reported apart from the other threads (aiohttp's resolver, anything an exporter may
start): spans are exported on the loop itself, so their whole cost shows there.

Two workloads: ``demo`` (the in-worker demo provider: the cheapest request there is,
so the worst case for any fixed per-request cost) and ``proxy`` (an OpenAI-wire
deployment in front of the nginx mock upstream from ``bench/_upstreams.py``, with the
master key checked, as ``bench/e2e_bench.py`` configures LLMKit). Per workload, the
four configurations run side by side (one worker each) and every repetition runs all
four in an order that alternates, so background load smears over all of them; figures
are medians with the min–max over repetitions. Traced configurations export over
OTLP/HTTP to a sink in this process (its CPU is not counted). On a shared machine the
spread between repetitions can exceed the differences measured: compare the min–max
columns before reading a percentage. The ``paired`` columns are the median over
repetitions of each repetition's own ratio (the configurations of one repetition ran
back to back), which cancels slow drifts of the machine's load.

When valgrind is installed (or with ``--instructions``), every run adds the
deterministic figure (about a minute of a quick run): instructions per request of one
worker under valgrind's callgrind (``bench/_callgrind.py``), per workload, every
configuration in the same process (the worker switches between them between
windows: counts of the same code differ by ~1K instructions per request between two
processes, as CPython's method cache collides by memory address), the same requests,
the median of three windows per configuration; windows repeat to ~0.1% (how many
requests each loop iteration serves varies with timing). The traced rows say how many
traces the window sampled and how many POSTs it made: callgrind's worker runs ~50x
slower, so its batches are far smaller than a worker's at full speed, and the row
"full-speed estimate" gives 10% tracing without that distortion
(``instructions_per_request``). The layout of one process still moves a figure a little;
``--layouts N`` gives the mean over N of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _callgrind  # noqa: E402
from _harness import LLMKitServer, machine, wrk  # noqa: E402
from _upstreams import mock_upstream  # noqa: E402
from e2e_bench import AUTH, JSON_BODY, KEY_ENV, MASTER_ENV, MASTER_KEY, llmkit_config  # noqa: E402

CHAT = "/v1/chat/completions"
DEMO_BODY = '{"model":"demo/fast","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
CONFIGURATIONS = ("off", "metrics only", "metrics + 10% tracing", "metrics + 100% tracing",
                  "off (control)")  # fmt: skip
UNSAMPLED = "metrics + tracing, none sampled"  # callgrind only: what a 10% run's other 90% pay
WINDOW_ID = "obsbench-window"  # the x-request-id of the requests callgrind counts
# Traces per OTLP POST of a worker at full speed (10% of ~5,000 requests/s, one POST per
# EXPORT_INTERVAL_S), and the estimate that charges each trace that share of a POST.
FULL_SPEED_BATCH = 500
POST_CORRECTED = "metrics + 10% tracing, full-speed estimate, 500 traces per POST"


@dataclass
class Workload:
    name: str
    config: str  # everything but [observability]
    body: str
    headers: dict[str, str] = field(default_factory=dict)


def observability_sections(sink: str) -> dict[str, str]:
    traced = f'otlp_endpoint = "{sink}"\n'
    return dict(zip(CONFIGURATIONS, (
        "[observability]\nmetrics = false\ntrace_sample_rate = 0.0\n",
        "[observability]\ntrace_sample_rate = 0.0\n",
        f"[observability]\ntrace_sample_rate = 0.1\n{traced}",
        f"[observability]\ntrace_sample_rate = 1.0\n{traced}",
        "[observability]\nmetrics = false\ntrace_sample_rate = 0.0\n",  # the noise floor
    ), strict=True))  # fmt: skip


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector's part that costs the exporter anything: it keeps the
    connection alive (HTTP/1.1) as collectors do, so a POST is not also a connect. It
    counts POSTs and the traces of the callgrind window (their root spans carry the
    window's request id)."""

    protocol_version = "HTTP/1.1"
    received = 0  # OTLP export requests
    posted_at = 0.0  # when the last one came (time.monotonic)
    window_traces = 0

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Sink.received += 1
        _Sink.posted_at = time.monotonic()
        _Sink.window_traces += body.count(WINDOW_ID.encode())
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


def worker_pids(server: LLMKitServer) -> list[int]:
    pid = server.proc.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def worker_cpu_ns(server: LLMKitServer) -> tuple[int, int]:
    """(loop thread, other threads) CPU nanoseconds of the server's workers."""
    loop = other = 0
    for pid in worker_pids(server):
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                ns = int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that just ended
            if int(task.name) == pid:
                loop += ns
            else:
                other += ns
    return loop, other


def measure(
    server: LLMKitServer, workload: Workload, seconds: float, connections: int
) -> tuple[float, float, float]:
    """(loop thread µs, other threads µs) per request and requests/s of one wrk run."""
    before = worker_cpu_ns(server)
    result = wrk(server.url + CHAT, workload.body, seconds, connections, headers=workload.headers)
    after = worker_cpu_ns(server)
    if result.errors:
        raise RuntimeError(f"{workload.name}: {result.errors} failed requests")
    requests = result.requests_per_s * max(1, round(seconds))  # wrk's own duration
    loop = (after[0] - before[0]) / requests / 1e3
    other = (after[1] - before[1]) / requests / 1e3
    return loop, other, result.requests_per_s


def cpu_per_request(
    workload: Workload, seconds: float, reps: int, connections: int
) -> dict[str, dict[str, float]]:
    """Every configuration's CPU per request on ``workload``, alternating repetitions."""
    with otlp_sink() as sink, ExitStack() as stack:
        servers = {
            name: stack.enter_context(LLMKitServer(workers=1, config=workload.config + section))
            for name, section in observability_sections(sink).items()
        }
        for server in servers.values():  # warm up: imports, pools, the export thread
            wrk(server.url + CHAT, workload.body, 1, connections, headers=workload.headers)
        samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in servers}
        for rep in range(reps):
            order = list(servers.items())
            if rep % 2:
                order.reverse()
            for name, server in order:
                samples[name].append(measure(server, workload, seconds, connections))
    return summarise(samples)


def summarise(samples: dict[str, list[tuple[float, float, float]]]) -> dict[str, dict[str, float]]:
    totals = {name: [loop + other for loop, other, _ in s] for name, s in samples.items()}
    off = statistics.median(totals["off"])
    metrics = statistics.median(totals["metrics only"])
    rows = {}
    for name, values in totals.items():
        median = statistics.median(values)
        paired_off = [v / o - 1 for v, o in zip(values, totals["off"], strict=True)]
        paired_metrics = [v / m - 1 for v, m in zip(values, totals["metrics only"], strict=True)]
        rows[name] = {
            "paired_vs_off_pct": statistics.median(paired_off) * 100,
            "paired_vs_metrics_pct": statistics.median(paired_metrics) * 100,
            "cpu_us_per_request": median,
            "min": min(values),
            "max": max(values),
            "loop_us": statistics.median(s[0] for s in samples[name]),
            "other_threads_us": statistics.median(s[1] for s in samples[name]),
            "vs_off_pct": (median / off - 1) * 100,
            "vs_metrics_pct": (median / metrics - 1) * 100,
            "requests_per_s": statistics.median(s[2] for s in samples[name]),
        }
    return rows


def instructions_per_request(
    workload: Workload, requests: int, reps: int
) -> dict[str, dict[str, float]]:
    """Every configuration's instructions per request on ``workload`` (callgrind), with
    the traces sampled and the OTLP POSTs made in the counted window.

    Under callgrind the worker runs ~50x slower, so the 1 s export interval sends far
    smaller batches than at full speed (a 10% run: ~10 traces per POST, where a worker
    at 5,000 requests/s sends ~500), and each POST costs ~600K instructions. The measured
    10% row carries that. The full-speed row is the estimate that does not: metrics
    only, plus 90% of what an unsampled request pays with tracing on (``UNSAMPLED``),
    plus 10% of what a sampled one pays (the 100% row's, whose ~100-trace batches
    still overstate the POST's share). How many POSTs fall in a window follows
    callgrind's pace, and so the machine's load (10 to 45 per 1,000 requests were seen),
    so a second estimate (``POST_CORRECTED``) takes the 100% row's POSTs out and charges
    each trace 1/``FULL_SPEED_BATCH`` of one POST, counted alone (``_one_post``)."""
    with otlp_sink() as sink:
        sections = observability_sections(sink)
        sections[UNSAMPLED] = (
            f'[observability]\ntrace_sample_rate = 1e-9\notlp_endpoint = "{sink}"\n'
        )
        del sections["off (control)"]  # one process: no noise floor between processes
        counts = _windows(workload, sections, requests, reps)
    off = counts["off"]["instructions"]
    metrics = counts["metrics only"]["instructions"]
    unsampled = counts[UNSAMPLED]["instructions"] - metrics
    full = counts["metrics + 100% tracing"]
    sampled = full["instructions"] - metrics
    counts["metrics + 10% tracing, full-speed estimate"] = {
        "instructions": metrics + 0.9 * unsampled + 0.1 * sampled,
    }
    # The same, with the 100% row's POSTs (as many as callgrind's pace made: 10 to 45
    # per window, as the machine's load varies) replaced by one per FULL_SPEED_BATCH.
    post = full["post_instructions"]
    per_trace = sampled - full["posts"] * post / requests + post / FULL_SPEED_BATCH
    counts[POST_CORRECTED] = {"instructions": metrics + 0.9 * unsampled + 0.1 * per_trace,
                              "per_sampled_request": per_trace, "post": post}  # fmt: skip
    for row in counts.values():
        row["vs_off_pct"] = (row["instructions"] / off - 1) * 100
        row["vs_metrics_pct"] = (row["instructions"] / metrics - 1) * 100
    return counts


def _windows(
    workload: Workload, sections: dict[str, str], requests: int, reps: int
) -> dict[str, dict[str, float]]:
    """Instructions per request of each configuration (``sections``: name -> its
    ``[observability]``), all in one callgrind worker that switches between them
    (``CallgrindWorker.use``): ``reps`` rounds, a window per configuration each, in an
    order that rotates; the median of each one's windows, the traces its windows
    sampled and the POSTs made during them, and for the 100% row one POST's count
    (``_one_post``). Traces from a warm-up or a window leave (``_drain``) before the
    next window starts, so no configuration's POST falls in another's window."""
    names = list(sections)
    configs = [workload.config + sections[name] for name in names]
    warmup = {**workload.headers, "x-request-id": "obsbench-warmup"}
    window = {**workload.headers, "x-request-id": WINDOW_ID}
    counts: dict[str, list[float]] = {name: [] for name in names}
    traces, posts = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    with _callgrind.CallgrindWorker(configs[0], variants=configs) as worker:
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                traced = "otlp_endpoint" in sections[name]
                worker.use(names.index(name))
                _callgrind.send(worker.port, workload.body, warmup, 100, 4)
                _drain(traced)
                _Sink.window_traces, before = 0, _Sink.received
                counts[name].append(worker.instructions(workload.body, window, requests, 4)
                                    / requests)  # fmt: skip
                posts[name] += _Sink.received - before
                _drain(traced)
                traces[name] += _Sink.window_traces
        full = "metrics + 100% tracing"
        worker.use(names.index(full))
        post = _one_post(worker, workload)
    return {name: {"instructions": statistics.median(counts[name]),
                   "traces": traces[name] / reps, "posts": posts[name] / reps,
                   "post_instructions": post if name == full else 0}
            for name in names}  # fmt: skip


def _drain(traced: bool) -> None:
    """Wait until a traced configuration's queued traces have left (its export timer,
    ``EXPORT_INTERVAL_S``, fires within this)."""
    if traced:
        time.sleep(2.5)


def _one_post(worker: _callgrind.CallgrindWorker, workload: Workload) -> int:
    """Instructions of one OTLP POST (a batch of ~20 traces) with the worker otherwise
    idle: traces are queued, then the counters zeroed until the export timer has sent
    them (``EXPORT_INTERVAL_S``), with a few heartbeats of the idle loop besides. Zeroing
    takes callgrind a while; if the POST left before it, the traces are queued again."""
    warmup = {**workload.headers, "x-request-id": "obsbench-warmup"}
    time.sleep(2.5)  # what the windows left queued leaves (the interval is 1 s)
    for _ in range(5):
        before = _Sink.received
        _callgrind.send(worker.port, workload.body, warmup, 20, 4)
        counted = worker.counted(partial(_wait_for_post, before))
        if _Sink.posted_at >= worker.zeroed_at:  # else it left before the counting began
            return counted
        time.sleep(2.5)
    raise RuntimeError("no OTLP POST fell inside a counted window")


def _wait_for_post(received: int, timeout_s: float = 60.0) -> None:
    """Until a POST after the first ``received``: at once if it came already."""
    deadline = time.monotonic() + timeout_s
    while _Sink.received == received:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker made no OTLP POST")
        time.sleep(0.05)


def workloads(mock_url: str) -> list[Workload]:
    return [
        Workload("demo", "", DEMO_BODY),
        Workload("proxy", llmkit_config(mock_url), JSON_BODY, dict(AUTH)),
    ]


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
    from llmkit.state import SharedState

    state = SharedState.create(f"/llmkit-obsbench-{os.getpid()}", Config())
    try:
        metrics = state.metrics
        counter = metrics.http_requests[0]
        add = metrics.atomics.add_i64
        offset = counter.offset
        hist = metrics.duration[0]

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
            record = metrics.record_model_request
            for _ in range(k):
                record(0, 200, 0.0123, 0, 0, 9, 9, 0.0001, 0.004, None)

        return {
            "atomic add_i64 / s": _rate(raw_adds, n, reps),
            "Counter.inc / s": _rate(counter_incs, n, reps),
            "Histogram.observe / s": _rate(histogram_observes, n, reps),
            "model requests recorded (record_model_request) / s": _rate(
                request_records, n // 4, reps
            ),
        }
    finally:
        state.segment.unlink()
        state.close()


def hook_costs(n: int, reps: int) -> dict[str, float]:
    """µs per request of observability alone, as a proxied chat request calls it: metrics
    only (``count`` from the run) and sampled (the hooks too, its spans written); µs per
    trace to queue a batch of 500 and write its OTLP request."""
    from llmkit.config import load_config
    from llmkit.gateway import Gateway
    from llmkit.observability import Observability
    from llmkit.otlp import encode_request
    from llmkit.state import SharedState
    from llmkit.tracing import Tracing
    from llmkit.types import Choice, Message, Usage

    os.environ[KEY_ENV] = "sk-upstream-bench"
    os.environ[MASTER_ENV] = MASTER_KEY
    path = Path(f"/tmp/llmkit-obshooks-{os.getpid()}.toml")
    path.write_text(llmkit_config("http://127.0.0.1:9"))
    config = load_config(path)
    path.unlink()
    state = SharedState.create(f"/llmkit-obshooks-{os.getpid()}", config)
    try:
        gateway = Gateway(config, control=state.control(config, 0))
        call = gateway.decode_chat(JSON_BODY.encode())
        call.key = "master"
        targets = gateway.resolve("gpt")
        usage = Usage(prompt_tokens=9, completion_tokens=9, total_tokens=18)
        choices = [Choice(index=0, message=Message(role="assistant", content="hi"),
                          finish_reason="stop")]  # fmt: skip
        run = gateway.start_run(call, stream=False)  # a real run: one attempt, answered
        next(run.tries()).succeeded(usage)
        run.close(usage)
        traced: list[bytes] = []
        tracing = Tracing(1.0, lambda batch: None)
        tracing.record = lambda trace: None  # type: ignore[method-assign]
        plain = Observability(config, state.metrics)
        sampled = Observability(config, state.metrics, tracing)

        def requests(observability: Observability) -> Callable[[int], None]:
            def requests_of(k: int) -> None:
                for _ in range(k):
                    started = time.monotonic_ns()
                    obs = observability.begin(0, "POST", CHAT, "r", None)
                    if obs is not None:
                        obs.routed(call, targets, obs.mark())
                        obs.admitted(obs.mark(), False)
                        obs.attempt_started(targets[0], {})
                        obs.attempt_settled(True, None)
                        obs.settled(usage)
                        obs.answered(choices)
                    observability.count(0, 200, started, call)
                    if obs is not None:
                        obs.finish(200)

            return requests_of

        results = {
            "metrics only": 1e6 / _rate(requests(plain), n, reps),
            "metrics + sampled trace": 1e6 / _rate(requests(sampled), n, reps),
        }
        tracing.record = traced.append  # type: ignore[method-assign]
        requests(sampled)(500)
        results["OTLP request of a 500-trace batch, per trace"] = 1e6 / _rate(
            lambda k: [encode_request(traced, "llmkit") for _ in range(k)], 20, reps
        ) / len(traced)  # fmt: skip
        return results
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


def run(quick: bool, instructions: bool = True, only: bool = False) -> dict[str, Any]:
    """Every figure of this benchmark; ``quick`` for a short smoke run; ``instructions``
    adds the callgrind counts (by default when valgrind is installed: the suite's table
    reads its overheads from them); ``only`` gives those counts alone."""
    seconds, reps, connections = (2.0, 2, 32) if quick else (6.0, 7, 32)
    os.environ[KEY_ENV] = "sk-upstream-bench"
    os.environ[MASTER_ENV] = MASTER_KEY
    cpu, counted = {}, {}
    with mock_upstream() as mock:
        for workload in workloads(f"http://127.0.0.1:{mock.port}"):
            if not only:
                cpu[workload.name] = cpu_per_request(workload, seconds, reps, connections)
            if instructions and _callgrind.available():
                counted[workload.name] = instructions_per_request(
                    workload,
                    200 if quick else 1000,
                    1 if quick else 3,  # the loop's batching moves a window by ~1K; a median
                )
    if only:
        return {"machine": machine(), "instructions_per_request": counted}
    updates = update_rates(200_000 if quick else 2_000_000, 3 if quick else 5)
    scrape = scrape_time(20 if quick else 100)
    return {
        "machine": machine(),
        "metrics": declared_metrics(cpu, updates, scrape, counted),
        "cpu_per_request": cpu,
        "instructions_per_request": counted,
        "updates_per_s": updates,
        "hooks_us": hook_costs(20_000 if quick else 100_000, 3 if quick else 5),
        "scrape": scrape,
        "settings": {
            "wrk_seconds": seconds,
            "reps": reps,
            "connections": connections,
            "workers": 1,
        },  # fmt: skip
    }


def declared_metrics(
    cpu: dict[str, Any],
    updates: dict[str, float],
    scrape: dict[str, float],
    counted: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The figures the suite compares across runs and the comprehensive table shows; the
    first one named ``overhead`` is "instrumentation overhead" (metrics vs off, proxied)."""
    metrics = []
    for workload in ("proxy", "demo"):
        configs = cpu.get(workload, {})
        for config, key, name in (
            ("metrics only", "vs_off_pct", "metrics_overhead_pct"),
            ("metrics + 10% tracing", "vs_metrics_pct", "tracing_10pct_overhead_pct"),
            ("metrics + 100% tracing", "vs_metrics_pct", "tracing_100pct_overhead_pct"),
        ):
            if config in configs:
                metrics.append({"name": f"{name}.{workload}", "value": configs[config][key],
                                "unit": "%", "better": "lower"})  # fmt: skip
    for workload, configs in (counted or {}).items():  # callgrind: deterministic
        for config, key, name in (
            ("metrics only", "vs_off_pct", "metrics_overhead_instructions_pct"),
            ("metrics + 10% tracing", "vs_metrics_pct", "tracing_10pct_instructions_pct"),
            (
                "metrics + 10% tracing, full-speed estimate",
                "vs_metrics_pct",
                "tracing_10pct_full_speed_instructions_pct",
            ),
            (POST_CORRECTED, "vs_metrics_pct", "tracing_10pct_full_speed_500_instructions_pct"),
        ):
            if config not in configs:
                continue
            metrics.append({"name": f"{name}.{workload}", "value": configs[config][key],
                            "unit": "%", "better": "lower"})  # fmt: skip
    metrics.append({"name": "counter_updates_per_s", "value": updates["Counter.inc / s"],
                    "unit": "1/s", "better": "higher"})  # fmt: skip
    metrics.append({"name": "scrape_ms", "value": scrape["scrape_ms"], "unit": "ms",
                    "better": "lower"})  # fmt: skip
    return metrics


def report(results: dict[str, Any]) -> str:
    if "settings" not in results:
        return "\n".join([f"Machine: {results['machine']}", *instruction_rows(results)])
    s = results["settings"]
    lines = [
        f"Machine: {results['machine']}",
        f"wrk -t1 -c{s['connections']} -d{s['wrk_seconds']:g}s per sample, {s['reps']} "
        f"alternating repetitions, {s['workers']} worker per configuration; worker CPU from "
        "/proc schedstat (ns); medians (min–max over repetitions)",
        "",
        "| workload | configuration | worker CPU µs / request | loop thread µs | other threads µs "
        "| vs off | vs metrics only | paired vs off | paired vs metrics | requests/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, rows in results["cpu_per_request"].items():
        for name, row in rows.items():
            lines.append(
                f"| {workload} | {name} | {row['cpu_us_per_request']:.2f} "
                f"({row['min']:.2f}–{row['max']:.2f}) | {row['loop_us']:.2f} "
                f"| {row['other_threads_us']:.2f} | {row['vs_off_pct']:+.2f}% "
                f"| {row['vs_metrics_pct']:+.2f}% | {row['paired_vs_off_pct']:+.2f}% "
                f"| {row['paired_vs_metrics_pct']:+.2f}% | {row['requests_per_s']:,.0f} |"
            )
    lines += instruction_rows(results)
    lines += ["", "| metric updates, one process | per second |", "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in results["updates_per_s"].items()]
    lines += ["", "| observability hooks of one proxied chat request, one process | µs |",
              "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.2f} |" for k, v in results["hooks_us"].items()]
    scrape = results["scrape"]
    lines += ["", f"/metrics with {scrape['series']:,} series ({scrape['bytes']:,} bytes): "
              f"{scrape['scrape_ms']:.2f} ms per scrape (median)"]  # fmt: skip
    return "\n".join(lines)


def instruction_rows(results: dict[str, Any]) -> list[str]:
    """The callgrind table, if the run counted instructions."""
    lines: list[str] = []
    if results.get("instructions_per_request"):
        lines += ["", "| workload | configuration | instructions / request (callgrind) | vs off "
                  "| vs metrics only | traces | OTLP POSTs | traces / POST |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for workload, rows in results["instructions_per_request"].items():
            for name, row in rows.items():
                posts = row.get("posts", 0)
                batch = f"{row['traces'] / posts:.0f}" if posts else "–"
                lines.append(
                    f"| {workload} | {name} | {row['instructions']:,.0f} "
                    f"| {row['vs_off_pct']:+.2f}% | {row['vs_metrics_pct']:+.2f}% "
                    f"| {row.get('traces', 0):.0f} | {posts:.0f} | {batch} |"
                )
        lines.append(
            "(full-speed estimate: metrics only + 0.9 x the unsampled request's extra "
            "+ 0.1 x the 100% row's extra; see instructions_per_request)"
        )
        for workload, rows in results["instructions_per_request"].items():
            if POST_CORRECTED in rows:
                row = rows[POST_CORRECTED]
                lines.append(f"({workload}, 500 traces per POST: a sampled request "
                             f"{row['per_sampled_request']:,.0f} instructions over metrics only "
                             f"with 1/500 of a POST of {row['post']:,.0f})")  # fmt: skip
    return lines


# The overheads ``--layouts`` averages: (workload row, the column it is read from).
LAYOUT_ROWS = (
    ("metrics only", "vs_off_pct"),
    (UNSAMPLED, "vs_metrics_pct"),
    ("metrics + 100% tracing", "vs_metrics_pct"),
    ("metrics + 10% tracing, full-speed estimate", "vs_metrics_pct"),
    (POST_CORRECTED, "vs_metrics_pct"),
)


def over_layouts(count: int, parallel: int = 1) -> dict[str, Any]:
    """The callgrind rows once per memory layout (``PYTHONHASHSEED`` 0 to ``count`` - 1,
    which ``_callgrind.counted_env`` turns into a layout), ``parallel`` runs at a time:
    per workload and row, the overhead in each layout and their mean, min and max. A
    difference of ~1K instructions per request moves with the layout by about as much,
    so only a mean over layouts says which side of a target it is on. One at a time by
    default: on a loaded machine the proxied windows moved by ~2K instructions per
    request (how many requests, and upstream answers, each loop iteration handles
    follows timing), against ~0.3K on a quiet one."""

    def one(seed: int) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="llmkit-layout-") as tmp:
            out = Path(tmp, "counts.json")
            subprocess.run(
                [sys.executable, __file__, "--instructions-only", "--json", str(out)],
                env={**os.environ, "PYTHONHASHSEED": str(seed)},
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            counts: dict[str, Any] = json.loads(out.read_text())["instructions_per_request"]
            return counts

    with ThreadPoolExecutor(parallel) as pool:
        runs = list(pool.map(one, range(count)))
    return {"machine": machine(), "layouts": count, "overheads": layout_summary(runs)}


def layout_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``over_layouts``' figures from each layout's ``instructions_per_request``."""
    summary: dict[str, Any] = {}
    for workload in runs[0]:
        rows = summary[workload] = {}
        off = statistics.mean(run[workload]["off"]["instructions"] for run in runs)
        for name, column in LAYOUT_ROWS:
            values = [run[workload][name][column] for run in runs]
            rows[name] = {"column": column, "by_layout": values, "mean": statistics.mean(values),
                          "min": min(values), "max": max(values),
                          "off_instructions": off}  # fmt: skip
    return summary


def layout_report(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']}; instructions per request (callgrind), "
        f"{results['layouts']} memory layouts (PYTHONHASHSEED 0-{results['layouts'] - 1})",
        "",
        "| workload | configuration | vs | mean | min–max | by layout |",
        "|---|---|---|---|---|---|",
    ]
    for workload, rows in results["overheads"].items():
        for name, row in rows.items():
            against = "off" if row["column"] == "vs_off_pct" else "metrics only"
            each = " / ".join(f"{value:+.2f}" for value in row["by_layout"])
            lines.append(f"| {workload} | {name} | {against} | {row['mean']:+.2f}% "
                         f"| {row['min']:+.2f} – {row['max']:+.2f}% | {each} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--instructions", action=argparse.BooleanOptionalAction,
                        help="callgrind counts (default: when valgrind is installed)")  # fmt: skip
    parser.add_argument("--instructions-only", action="store_true",
                        help="the callgrind counts alone")  # fmt: skip
    parser.add_argument("--layouts", type=int, metavar="N",
                        help="callgrind overheads over N memory layouts")  # fmt: skip
    parser.add_argument("--parallel", type=int, default=1, metavar="P",
                        help="--layouts: P runs at a time (default 1)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.layouts:
        results = over_layouts(args.layouts, args.parallel)
        print(layout_report(results))
    else:
        results = run(args.quick, args.instructions is not False, args.instructions_only)
        print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

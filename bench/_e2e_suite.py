"""The suite's end-to-end benchmark: ``e2e_bench``'s gateways at 1 and 2 workers.

For each worker count: LLMKit (``llmkit-serve --workers N``), LiteLLM's proxy
(``--num_workers N``), nginx ``proxy_pass`` (N workers) and a bare aiohttp proxy (N
processes; ``_aiohttp_proxy.py``: LLMKit's parts with none of its logic) in front of
the same nginx mock; per gateway, JSON then streaming under wrk (same connections, same seconds),
time to first byte one request at a time, and the gateway's own CPU time during each
wrk run (utime + stime of its whole process tree from ``/proc``), from which the CPU
seconds per request follow: the real-world scenario (CPU-hours per year at 100k req/s)
is computed from that, nothing else. The latency CDF comes from wrk's own histogram
(a ``done`` hook printing its percentiles), so it is the same measurement as req/s.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _aiohttp_proxy import aiohttp_proxy
from _harness import LLMKitServer, _parse_wrk
from _upstreams import STREAM_CHUNKS, free_port, mock_upstream, reverse_proxy
from e2e_bench import (
    AUTH,
    KEY_ENV,
    MASTER_ENV,
    MASTER_KEY,
    litellm_config,
    litellm_proxy,
    llmkit_config,
    paths,
    ttfb_ms,
)

LITELLM_BIN = "/opt/litellm-venv/bin/litellm"
PERCENTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9)
TICK = os.sysconf("SC_CLK_TCK")
_ = litellm_config  # e2e_bench's LiteLLM config, used through litellm_proxy


def tree_cpu_s(root: int) -> float:
    """utime + stime of ``root`` and every live descendant, in seconds."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICK
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(pid, 0.0) for pid in tree)


def litellm_pid(port: int) -> int:
    """The LiteLLM proxy's root process, found by the port on its command line."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in argv and str(port).encode() in argv and any(b"litellm" in a for a in argv):
            return int(entry.name)
    raise RuntimeError(f"no LiteLLM process on port {port}")


def wrk_cdf(url: str, body: str, seconds: float, connections: int) -> dict[str, Any]:
    """wrk -t1 with a POST body; req/s, p50/p99, errors and its latency percentiles (ms).

    The timeout is 30 s, not wrk's 2 s: a timed-out request drops out of wrk's latency
    histogram, which would flatter the slowest gateway's percentiles.
    """
    escaped = body.replace("\\", "\\\\").replace("'", "\\'")
    script = f"wrk.method = 'POST'\nwrk.body = '{escaped}'\n"
    script += "wrk.headers['Content-Type'] = 'application/json'\n"
    for name, value in AUTH.items():
        script += f"wrk.headers['{name}'] = '{value}'\n"
    points = ", ".join(str(p) for p in PERCENTILES)
    script += (
        "done = function(summary, latency, requests)\n"
        f"  for _, p in ipairs({{{points}}}) do\n"
        "    io.write(string.format('CDF %g %d\\n', p, latency:percentile(p)))\n"
        "  end\nend\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    try:
        out = subprocess.run(
            [shutil.which("wrk") or "wrk", "-t1", f"-c{connections}",
             f"-d{max(1, round(seconds))}s", "--timeout", "30s", "--latency", "-s", lua.name,
             url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(lua.name)
    parsed = _parse_wrk(out)
    cdf = [[float(us) / 1e3, float(p) / 100] for p, us in re.findall(r"CDF ([\d.]+) (\d+)", out)]
    return {"rps": parsed.requests_per_s, "p50_ms": parsed.p50_ms, "p99_ms": parsed.p99_ms,
            "errors": parsed.errors, "cdf_ms": cdf}  # fmt: skip


def measure_gateway(url: str, pid: int, name: str, seconds: float, reps: int,
                    connections: int, ttfb_samples: int) -> dict[str, Any]:  # fmt: skip
    json_path, json_body, stream_path, stream_body = paths(name)
    out: dict[str, Any] = {}
    for kind, path, body in (("json", json_path, json_body), ("stream", stream_path,
                                                               stream_body)):  # fmt: skip
        wrk_cdf(url + path, body, 1, connections)  # warm the pools
        runs = []
        for _ in range(reps):
            cpu0 = tree_cpu_s(pid)
            run = wrk_cdf(url + path, body, seconds, connections)
            cpu = tree_cpu_s(pid) - cpu0
            requests = run["rps"] * max(1, round(seconds))
            run["cpu_ms_per_request"] = 1e3 * cpu / requests if requests else float("nan")
            runs.append(run)
        out[kind] = runs
    out["ttfb_ms"] = ttfb_ms(url + stream_path, stream_body, ttfb_samples)
    return out


def run(quick: bool) -> dict[str, Any]:
    seconds, reps, connections, ttfb_samples = (3, 1, 32, 50) if quick else (8, 3, 64, 200)
    if not Path(LITELLM_BIN).exists():
        raise RuntimeError(f"LiteLLM not found at {LITELLM_BIN}: run bench/bootstrap.sh")
    os.environ[KEY_ENV] = "bench-key"
    os.environ[MASTER_ENV] = MASTER_KEY
    results: dict[int, dict[str, Any]] = {}
    with mock_upstream(workers=1) as mock:
        for workers in (1, 2):
            with ExitStack() as stack:
                ours = stack.enter_context(LLMKitServer(workers, llmkit_config(mock.url)))
                lite_url = stack.enter_context(litellm_proxy(LITELLM_BIN, mock.url, workers))
                floor = stack.enter_context(reverse_proxy(mock.port, workers=workers))
                bare = aiohttp_proxy(mock.url, MASTER_KEY, free_port(), workers)
                gateways = {
                    "LLMKit": (ours.url, ours.proc.pid),
                    "LiteLLM": (lite_url, litellm_pid(int(lite_url.rsplit(":", 1)[1]))),
                    "nginx": (floor.url, floor.proc.pid),
                    # aiohttp server + aiohttp client and nothing else: LLMKit's parts.
                    "aiohttp floor": stack.enter_context(bare),
                }
                results[workers] = {}
                for name, (url, pid) in gateways.items():
                    print(f"e2e: {name}, {workers} worker(s)", file=sys.stderr, flush=True)
                    results[workers][name] = measure_gateway(
                        url, pid, name, seconds, reps, connections, ttfb_samples
                    )
    return shape(results, seconds, reps, connections)


def _key(gateway: str) -> str:
    return gateway.lower().replace(" ", "_")


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def shape(results: dict[int, dict[str, Any]], seconds: float, reps: int,
          connections: int) -> dict[str, Any]:  # fmt: skip
    rows, metrics = [], []
    tput: dict[str, list[list[float]]] = {}
    cdfs: dict[str, list[list[float]]] = {}
    figures: dict[str, Any] = {}
    for workers, by_gateway in results.items():
        for name, r in by_gateway.items():
            js, st = r["json"], r["stream"]
            spread = f"{min(x['rps'] for x in js):,.0f}–{max(x['rps'] for x in js):,.0f}"
            rows.append([name, workers, _med(js, "rps"), spread, _med(js, "p50_ms"),
                         _med(js, "p99_ms"), _med(st, "rps"), _med(st, "rps") * STREAM_CHUNKS,
                         _med(st, "p99_ms"), r["ttfb_ms"], _med(js, "cpu_ms_per_request"),
                         _med(st, "cpu_ms_per_request"),
                         sum(x["errors"] for x in js + st)])  # fmt: skip
            for kind, runs in (("json", js), ("stream", st)):
                tput.setdefault(f"{name} {kind}", []).append([workers, _med(runs, "rps")])
                key = f"{_key(name)}.{workers}w.{kind}"
                figures[key] = {
                    "rps": _med(runs, "rps"),
                    "p50_ms": _med(runs, "p50_ms"),
                    "p99_ms": _med(runs, "p99_ms"),
                    "cpu_ms_per_request": _med(runs, "cpu_ms_per_request"),
                }
                metrics += [{"name": f"{key}.rps", "value": _med(runs, "rps"),
                             "unit": "req/s", "better": "higher"},
                            {"name": f"{key}.p99_ms", "value": _med(runs, "p99_ms"),
                             "unit": "ms", "better": "lower"}]  # fmt: skip
            figures[f"{_key(name)}.{workers}w.ttfb_ms"] = r["ttfb_ms"]
            if workers == max(results):
                cdfs[name] = js[len(js) // 2]["cdf_ms"]
    ratios = []
    for workers in results:
        f = {k: v for k, v in figures.items() if isinstance(v, dict)}
        for kind in ("json", "stream"):
            ours, lite, floor = (f[f"{g}.{workers}w.{kind}"]["rps"]
                                 for g in ("llmkit", "litellm", "nginx"))  # fmt: skip
            bare = f[f"aiohttp_floor.{workers}w.{kind}"]["rps"]
            ratios.append(f"{workers} worker(s), {kind}: LLMKit / LiteLLM = {ours / lite:.1f}×, "
                          f"LLMKit / nginx = {ours / floor:.0%}, LLMKit / bare aiohttp proxy "
                          f"= {ours / bare:.0%} (req/s)")  # fmt: skip
    top = max(results)
    return {
        "title": "LLMKit vs LiteLLM's proxy vs nginx proxy_pass, one nginx mock upstream",
        "summary": ratios,
        "tables": [
            {
                "columns": [
                    "gateway",
                    "workers",
                    "JSON req/s",
                    "min–max",
                    "p50 ms",
                    "p99 ms",
                    "stream req/s",
                    "chunks/s",
                    "stream p99 ms",
                    "TTFB ms",
                    "CPU ms/req (JSON)",
                    "CPU ms/req (stream)",
                    "errors",
                ],
                "rows": rows,
                "note": f"wrk -t1 -c{connections} -d{seconds}s, {reps} repetition(s), median; "
                "each gateway's CPU is its whole process tree's utime+stime during the "
                "wrk run; wrk, the mock and the gateway share the machine's cores.",
            }
        ],  # fmt: skip
        "metrics": metrics,
        "plots": [
            {
                "file": "e2e_throughput.png",
                "kind": "lines",
                "logy": True,
                "title": "End to end: req/s vs workers",
                "xlabel": "workers",
                "ylabel": "requests/s",
                "series": tput,
            },
            {
                "file": "e2e_latency_cdf.png",
                "kind": "cdf",
                "logx": True,
                "title": f"End to end: JSON latency CDF at saturation, {top} workers",
                "xlabel": "latency ms (log)",
                "ylabel": "fraction of requests",
                "series": cdfs,
            },
        ],  # fmt: skip
        "raw": {"figures": figures, "seconds": seconds, "connections": connections},
        "commands": [
            "python -m bench e2e" + (" --quick" if reps == 1 else ""),
            f"python bench/e2e_bench.py --seconds {seconds} --reps {reps} "
            f"--connections {connections}  (2 workers only)",
        ],  # fmt: skip
    }

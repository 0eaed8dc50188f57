"""LLMKit vs LiteLLM's proxy vs nginx, in one run, in front of one nginx mock upstream.

Usage::

    python bench/e2e_bench.py [--seconds S] [--reps N] [--connections C]
                              [--litellm PATH_TO_LITELLM_BIN] [--json PATH]

Three gateways, each with 2 worker processes, proxy to the same nginx mock (one fixed
completion, one fixed 20-chunk SSE stream): LLMKit (``llmkit-serve --workers 2``),
LiteLLM's proxy (``litellm --num_workers 2``, installed in its own venv:
``python -m venv /opt/litellm-venv && /opt/litellm-venv/bin/pip install
'litellm[proxy]'``) and nginx ``proxy_pass`` (the floor: what a proxy costs when it
does nothing but proxy). wrk measures requests/s and p50/p99 at saturation;
an open-loop generator measures latency at a fixed 500 requests/s; time to first byte
of a stream is measured one request at a time. Repetitions alternate between the
gateways so that background load smears over all of them. Every figure is a median.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from _aiohttp_proxy import aiohttp_proxy
from _harness import LLMKitServer, WrkResult, machine, median_and_range, stop_group, wrk
from _loadgen import fixed_rate
from _upstreams import STREAM_CHUNKS, free_port, mock_upstream, reverse_proxy

KEY_ENV = "LLMKIT_BENCH_UPSTREAM_KEY"
MASTER_ENV = "LLMKIT_BENCH_MASTER_KEY"
# Both gateways authenticate every request against a master key: equal work.
MASTER_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
JSON_BODY = '{"model":"gpt","messages":[{"role":"user","content":"hello"}]}'
STREAM_BODY = '{"model":"gpt-stream","messages":[{"role":"user","content":"hello"}],"stream":true}'
FIXED_RATE = 500


def llmkit_config(mock_url: str) -> str:
    return f"""
[server]
master_key_env = "{MASTER_ENV}"

[[providers]]
name = "openai"
base_url = "{mock_url}/v1"
api_key_env = "{KEY_ENV}"

[[providers]]
name = "mock-stream"
base_url = "{mock_url}/stream/v1"
api_key_env = "{KEY_ENV}"

[[models]]
name = "gpt"
[[models.deployments]]
provider = "openai"
model = "gpt-4o-mini"

[[models]]
name = "gpt-stream"
[[models.deployments]]
provider = "mock-stream"
model = "gpt-4o-mini"
"""


def litellm_config(mock_url: str) -> str:
    return f"""
model_list:
  - model_name: gpt
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {mock_url}/v1
      api_key: bench-key
  - model_name: gpt-stream
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {mock_url}/stream/v1
      api_key: bench-key
litellm_settings:
  drop_params: true
  set_verbose: false
"""


@contextmanager
def litellm_proxy(binary: str, mock_url: str, workers: int = 2) -> Iterator[str]:
    """LiteLLM's proxy on a free port, as its docs start it."""
    with tempfile.TemporaryDirectory(prefix="litellm-bench-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(litellm_config(mock_url))
        port = free_port()
        log = (Path(tmp) / "litellm.log").open("w")
        env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
               "LITELLM_MASTER_KEY": MASTER_KEY}  # fmt: skip
        proc = subprocess.Popen(
            [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", str(workers)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            _wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, 180)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_group(proc, 30)
            log.close()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up in {timeout}s")


def ttfb_ms(url: str, body: str, samples: int = 200) -> float:
    """Median time to the first byte of a streamed body, one request at a time.

    One keep-alive connection, so the figure is the gateway's own first-byte latency
    and not connection setup. The client is the same for every gateway.
    """
    times = []
    headers = {"Content-Type": "application/json", **AUTH}
    with httpx.Client(timeout=30) as client:
        for _ in range(samples):
            started = time.perf_counter()
            with client.stream("POST", url, content=body, headers=headers) as response:
                pieces = response.iter_raw()
                next(pieces)
                times.append(time.perf_counter() - started)
                for _ in pieces:
                    pass
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--litellm", default="/opt/litellm-venv/bin/litellm")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument(
        "--no-floor", dest="floor", action="store_false",
        help="skip the bare aiohttp proxy (the floor of any gateway built on aiohttp)",
    )  # fmt: skip
    parser.add_argument(
        "--instructions", action="store_true",
        help="also count instructions per request, LLMKit vs the floor (callgrind, slow)",
    )  # fmt: skip
    args = parser.parse_args()
    if not shutil.which(args.litellm):
        sys.exit(f"LiteLLM not found at {args.litellm} (see this file's docstring)")
    os.environ[KEY_ENV] = "bench-key"
    os.environ[MASTER_ENV] = MASTER_KEY

    with ExitStack() as stack:
        mock = stack.enter_context(mock_upstream(workers=1))
        gateways = {
            "LLMKit": stack.enter_context(LLMKitServer(2, llmkit_config(mock.url))).url,
            "LiteLLM": stack.enter_context(litellm_proxy(args.litellm, mock.url)),
            "nginx": stack.enter_context(reverse_proxy(mock.port, workers=2)).url,
        }
        if args.floor:
            floor = aiohttp_proxy(mock.url, MASTER_KEY, free_port())
            gateways["aiohttp floor"] = stack.enter_context(floor)[0]
        results = measure(gateways, args)
        if args.instructions:
            results["instructions"] = instructions(mock.url)
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=asdict))


def instructions(mock_url: str, requests: int = 500) -> dict[str, dict[str, float]]:
    """Instructions per request of one LLMKit worker and of one floor worker, each run
    under callgrind in front of the same mock: what LLMKit's own logic costs, counted
    rather than timed (``_callgrind``)."""
    from _callgrind import worker_instructions

    # Under valgrind every request is ~50x slower and its latency erratic; the breaker's
    # latency-anomaly check would rightly open on that, so it is widened here.
    config = llmkit_config(mock_url) + "\n[breaker]\nanomaly_min_s = 1000.0\n"
    floor = [str(Path(__file__).with_name("_aiohttp_proxy.py")), "--one", mock_url, MASTER_KEY]
    counts: dict[str, dict[str, float]] = {}
    for kind, body in (("json", JSON_BODY), ("stream", STREAM_BODY)):
        counts[kind] = {
            "LLMKit": worker_instructions(config, body, AUTH, requests=requests),
            "aiohttp floor": worker_instructions("", body, AUTH, requests=requests, program=floor),
        }
    return counts


def paths(name: str) -> tuple[str, str, str, str]:
    """(json path, json body, stream path, stream body) for one gateway."""
    if name == "nginx":
        return "/v1/chat/completions", JSON_BODY, "/stream/v1/chat/completions", STREAM_BODY
    return "/v1/chat/completions", JSON_BODY, "/v1/chat/completions", STREAM_BODY


def measure(gateways: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {name: {"json": [], "stream": []} for name in gateways}
    for name, url in gateways.items():  # warm every pool and JIT-free path once
        json_path, json_body, stream_path, stream_body = paths(name)
        wrk(url + json_path, json_body, 2, args.connections, headers=AUTH)
        wrk(url + stream_path, stream_body, 2, args.connections, headers=AUTH)
    for rep in range(args.reps):
        for name, url in gateways.items():
            json_path, json_body, stream_path, stream_body = paths(name)
            print(f"rep {rep + 1}/{args.reps}: {name}", file=sys.stderr, flush=True)
            for kind, path, body in (("json", json_path, json_body),
                                     ("stream", stream_path, stream_body)):  # fmt: skip
                run = wrk(url + path, body, args.seconds, args.connections, headers=AUTH)
                results[name][kind].append(run)  # type: ignore[union-attr]
    for name, url in gateways.items():
        json_path, json_body, stream_path, stream_body = paths(name)
        results[name]["fixed"] = fixed_rate(
            url + json_path, json_body.encode(), FIXED_RATE, args.seconds, headers=AUTH
        )
        results[name]["ttfb_ms"] = ttfb_ms(url + stream_path, stream_body)
    return results


def _median(runs: object, field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)  # type: ignore[attr-defined]


def report(results: dict[str, dict[str, object]], args: argparse.Namespace) -> str:
    ours = _median(results["LLMKit"]["json"], "requests_per_s")
    lines = [
        f"Machine: {machine()}",
        f"Saturation: wrk -t1 -c{args.connections} -d{args.seconds:g}s, {args.reps} repetitions "
        "alternating between gateways, median (min–max). Each gateway runs 2 worker "
        "processes; the mock upstream is nginx with 1 worker; all on the same cores.",
        "",
        "| gateway | JSON req/s | p50 ms | p99 ms | stream req/s | chunks/s | stream p50 ms "
        f"| @{FIXED_RATE} req/s p50 / p99 ms | TTFB ms (1 client) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name == "instructions":
            continue
        js: list[WrkResult] = r["json"]  # type: ignore[assignment]
        st: list[WrkResult] = r["stream"]  # type: ignore[assignment]
        fixed = r["fixed"]
        fixed_text = f"{fixed.p50_ms:.2f} / {fixed.p99_ms:.2f}"  # type: ignore[attr-defined]
        if fixed.timeouts or fixed.errors:  # type: ignore[attr-defined]
            fixed_text += f" ({fixed.ok}/{fixed.sent} answered)"  # type: ignore[attr-defined]
        lines.append(
            f"| {name} | {median_and_range([x.requests_per_s for x in js])} "
            f"| {_median(js, 'p50_ms'):.2f} | {_median(js, 'p99_ms'):.2f} "
            f"| {median_and_range([x.requests_per_s for x in st])} "
            f"| {_median(st, 'requests_per_s') * STREAM_CHUNKS:,.0f} "
            f"| {_median(st, 'p50_ms'):.2f} | {fixed_text} | {r['ttfb_ms']:.2f} |"
        )
    litellm = _median(results["LiteLLM"]["json"], "requests_per_s")
    nginx = _median(results["nginx"]["json"], "requests_per_s")
    ours_stream = _median(results["LLMKit"]["stream"], "requests_per_s")
    litellm_stream = _median(results["LiteLLM"]["stream"], "requests_per_s")
    nginx_stream = _median(results["nginx"]["stream"], "requests_per_s")
    lines += [
        "",
        f"LLMKit / LiteLLM (JSON req/s): **{ours / litellm:.1f}×**; "
        f"streams: **{ours_stream / litellm_stream:.1f}×**",
        f"LLMKit / nginx (JSON req/s): **{ours / nginx:.0%}**; "
        f"streams: **{ours_stream / nginx_stream:.0%}**",
        f"TTFB overhead over nginx: LLMKit "
        f"{results['LLMKit']['ttfb_ms'] - results['nginx']['ttfb_ms']:+.2f} ms, LiteLLM "  # type: ignore[operator]
        f"{results['LiteLLM']['ttfb_ms'] - results['nginx']['ttfb_ms']:+.2f} ms",  # type: ignore[operator]
    ]
    if "aiohttp floor" in results:
        floor = _median(results["aiohttp floor"]["json"], "requests_per_s")
        floor_stream = _median(results["aiohttp floor"]["stream"], "requests_per_s")
        lines.append(
            f"LLMKit / bare aiohttp proxy (the floor of these parts): JSON **{ours / floor:.0%}**"
            f", streams **{ours_stream / floor_stream:.0%}**"
        )
    counted: dict[str, dict[str, float]] | None = results.get("instructions")  # type: ignore[assignment]
    if counted:
        lines.append("Instructions per request (callgrind, one worker each, median of 3 windows"
                     " of 500): " + "; ".join(
            f"{kind} LLMKit {c['LLMKit']:,.0f} vs floor {c['aiohttp floor']:,.0f} "
            f"({c['LLMKit'] / c['aiohttp floor'] - 1:+.0%})" for kind, c in counted.items()
        ))  # fmt: skip
    return "\n".join(lines)


def run(quick: bool) -> dict[str, Any]:
    """The suite's entry (``python -m bench e2e``): 1 and 2 workers; see ``_e2e_suite.py``."""
    from _e2e_suite import run as run_e2e

    return run_e2e(quick)


if __name__ == "__main__":
    main()

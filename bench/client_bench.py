"""Round trip of one demo completion: the Unix-socket client vs HTTP on loopback.

One ``llmkit-serve --workers 2 --uds`` serves every client in the same run:
``llmkit.AsyncClient`` and ``llmkit.Client`` over the socket, ``httpx.AsyncClient`` and
the openai SDK's ``AsyncOpenAI`` over HTTP. Each client first sends requests one at a
time (latency p50/p99, from which the sequential rate follows), then keeps
``--concurrency`` in flight (requests/s). Run: ``python bench/client_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai

from llmkit import AsyncClient, Client

READY = re.compile(r"llmkit: serving http://[\d.]+:(\d+) with")
MESSAGES = [{"role": "user", "content": "hello"}]
MODEL = "demo/bench"
Call = Callable[[], Awaitable[Any]]


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    sock, log = str(tmp / "llmkit.sock"), tmp / "server.log"
    (tmp / "llmkit.toml").write_text("")
    command = shutil.which("llmkit-serve") or "llmkit-serve"
    proc = subprocess.Popen(
        [command, "-c", str(tmp / "llmkit.toml"), "--port", "0", "--workers", "2",
         "--uds", sock, "--log-level", "warning"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = READY.search(log.read_text())
        if match:
            return proc, f"http://127.0.0.1:{match.group(1)}", sock
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"llmkit-serve did not start:\n{log.read_text()}")


async def latencies(call: Call, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        out.append(time.perf_counter() - started)
    return out


async def throughput(call: Call, count: int, concurrency: int) -> float:
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def measure_async(call: Call, args: argparse.Namespace) -> dict[str, float]:
    await latencies(call, args.warmup)
    samples = await latencies(call, args.requests)
    rate = await throughput(call, args.requests, args.concurrency)
    return summarize(samples, rate)


def measure_sync(client: Client, args: argparse.Namespace) -> dict[str, float]:
    def call() -> Any:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES)

    for _ in range(args.warmup):
        call()
    samples = []
    for _ in range(args.requests):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    with ThreadPoolExecutor(args.concurrency) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _: call(), range(args.requests)))
        rate = args.requests / (time.perf_counter() - started)
    return summarize(samples, rate)


def summarize(samples: list[float], rate: float) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100)
    return {"p50_ms": cuts[49] * 1e3, "p99_ms": cuts[98] * 1e3, "rps": rate}


async def run_async_clients(url: str, sock: str, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with AsyncClient(sock) as uds:
        results["llmkit.AsyncClient (uds)"] = await measure_async(
            lambda: uds.chat.completions.create(model=MODEL, messages=MESSAGES), args
        )
    body = {"model": MODEL, "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=url) as http:

        async def post() -> Any:
            response = await http.post("/v1/chat/completions", json=body)
            return response.json()

        results["httpx.AsyncClient (http)"] = await measure_async(post, args)
    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    async with sdk:
        results["openai.AsyncOpenAI (http)"] = await measure_async(
            lambda: sdk.chat.completions.create(model=MODEL, messages=MESSAGES),  # type: ignore[arg-type]
            args,
        )
    return results


def table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [
        f"demo completion, {args.requests} sequential round trips per client, then "
        f"{args.requests} with {args.concurrency} in flight; llmkit-serve --workers 2",
        "",
        "| client | p50 ms | p99 ms | req/s (concurrent) | p50 vs httpx |",
        "|---|---:|---:|---:|---:|",
    ]
    base = results["httpx.AsyncClient (http)"]["p50_ms"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['rps']:,.0f} "
            f"| {r['p50_ms'] / base:.0%} |"
        )
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="llmkit-client-bench-") as tmp:
        proc, url, sock = start_server(Path(tmp))
        try:
            results = asyncio.run(run_async_clients(url, sock, args))
            with Client(sock) as client:
                results["llmkit.Client (uds, sync)"] = measure_sync(client, args)
        finally:
            proc.terminate()
            proc.wait(30)
    return results


def run(quick: bool) -> dict[str, Any]:
    """The suite's entry (``python -m bench client``): the same clients, as report data."""
    args = argparse.Namespace(requests=500 if quick else 3000, warmup=100 if quick else 300,
                              concurrency=32)  # fmt: skip
    results = measure(args)
    base = results["httpx.AsyncClient (http)"]["p50_ms"]
    rows = [[name, r["p50_ms"], r["p99_ms"], r["rps"], f"{r['p50_ms'] / base:.0%}"]
            for name, r in results.items()]  # fmt: skip
    metrics = [
        {"name": f"{name}.{key}", "value": r[key], "unit": unit, "better": better}
        for name, r in results.items()
        for key, unit, better in (("p50_ms", "ms", "lower"), ("rps", "req/s", "higher"))
    ]
    return {
        "title": f"demo completion round trips: {args.requests} sequential, then "
                 f"{args.requests} with {args.concurrency} in flight; llmkit-serve --workers 2",
        "tables": [{"columns": ["client", "p50 ms", "p99 ms", "req/s (concurrent)",
                                "p50 vs httpx"], "rows": rows}],
        "metrics": metrics,
        "commands": [f"python bench/client_bench.py --requests {args.requests} "
                     f"--warmup {args.warmup}"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    results = measure(args)
    print(table(results, args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

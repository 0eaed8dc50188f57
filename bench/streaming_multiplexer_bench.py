"""Streaming multiplexer benchmark (the seed suite's ``streaming_multiplexer_bench``).

Usage: ``python bench/streaming_multiplexer_bench.py [--quick] [--json PATH]`` and
``python bench/streaming_multiplexer_bench.py --instructions`` (valgrind, ~30 min).

Measured, each comparison inside one run:

- deduplication on the seed workload (30% unique, 70% duplicate requests, all
  concurrent): upstream calls the mock saw, multiplexer on vs off; in-process and end
  to end over ``llmkit-serve --workers 2``;
- fan-out: SSE frames delivered per second to 100 subscribers of one stream, in one
  event loop (in-process) and to 100 HTTP clients (end to end);
- memory per subscriber: tracemalloc growth per extra subscriber of a finished
  stream, against the stream's payload size (no per-subscriber payload copies);
- overhead on unshared streams: CPU per request with the multiplexer on vs off
  (``enabled = false``): in-process and end to end (worker CPU over HTTP, demo provider
  and an OpenAI-wire deployment behind nginx), alternating rounds, median of the
  per-round ratios;
- the same overhead as a deterministic count: instructions per request under
  valgrind (callgrind), of a worker's path (shm state, control plane, the multiplexer
  with its shm table) in-process and as an HTTP server driven from outside the count;
  two runs of different lengths per side so that start-up cancels, clocks that step
  per reading and a frozen start-up heap so that runs repeat to the instruction
  in-process (over HTTP, within a few tenths of a percent: reads split where the
  kernel splits them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def steady_clocks() -> None:
    """Clocks that advance one fixed step per reading, for a counted run: the control
    plane's time-driven work (rate windows, latency averages, breaker epochs) is then
    the same in every run however slowly valgrind runs it, and counts repeat."""
    import itertools

    readings = itertools.count(10**12, 20_000)
    time.monotonic_ns = lambda: next(readings)
    time.monotonic = time.perf_counter = lambda: next(readings) / 1e9


if __name__ == "__main__" and "--count-child" in sys.argv:
    steady_clocks()  # before llmkit is imported: it binds its clock at import

import aiohttp  # noqa: E402
import msgspec  # noqa: E402

from bench._callgrind import counted_env  # noqa: E402
from bench._harness import LLMKitServer  # noqa: E402
from bench._upstreams import mock_upstream  # noqa: E402
from bench.e2e_bench import KEY_ENV, MASTER_ENV, MASTER_KEY, llmkit_config  # noqa: E402
from llmkit.config import Config, MultiplexerConfig, load_config  # noqa: E402
from llmkit.gateway import Gateway  # noqa: E402
from llmkit.mux_entry import Entry, Subscription  # noqa: E402
from llmkit.providers.base import Call  # noqa: E402
from llmkit.types import ChatRequest  # noqa: E402
from tests.mocks.openai import OpenAIMock  # noqa: E402


def request(prompt: str, stream: bool = True, seed: int = 1) -> Call:
    body = {"model": "local/m", "seed": seed, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    return Call(msgspec.convert(body, ChatRequest))


def workload(total: int, rng: random.Random) -> list[str]:
    """30% unique prompts, 70% repeats of them, shuffled."""
    unique = [f"question {i}" for i in range(int(total * 0.3))]
    prompts = unique + [rng.choice(unique) for _ in range(total - len(unique))]
    rng.shuffle(prompts)
    return prompts


def gateway_for(mock: OpenAIMock, enabled: bool = True) -> Gateway:
    config = load_config(None)
    providers = [{"name": "local", "base_url": f"{mock.url}/v1"}]
    raw = msgspec.to_builtins(config)
    raw["providers"] = providers
    raw["multiplexer"]["enabled"] = enabled
    return Gateway(msgspec.convert(raw, Config))


async def drain(stream: Any) -> int:
    return sum([1 async for _ in stream])


async def dedup_in_process(total: int, enabled: bool) -> dict[str, float]:
    with OpenAIMock(key=None) as mock:
        mock.delay_s = 0.3
        gateway = gateway_for(mock, enabled)
        prompts = workload(total, random.Random(5))
        try:
            opened = await asyncio.gather(*(gateway.stream(request(p)) for p in prompts))
            await asyncio.gather(*(drain(s) for _, s in opened))
        finally:
            await gateway.close()
        calls = len(mock.requests)
    return {"requests": total, "upstream_calls": calls, "avoided": 1 - calls / total}


async def dedup_end_to_end(total: int) -> dict[str, float]:
    with OpenAIMock(key=None) as mock:
        mock.delay_s = 0.5
        config = f'[[providers]]\nname = "local"\nbase_url = "{mock.url}/v1"\n'
        prompts = workload(total, random.Random(6))
        with LLMKitServer(2, config) as server:
            connector = aiohttp.TCPConnector(limit=total)
            async with aiohttp.ClientSession(server.url, connector=connector) as session:

                async def one(prompt: str) -> None:
                    body = {"model": "local/m", "seed": 1, "stream": True,
                            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
                    async with session.post("/v1/chat/completions", json=body) as r:
                        await r.read()

                await asyncio.gather(*(one(p) for p in prompts))
        calls = len(mock.requests)
    return {"requests": total, "upstream_calls": calls, "avoided": 1 - calls / total}


async def fan_out_in_process(subscribers: int, frames: int) -> float:
    """Frames delivered per second to ``subscribers`` readers of one live stream."""
    entry = Entry(b"bench")
    payload = [b'data: {"choices":[{"index":0,"delta":{"content":" tok%d"}}]}\n\n' % i
               for i in range(frames)]  # fmt: skip
    subs = [Subscription(entry, wants_usage=False) for _ in range(subscribers)]
    for _ in subs:
        entry.join()
    readers = [asyncio.ensure_future(drain(s)) for s in subs]
    await asyncio.sleep(0)
    started = time.perf_counter()
    for i, frame in enumerate(payload):
        entry.append(frame)
        if i % 16 == 15:
            await asyncio.sleep(0)  # a live source yields between upstream reads
    entry.finish()
    delivered = sum(await asyncio.gather(*readers))
    return delivered / (time.perf_counter() - started)


async def fan_out_end_to_end(clients: int, words: int) -> dict[str, float]:
    with OpenAIMock(key=None) as mock:
        mock.delay_s = 1.0  # everyone joins before the first chunk
        config = f'[[providers]]\nname = "local"\nbase_url = "{mock.url}/v1"\n'
        prompt = " ".join(f"w{i}" for i in range(words))
        with LLMKitServer(2, config) as server:
            connector = aiohttp.TCPConnector(limit=clients)
            async with aiohttp.ClientSession(server.url, connector=connector) as session:

                async def one() -> tuple[int, float]:
                    body = {"model": "local/m", "seed": 1, "stream": True,
                            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
                    first, count = 0.0, 0
                    async with session.post("/v1/chat/completions", json=body) as r:
                        async for piece in r.content.iter_any():
                            first = first or time.perf_counter()
                            count += piece.count(b"\n\n")
                    return count, first

                results = await asyncio.gather(*(one() for _ in range(clients)))
                ended = time.perf_counter()
        calls = len(mock.requests)
    delivered = sum(c for c, _ in results)
    firsts = [f for _, f in results]
    return {
        "upstream_calls": calls,
        "frames_delivered": delivered,
        "frames_per_s": delivered / (ended - min(firsts)),
        "first_chunk_spread_ms": (max(firsts) - min(firsts)) * 1000,
    }


async def memory_per_subscriber(frames: int, subscribers: int) -> dict[str, float]:
    entry = Entry(b"mem")
    for i in range(frames):
        entry.append(b"data: " + b"x" * 200 + b" %06d\n\n" % i)
    entry.finish()
    payload = sum(len(f) for f in entry.frames)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    subs = [Subscription(entry, wants_usage=False) for _ in range(subscribers)]
    got = [[f async for f in s] for s in subs]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    # The lists in ``got`` hold references (8 bytes each), not copies: that is the point.
    references = subscribers * frames * 8
    assert all(a is b for a, b in zip(got[-1], entry.frames, strict=True))
    return {
        "payload_bytes": payload,
        "bytes_per_subscriber": grown / subscribers,
        "of_which_test_reference_lists": references / subscribers,
    }


def demo_call(seed: int) -> Call:
    body = {"model": "demo/x", "seed": seed, "stream": True,
            "messages": [{"role": "user", "content": "hello there"}]}  # fmt: skip
    return Call(msgspec.convert(body, ChatRequest))


async def overhead(rounds: int, requests: int) -> dict[str, float]:
    """CPU seconds per unshared streamed request, multiplexer on vs off (demo provider)."""
    gateways = {
        on: Gateway(Config(multiplexer=MultiplexerConfig(enabled=on))) for on in (True, False)
    }
    samples: dict[bool, list[float]] = {True: [], False: []}
    seed = 0
    for _ in range(rounds):
        for on in (True, False):
            # Every request distinct: nothing to share, only the cost of looking.
            calls = [demo_call(seed + i) for i in range(requests)]
            seed += requests
            started = time.process_time()
            for call in calls:
                _, stream = await gateways[on].stream(call)
                await drain(stream)
                await stream.aclose()  # type: ignore[attr-defined]
            samples[on].append((time.process_time() - started) / requests)
    for gateway in gateways.values():
        await gateway.close()
    return compared(samples)


def compared(samples: dict[bool, list[float]]) -> dict[str, float]:
    """Medians per side, and the median of the rounds' on/off ratios: each round ran
    both sides back to back, so a ratio cancels what the machine did meanwhile."""
    ratios = [on / off for on, off in zip(samples[True], samples[False], strict=True)]
    return {
        "cpu_us_on": statistics.median(samples[True]) * 1e6,
        "cpu_us_off": statistics.median(samples[False]) * 1e6,
        "overhead": statistics.median(ratios) - 1,
        "rounds": len(ratios),
    }


def worker_cpu_s(server: LLMKitServer) -> float:
    """CPU seconds the server's worker processes have run so far, every thread, to
    the nanosecond (``schedstat``; ``stat``'s clock ticks are 10 ms, too coarse for
    a round of a few hundred requests)."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for child in children:
        for task in Path(f"/proc/{child}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


async def overhead_end_to_end(
    rounds: int, requests: int, upstream: str = "demo"
) -> dict[str, float]:
    """Worker CPU per unshared streamed request over HTTP, multiplexer on vs off.

    ``upstream`` "demo" is the built-in demo provider (20 tiny frames, no I/O: the
    worst case for per-frame costs); "openai" is the nginx mock behind an OpenAI-wire
    deployment, whose stream the gateway passes through a read at a time.
    """
    with contextlib.ExitStack() as stack:
        config, model = "", "demo/x"
        if upstream == "openai":
            os.environ[KEY_ENV] = "bench-key"
            os.environ[MASTER_ENV] = MASTER_KEY
            mock = stack.enter_context(mock_upstream(workers=1))
            config, model = llmkit_config(mock.url), "gpt-stream"
        servers = {
            on: stack.enter_context(
                LLMKitServer(1, f"{config}\n[multiplexer]\nenabled = {str(on).lower()}\n")
            )
            for on in (True, False)
        }
        headers = {"Authorization": f"Bearer {MASTER_KEY}"}
        samples: dict[bool, list[float]] = {True: [], False: []}
        seed = 0
        for _ in range(rounds):
            for on, server in servers.items():
                async with aiohttp.ClientSession(server.url, headers=headers) as session:

                    async def one(seed: int, session: aiohttp.ClientSession = session) -> None:
                        body = {"model": model, "seed": seed, "stream": True,
                                "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
                        async with session.post("/v1/chat/completions", json=body) as r:
                            assert r.status == 200, await r.text()
                            await r.read()

                    before = worker_cpu_s(server)
                    for start in range(0, requests, 8):
                        await asyncio.gather(*(one(seed + start + i) for i in range(8)))
                    seed += requests
                    samples[on].append((worker_cpu_s(server) - before) / requests)
    return compared(samples)


COUNT_WARMUP = 30
# Upstreams of the instruction counts: the demo provider as configured by default (20
# tiny frames), a long demo stream (200 chunks, one per read, as a model emits them:
# the multiplexer's cost is mostly per stream, so it shrinks as streams grow), or an
# OpenAI-wire deployment at a URL.
DEMO_UPSTREAMS = {"demo": "", "demo-long": "[demo]\nmax_tokens = 200\n"}


def count_config(upstream: str, on: bool) -> Config:
    """A worker's config for the instruction count: the demo provider (``upstream``
    in ``DEMO_UPSTREAMS``), or an OpenAI-wire deployment at ``upstream`` (a URL)."""
    text = DEMO_UPSTREAMS.get(upstream)
    if text is None:
        text = llmkit_config(upstream)
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as file:
        file.write(f"{text}\n[multiplexer]\nenabled = {str(on).lower()}\n")
        file.flush()
        return load_config(file.name)


async def count_requests(gateway: Gateway, model: str, requests: int) -> None:
    """``requests`` distinct streamed requests after ``COUNT_WARMUP`` of them, each read
    to the end and closed, as the HTTP surface does."""
    for seed in range(COUNT_WARMUP + requests):
        if seed == COUNT_WARMUP:
            freeze_heap()
        body = {"model": model, "seed": seed, "stream": True,
                "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
        call = Call(msgspec.convert(body, ChatRequest), key="master")
        _, stream = await gateway.stream(call)
        await drain(stream)
        await stream.aclose()  # type: ignore[attr-defined]
    await gateway.close()


def freeze_heap() -> None:
    """Start-up's objects out of the collector's sight: a full collection over them
    lands in one run and not in another, and would swamp the per-request counts."""
    gc.collect()
    gc.freeze()


def count_child(on: bool, requests: int, upstream: str) -> None:
    """Run under valgrind by ``instructions``: ``requests`` distinct streamed requests
    (after a warm-up) through a worker's in-process path: its shm state, control plane
    and, when ``on``, the multiplexer with its shm table. ``requests`` 0: serve them
    over HTTP instead, the way a worker does, until SIGTERM (the port goes to stdout)."""
    import uvloop

    from llmkit.state import SharedState

    config = count_config(upstream, on)
    model = "demo/x" if upstream in DEMO_UPSTREAMS else "gpt-stream"
    name = f"/llmkit-bench-count-{os.getpid()}"
    state = SharedState.create(name, config)
    try:
        control = state.control(config, 0)
        mux = state.multiplexer(config, 0, name) if on else None
        gateway = Gateway(config, control=control, multiplexer=mux)
        if requests:
            uvloop.run(count_requests(gateway, model, requests))
        else:
            uvloop.run(serve_counted(gateway, state))
    finally:
        state.segment.unlink()
        state.close()


async def serve_counted(gateway: Gateway, state: Any) -> None:
    """A worker's HTTP surface over ``gateway`` on a free port, until SIGTERM."""
    import signal
    import socket

    from aiohttp import web

    from llmkit.observability import Observability
    from workers.http import HttpSurface

    observability = Observability.build(gateway.config, state.metrics)
    surface = HttpSurface(gateway, state.metrics, state.metrics.workers[0], observability)
    runner = web.ServerRunner(surface.server(access_log=None))
    await runner.setup()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    await web.SockSite(runner, listener).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    freeze_heap()
    print(listener.getsockname()[1], flush=True)
    await stop.wait()
    await runner.cleanup()
    await gateway.close()
    await observability.aclose()


def callgrind(child_args: list[str], drive: Any = None) -> int:
    """Instructions a ``--count-child`` run executes, counted by callgrind; ``drive``,
    if given, gets the served port and sends the requests, then the child is stopped."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "callgrind.out")
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                   sys.executable, __file__, "--count-child", *child_args]  # fmt: skip
        env = counted_env()
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as child:  # fmt: skip
            if drive is not None:
                assert child.stdout is not None
                drive(int(child.stdout.readline()))
                child.terminate()
            if child.wait() != 0:
                raise RuntimeError(f"counted run failed: {child_args}")
        totals = [line for line in out.read_text().splitlines() if line.startswith("totals:")]
        return int(totals[0].split()[1])


def drive_http(requests: int, model: str) -> Any:
    """Sends ``requests`` distinct streamed requests, one at a time, to the port."""

    async def send(port: int) -> None:
        headers = {"Authorization": f"Bearer {MASTER_KEY}"}
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(url, headers=headers) as session:
            for seed in range(requests):
                body = {"model": model, "seed": seed, "stream": True,
                        "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
                async with session.post("/v1/chat/completions", json=body) as response:
                    assert response.status == 200, await response.text()
                    await response.read()

    return lambda port: asyncio.run(send(port))


def instructions(
    upstream: str, http: bool = False, short: int = 100, long: int = 1100
) -> dict[str, float]:
    """Instructions per unshared streamed request, multiplexer on vs off: the difference
    of a long and a short run per side, so start-up and warm-up cancel. ``http``: the
    server side of requests over HTTP (the client runs outside the count)."""
    model = "demo/x" if upstream in DEMO_UPSTREAMS else "gpt-stream"
    per: dict[bool, float] = {}
    for on in (True, False):
        side = "on" if on else "off"
        counts = [
            callgrind([side, "0", upstream], drive_http(COUNT_WARMUP + n, model))
            if http
            else callgrind([side, str(n), upstream])
            for n in (short, long)
        ]
        per[on] = (counts[1] - counts[0]) / (long - short)
    return {"instr_on": per[True], "instr_off": per[False], "overhead": per[True] / per[False] - 1}


def instructions_both(short: int = 100, long: int = 1100) -> dict[str, Any]:
    """``instructions`` for the demo provider (its default 20-frame stream, and a
    200-chunk one) and for an OpenAI-wire deployment behind nginx (outside the counted
    process), in-process and over HTTP."""
    os.environ[KEY_ENV] = "bench-key"
    os.environ[MASTER_ENV] = MASTER_KEY
    results = {}
    with mock_upstream(workers=1) as mock:
        upstreams = (("demo", "demo"), ("openai", mock.url), ("demo 200 chunks", "demo-long"))
        for name, upstream in upstreams:
            results[f"{name}, in-process"] = instructions(upstream, False, short, long)
            results[f"{name}, over HTTP (server side)"] = instructions(upstream, True, short, long)
    return results


def run(quick: bool) -> dict[str, Any]:
    """Every measurement; ``quick`` shrinks the sizes for a smoke run."""
    n = 300 if quick else 2000
    results = {
        "dedup_in_process_on": asyncio.run(dedup_in_process(n, True)),
        "dedup_in_process_off": asyncio.run(dedup_in_process(n, False)),
        "dedup_end_to_end": asyncio.run(dedup_end_to_end(150 if quick else 600)),
        "fan_out_in_process_frames_per_s": statistics.median(
            asyncio.run(fan_out_in_process(100, 500 if quick else 2000)) for _ in range(3)
        ),
        "fan_out_end_to_end": asyncio.run(fan_out_end_to_end(100, 200 if quick else 1000)),
        "memory": asyncio.run(memory_per_subscriber(1000, 100)),
        "overhead": asyncio.run(overhead(7 if quick else 21, 100 if quick else 300)),
        "overhead_end_to_end": asyncio.run(
            overhead_end_to_end(5 if quick else 11, 600 if quick else 2500)
        ),
        "overhead_openai_end_to_end": asyncio.run(
            overhead_end_to_end(5 if quick else 11, 600 if quick else 2500, "openai")
        ),
    }
    return {"metrics": declared_metrics(results), **results}


def declared_metrics(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures the suite compares across runs; the first named ``dedup`` is the
    comprehensive table's deduplication rate."""
    fan = results["fan_out_end_to_end"]
    return [
        {"name": "dedup_avoided_pct.end_to_end", "unit": "%", "better": "higher",
         "value": 100 * results["dedup_end_to_end"]["avoided"]},
        {"name": "fan_out_frames_per_s.in_process", "unit": "1/s", "better": "higher",
         "value": results["fan_out_in_process_frames_per_s"]},
        {"name": "fan_out_frames_per_s.end_to_end", "unit": "1/s", "better": "higher",
         "value": fan["frames_per_s"]},
        {"name": "bytes_per_subscriber", "unit": "B", "better": "lower",
         "value": results["memory"]["bytes_per_subscriber"]},
        {"name": "overhead_pct.openai_end_to_end", "unit": "%", "better": "lower",
         "value": 100 * results["overhead_openai_end_to_end"]["overhead"]},
        {"name": "overhead_pct.demo_end_to_end", "unit": "%", "better": "lower",
         "value": 100 * results["overhead_end_to_end"]["overhead"]},
    ]  # fmt: skip


def table(results: dict[str, Any]) -> str:
    on, off = results["dedup_in_process_on"], results["dedup_in_process_off"]
    e2e, fan = results["dedup_end_to_end"], results["fan_out_end_to_end"]
    mem, cpu, http = results["memory"], results["overhead"], results["overhead_end_to_end"]
    passed = results["overhead_openai_end_to_end"]
    rows = [
        ("dedup, in-process, 30% unique (mux on)",
         f"{on['upstream_calls']} calls / {on['requests']} req, {on['avoided']:.1%} avoided"),
        ("dedup, in-process (mux off)",
         f"{off['upstream_calls']} calls / {off['requests']} req, {off['avoided']:.1%} avoided"),
        ("dedup, end to end, 2 workers",
         f"{e2e['upstream_calls']} calls / {e2e['requests']} req, {e2e['avoided']:.1%} avoided"),
        ("fan-out, 100 subscribers, one loop",
         f"{results['fan_out_in_process_frames_per_s']:,.0f} frames/s"),
        ("fan-out, 100 HTTP clients, 2 workers",
         f"{fan['frames_per_s']:,.0f} frames/s ({fan['upstream_calls']} upstream call, "
         f"first-chunk spread {fan['first_chunk_spread_ms']:.1f} ms)"),
        ("memory per subscriber",
         f"{mem['bytes_per_subscriber']:,.0f} B (payload {mem['payload_bytes']:,} B; "
         f"{mem['of_which_test_reference_lists']:,.0f} B are the reader's own list)"),
        ("CPU per unshared stream, in-process, on vs off",
         f"{cpu['cpu_us_on']:.0f} us vs {cpu['cpu_us_off']:.0f} us ({cpu['overhead']:+.1%})"),
        ("worker CPU per unshared stream over HTTP, demo provider",
         f"{http['cpu_us_on']:.0f} us vs {http['cpu_us_off']:.0f} us ({http['overhead']:+.1%})"),
        ("worker CPU per unshared stream over HTTP, OpenAI-wire upstream",
         f"{passed['cpu_us_on']:.0f} us vs {passed['cpu_us_off']:.0f} us "
         f"({passed['overhead']:+.1%})"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def instructions_table(counts: dict[str, Any]) -> str:
    return "\n".join(
        f"instructions per unshared stream, mux on vs off, {name}: {c['instr_on']:,.0f} vs "
        f"{c['instr_off']:,.0f} ({c['overhead']:+.2%}, {c['instr_on'] - c['instr_off']:+,.0f})"
        for name, c in counts.items()
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also save results here")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="only the valgrind instruction counts of the overhead",
    )
    parser.add_argument("--count-child", nargs=3, metavar=("ON", "REQUESTS", "UPSTREAM"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.count_child:
        on, requests, upstream = args.count_child
        count_child(on == "on", int(requests), upstream)
        return
    if args.instructions:
        results = {"instructions": instructions_both()}
        print(instructions_table(results["instructions"]))
    else:
        results = run(args.quick)
        print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""LiteLLM's Router deployment selection, timed; run by ``smart_router_bench.py``.

Runs under LiteLLM's own interpreter (``/opt/litellm-venv/bin/python``), so it imports
only the standard library and ``litellm``. Prints one JSON object on its last stdout
line: per cell (routing strategy x process count) and repetition, each process's
decisions/s, CPU share and per-decision times in ns (one per batch of ``--batch``).

What is timed: ``await router.async_get_available_deployment(model="bench",
messages=MESSAGES, request_kwargs={})``, the call ``Router.acompletion`` makes once per
request, on a ``litellm.Router`` with 5 deployments of one model group and its default
in-memory cache. Latency-based routing is warmed first with 10 samples per deployment
(20, 50, 100, 200, 400 ms) through its own ``log_success_event``; cost-based routing
reads the ``input_cost_per_token`` / ``output_cost_per_token`` given in each deployment's
``litellm_params``. The asyncio tasks the call schedules (service logging) run at the
``asyncio.sleep(0)`` that ends every batch, inside the timed interval.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import multiprocessing
import os
import sys
import time
from typing import Any

LATENCIES_MS = (20, 50, 100, 200, 400)
# USD per Mtok, the same five prices as the LLMKit side.
PRICES = ((0.15, 0.60), (1.00, 5.00), (0.30, 2.50), (0.27, 1.10), (2.50, 10.00))
MESSAGES = [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]
WARMUP_DECISIONS = 200


def model_list() -> list[dict[str, Any]]:
    return [
        {
            "model_name": "bench",
            "litellm_params": {
                "model": f"openai/bench-{i}",
                "api_key": "sk-bench",
                "api_base": f"http://127.0.0.1:{9000 + i}/v1",
                "input_cost_per_token": price_in / 1e6,
                "output_cost_per_token": price_out / 1e6,
            },
            "model_info": {"id": f"deployment-{i}"},
        }
        for i, (price_in, price_out) in enumerate(PRICES)
    ]


def build_router(strategy: str) -> Any:
    import litellm

    router = litellm.Router(model_list=model_list(), routing_strategy=strategy)
    if strategy == "latency-based-routing":
        warm_latencies(router)
    return router


def warm_latencies(router: Any) -> None:
    start = datetime.datetime.now()
    for _ in range(10):
        for i, ms in enumerate(LATENCIES_MS):
            kwargs = {
                "litellm_params": {
                    "metadata": {"model_group": "bench"},
                    "model_info": {"id": f"deployment-{i}"},
                }
            }
            end = start + datetime.timedelta(milliseconds=ms)
            router.lowestlatency_logger.log_success_event(kwargs, None, start, end)


async def timed(router: Any, seconds: float, batch: int) -> tuple[float, list[float], float]:
    """Decisions/s, per-decision ns of each batch, CPU share, until ``seconds`` pass."""
    select = router.async_get_available_deployment
    for _ in range(WARMUP_DECISIONS):
        await select(model="bench", messages=MESSAGES, request_kwargs={})
    await asyncio.sleep(0)
    samples: list[float] = []
    clock = time.perf_counter_ns
    cpu_start = time.process_time()
    start = last = clock()
    deadline = start + int(seconds * 1e9)
    while last < deadline:
        for _ in range(batch):
            await select(model="bench", messages=MESSAGES, request_kwargs={})
        await asyncio.sleep(0)
        now = clock()
        samples.append((now - last) / batch)
        last = now
    wall_s = (last - start) / 1e9
    return len(samples) * batch / wall_s, samples, (time.process_time() - cpu_start) / wall_s


def worker(strategy: str, seconds: float, batch: int, barrier: Any, out: Any) -> None:
    router = build_router(strategy)
    barrier.wait()
    out.put(asyncio.run(timed(router, seconds, batch)))


def measure(strategy: str, procs: int, seconds: float, batch: int) -> dict[str, list[float]]:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    children = [
        ctx.Process(target=worker, args=(strategy, seconds, batch, barrier, out))
        for _ in range(procs)
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=seconds + 120) for _ in children]
    for child in children:
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"{strategy} worker exited with {child.exitcode}")
    return {
        "per_process": [r[0] for r in results],
        "samples_ns": [s for r in results for s in r[1]],
        "cpu_share": [r[2] for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", required=True, help="strategy:procs,strategy:procs,...")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    logging.getLogger("LiteLLM Router").setLevel(logging.ERROR)
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    results: dict[str, list[dict[str, list[float]]]] = {c: [] for c in args.cells.split(",")}
    for rep in range(args.reps):
        for strategy, procs in cells:
            print(f"rep {rep + 1}/{args.reps}: LiteLLM {strategy}, {procs}p", file=sys.stderr)
            results[f"{strategy}:{procs}"].append(
                measure(strategy, procs, args.seconds, args.batch)
            )
    version = getattr(litellm, "__version__", None) or _dist_version()
    print(json.dumps({"litellm_version": version, "cells": results}))


def _dist_version() -> str:
    from importlib.metadata import version

    return version("litellm")


if __name__ == "__main__":
    main()

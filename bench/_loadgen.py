"""An open-loop load generator: requests start on a fixed schedule, whatever happens.

wrk is closed-loop (a connection waits for its answer before sending again), so a
slow server quietly lowers the offered rate. For "latency at a fixed 500 requests/s"
the schedule must not bend: each request is due at ``start + i / rate`` and its
latency is measured from that due time (no coordinated omission). Requests still
unanswered ``timeout_s`` after they were due count as timeouts.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import aiohttp
import uvloop


@dataclass
class FixedRateResult:
    rate: float
    sent: int
    ok: int
    errors: int
    timeouts: int
    p50_ms: float
    p99_ms: float


def fixed_rate(
    url: str,
    body: bytes,
    rate: float,
    seconds: float,
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
) -> FixedRateResult:
    """Offer ``rate`` POSTs per second for ``seconds``; latency percentiles of the answers."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return uvloop.run(_run(url, body, rate, seconds, all_headers, timeout_s))


async def _run(
    url: str, body: bytes, rate: float, seconds: float, headers: dict[str, str], timeout_s: float
) -> FixedRateResult:
    latencies: list[float] = []
    outcome = {"errors": 0, "timeouts": 0}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(due: float) -> None:
            try:
                async with asyncio.timeout(timeout_s):
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            outcome["errors"] += 1
                            return
                latencies.append(time.perf_counter() - due)
            except TimeoutError:
                outcome["timeouts"] += 1
            except aiohttp.ClientError:
                outcome["errors"] += 1

        start = time.perf_counter() + 0.05
        total = int(rate * seconds)
        tasks = []
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    ok = sorted(latencies)
    p50 = statistics.median(ok) * 1000 if ok else float("nan")
    p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))] * 1000 if ok else float("nan")
    return FixedRateResult(rate, total, len(ok), outcome["errors"], outcome["timeouts"], p50, p99)

"""Instructions per request of the observability hooks alone, in one process, counted
by valgrind's callgrind: no HTTP, no upstream, so a hook's cost is not lost in a
proxied request's ~740K instructions and their ~±2K of layout noise.

The driver builds the objects a worker builds (``Observability`` over a real segment,
the proxy workload's config, a real ``Run`` with one answered attempt) and calls, per
request, what the pipeline calls in its order: the HTTP surface's draw and ``begin``,
``routed``, ``admitted``, ``attempt_started``, ``attempt_settled``, ``settled``,
``answered``, ``count`` and ``finish`` (which queues the trace with ``Tracing.record``).
Batches are taken off the queue as the worker's loop does (``Tracing._export_batch``)
and encoded as an OTLP request, but not posted. ``--upto HOOK`` stops each request
after that hook (``finish`` still runs, on what was recorded), so consecutive stages
give each hook's cost by difference.

A configuration is counted twice, ``n`` and ``n + 10,000`` requests, each in its own
process under ``valgrind --tool=callgrind``; the difference over 10,000 is the cost
of one request, start-up and imports cancelled. With ``PYTHONHASHSEED`` fixed (0 unless
set) a figure repeats within a few instructions.

Usage: ``python bench/_hooks_callgrind.py [--upto HOOK ...] [--mode M ...]``; modes:
``metrics`` (tracing off), ``unsampled`` (tracing on, the draw lost), ``sampled``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HOOKS = ("begin", "routed", "admitted", "attempt_started", "attempt_settled", "settled",
         "answered", "finish")  # fmt: skip
MODES = ("metrics", "unsampled", "sampled")
CHAT = "/v1/chat/completions"
_TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.MULTILINE)


def drive(mode: str, upto: str, n: int) -> None:
    """Run ``n`` requests' hooks in this process (what valgrind counts)."""
    asyncio.run(_drive(mode, HOOKS.index(upto), n))


async def _drive(mode: str, upto: int, n: int) -> None:
    from e2e_bench import AUTH, JSON_BODY, KEY_ENV, MASTER_ENV, MASTER_KEY, llmkit_config
    from multidict import CIMultiDict, CIMultiDictProxy

    from llmkit.config import load_config
    from llmkit.gateway import Gateway
    from llmkit.observability import Observability
    from llmkit.otlp import encode_request
    from llmkit.state import SharedState
    from llmkit.tracing import TRACEPARENT, Tracing
    from llmkit.types import Choice, Message, Usage

    os.environ[KEY_ENV] = "sk-upstream-bench"
    os.environ[MASTER_ENV] = MASTER_KEY
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "llmkit.toml")
        path.write_text(llmkit_config("http://127.0.0.1:9"))
        config = load_config(path)
    state = SharedState.create(f"/llmkit-hooks-{os.getpid()}", config)
    try:
        gateway = Gateway(config, control=state.control(config, 0))
        slot = state.metrics.workers[0]
        usage = Usage(prompt_tokens=9, completion_tokens=9, total_tokens=18)
        choices = [Choice(index=0, message=Message(role="assistant", content="hi"),
                          finish_reason="stop")]  # fmt: skip
        targets = gateway.resolve("gpt")
        sent: list[int] = []

        async def send(batch: Any) -> None:
            sent.append(len(encode_request(batch, "llmkit")))

        rate = {"metrics": 0.0, "unsampled": 1e-9, "sampled": 1.0}[mode]
        tracing = Tracing(rate, lambda batch: None, send=send) if rate else None
        observe = Observability(config, state.metrics, tracing)
        observe.count_served(slot)
        headers = CIMultiDictProxy(CIMultiDict({**AUTH, "Content-Type": "application/json"}))
        request_ids = iter(range(10**9))
        body = JSON_BODY.encode()
        count = observe.count
        for i in range(n):
            call = gateway.decode_chat(body)
            call.key = "master"
            request_id = f"abcdef01{next(request_ids):08x}"
            started = slot.enter()
            obs = None
            if observe.detailed:  # workers/http.py handle, as it is
                traceparent = headers.get(TRACEPARENT)
                observe.countdown -= 1
                if traceparent is not None or observe.countdown < 0 or observe.logging:
                    obs = observe.begin(0, "POST", CHAT, request_id, traceparent, True)
            call.obs = obs
            _pipeline(gateway, call, targets, obs, upto, usage, choices)
            count(0, 200, started, call)
            if obs is not None:
                obs.finish(200)
            if i % 64 == 63:
                await asyncio.sleep(0)  # the loop's turn: due batches leave
        if tracing is not None:
            tracing._export_batch()
            await asyncio.sleep(0)
    finally:
        state.segment.unlink()
        state.close()


def _pipeline(
    gateway: Any, call: Any, targets: Any, obs: Any, upto: int, usage: Any, choices: Any
) -> None:
    """What ``Gateway._run``, ``Run`` and ``Attempt`` call, in their order: their own
    work is done for every mode alike, the hooks only up to ``upto``."""
    from llmkit.attempts import Run

    control = gateway.control
    mark = obs.mark() if obs is not None else 0
    if obs is not None and upto >= 1:
        obs.routed(call, targets, mark)
    run = Run(control, call, targets, 100, 1, (0.0, 0.0))
    call.run = run
    run.obs = obs if upto >= 2 else None
    run.admit(call.key)
    run.obs = obs if upto >= 3 else None
    attempt = next(run.tries())
    attempt._obs = obs if upto >= 4 else None
    attempt.succeeded(usage)
    run.obs = obs if upto >= 5 else None
    run.close(usage)
    if obs is not None and upto >= 6:
        obs.answered(choices)


def count(mode: str, upto: str, n: int) -> int:
    """Instructions of one driver process of ``n`` requests under callgrind."""
    with tempfile.TemporaryDirectory(prefix="llmkit-hooks-") as tmp:
        out = Path(tmp, "callgrind.out")
        env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--cache-sim=no", "--dump-instr=no",
             "--dump-line=no", f"--callgrind-out-file={out}",
             sys.executable, __file__, "--drive", mode, upto, str(n)],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        match = _TOTALS.search(out.read_text())
        assert match is not None
        return int(match.group(1))


def per_request(mode: str, upto: str, n: int = 1000, extra: int = 10_000) -> float:
    return (count(mode, upto, n + extra) - count(mode, upto, n)) / extra


def main() -> None:
    if sys.argv[1:2] == ["--drive"]:
        drive(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", action="append", choices=MODES)
    parser.add_argument("--upto", action="append", choices=HOOKS)
    args = parser.parse_args()
    runs: list[tuple[str, str]] = []
    for mode in args.mode or MODES:
        for upto in (args.upto or ["finish"]) if mode == "sampled" else ["finish"]:
            runs.append((mode, upto))
    for mode, upto in runs:
        label = f"{mode} (up to {upto})" if mode == "sampled" else mode
        print(f"{label:32} {per_request(mode, upto):>10,.0f} instructions / request", flush=True)


if __name__ == "__main__":
    main()

"""``llmkit chat``, ``llmkit models`` and ``llmkit state``: the command line as a client.

Exit status is a contract for scripts: 0 the server answered, 1 the request failed (the
server refused it, or could not be reached), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from llmkit.errors import LLMKitError
from shm import WorkerSlot

OK, FAILED, USAGE = 0, 1, 2
WORKER_STATES = {
    WorkerSlot.FREE: "free",
    WorkerSlot.BOOTING: "booting",
    WorkerSlot.SERVING: "serving",
    WorkerSlot.DRAINING: "draining",
}


def run(args: argparse.Namespace) -> int:
    """Run one client command; errors become a message on stderr and an exit code."""
    try:
        if args.command == "state":
            return _state(args)
        return _with_client(args)
    except LLMKitError as exc:
        print(f"llmkit: {exc.status} {exc.type}: {exc.message}", file=sys.stderr)
        return FAILED


def _with_client(args: argparse.Namespace) -> int:
    from llmkit.client import Client

    socket, url = _where(args)
    if not socket and not url:
        print("llmkit: give --socket PATH or --url URL (or set LLMKIT_SOCKET)", file=sys.stderr)
        return USAGE
    with Client(socket, base_url=url, api_key=args.key, timeout=args.timeout) as client:
        if args.command == "models":
            for model in client.models.list().data:
                print(model.id)
            return OK
        return _chat(client, args)


def _where(args: argparse.Namespace) -> tuple[str | None, str | None]:
    if args.socket or args.url:
        return args.socket, args.url
    socket = os.environ.get("LLMKIT_SOCKET")
    return (socket, None) if socket else (None, os.environ.get("LLMKIT_URL"))


def _chat(client: Any, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    params: dict[str, Any] = {"model": args.model, "messages": messages}
    if args.max_tokens:
        params["max_tokens"] = args.max_tokens
    if args.no_stream:
        reply = client.chat.completions.create(**params)
        print(reply.choices[0].message.content or "")
        return OK
    with client.chat.completions.create(**params, stream=True) as stream:
        for chunk in stream:
            for choice in chunk.choices:
                if isinstance(choice.delta.content, str):
                    sys.stdout.write(choice.delta.content)
                    sys.stdout.flush()
    sys.stdout.write("\n")
    return OK


def _state(args: argparse.Namespace) -> int:
    import httpx

    if not args.url:
        print("llmkit: give --url URL (or set LLMKIT_URL)", file=sys.stderr)
        return USAGE
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        response = httpx.get(
            f"{args.url.rstrip('/')}/admin/state", headers=headers, timeout=args.timeout
        )
    except httpx.HTTPError as exc:
        print(f"llmkit: cannot reach {args.url}: {exc}", file=sys.stderr)
        return FAILED
    if response.status_code != 200:
        print(f"llmkit: {response.status_code}: {response.text.strip()}", file=sys.stderr)
        return FAILED
    _print_state(response.json())
    return OK


def _print_state(state: dict[str, Any]) -> None:
    names = {index: name for name, index in state.get("deployments", {}).items()}
    rows: list[tuple[str, ...]] = [
        ("DEPLOYMENT", "BREAKER", "REQUESTS", "ERROR RATE", "LATENCY MS", "TTFT MS")
    ]
    for b in state.get("breakers", []):
        rows.append((
            names.get(b["index"], str(b["index"])), b["state"], str(b["window_requests"]),
            f"{b['error_rate']:.2f}", _ms(b["latency_s"]), _ms(b["ttft_s"]),
        ))  # fmt: skip
    _table(rows)
    rows = [("LIMIT", "RPM", "TPM", "CONCURRENCY", "REQUESTS LEFT", "TOKENS LEFT")]
    for lim in state.get("limits", []):
        rows.append((
            lim["name"], str(lim["rpm"]), str(lim["tpm"]), str(lim["max_concurrency"]),
            str(lim.get("requests_remaining", "-")), str(lim.get("tokens_remaining", "-")),
        ))  # fmt: skip
    print()
    _table(rows)
    rows = [("WORKER", "PID", "STATE", "IN FLIGHT", "SERVED")]
    for w in state.get("workers", []):
        rows.append((
            str(w["slot"]), str(w["pid"]), WORKER_STATES.get(w["state"], str(w["state"])),
            str(w["in_flight"]), str(w["served"]),
        ))  # fmt: skip
    print()
    _table(rows)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )

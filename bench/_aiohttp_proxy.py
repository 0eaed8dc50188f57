"""The aiohttp floor: a bare reverse proxy built from the same parts as LLMKit.

aiohttp's low-level server in front, one pooled aiohttp client session behind, uvloop,
one process per worker on a shared listening socket, a constant-time check of the
bearer key, and nothing else: no config, no limits, no routing, no metrics. What it
serves is the most any gateway built on these parts can serve on this machine, so
LLMKit's distance to it is what LLMKit's own logic costs.

Run as a script (``python bench/_aiohttp_proxy.py PORT UPSTREAM_URL KEY WORKERS``), as
one in-process worker (``--one UPSTREAM_URL KEY PORT_FILE``, for ``_callgrind``), or
through ``aiohttp_proxy()``.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import uvloop
from _harness import stop_group
from aiohttp import web

STREAM_MARK = b'"stream":true'


def serve(sock: socket.socket, upstream: str, key: str) -> None:
    """One worker: proxy POST bodies to ``upstream``; streams go to its /stream route."""
    expected = f"Bearer {key}".encode()

    async def main() -> None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=30)
        )

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            auth = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(auth, expected):
                return web.Response(status=401)
            body = await request.read()
            headers = {"Content-Type": "application/json"}
            if STREAM_MARK not in body:
                async with session.post(
                    f"{upstream}/v1/chat/completions", data=body, headers=headers
                ) as answer:
                    return web.Response(body=await answer.read(), headers=headers)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            try:
                await response.prepare(request)
                async with session.post(
                    f"{upstream}/stream/v1/chat/completions", data=body, headers=headers
                ) as answer:
                    async for piece in answer.content.iter_any():
                        await response.write(piece)
                await response.write_eof()
            except ConnectionResetError:  # the load generator hung up at the end of its run
                pass
            return response

        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        runner = web.ServerRunner(web.Server(handle))
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await stop.wait()
        await runner.cleanup()
        await session.close()

    uvloop.run(main())


def run(port: int, upstream: str, key: str, workers: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            serve(sock, upstream, key)
            os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(c, signal.SIGTERM) for c in children])
    for child in children:
        os.waitpid(child, 0)


@contextmanager
def aiohttp_proxy(
    upstream: str, key: str, port: int, workers: int = 2
) -> Iterator[tuple[str, int]]:
    """The floor proxy on ``port`` in front of ``upstream``; yields its URL and pid."""
    proc = subprocess.Popen(
        [sys.executable, __file__, str(port), upstream, key, str(workers)],
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the aiohttp floor proxy did not start") from None
            time.sleep(0.1)
    try:
        yield url, proc.pid
    finally:
        stop_group(proc, 10)


def run_one(upstream: str, key: str, port_file: str) -> None:
    """One worker in this process on a free port, written to ``port_file`` (how
    ``_callgrind`` runs a server under valgrind: no fork)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    with open(port_file, "w") as out:
        out.write(str(sock.getsockname()[1]))
    serve(sock, upstream, key)


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        run_one(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        run(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))

"""One worker process: a uvloop event loop serving HTTP (and the Unix socket) over a Gateway.

HTTP is served on the TCP listener; the Unix socket speaks the frame protocol of
``llmkit.frames`` (``workers.uds``) for ``llmkit.client``.

Forked by the supervisor with the listening sockets already bound. The worker attaches
to the shared segment, writes a heartbeat into its slot every 250 ms, and on SIGTERM
stops accepting, lets in-flight requests finish (up to ``server.drain_timeout_s``) and
exits 0. Exit codes are a contract with the supervisor (see ``WORKER_BOOT_ERROR``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass

import uvloop
from aiohttp import web

from llmkit.config import Config
from llmkit.gateway import Gateway
from llmkit.observability import Observability
from llmkit.state import SharedState
from shm import WorkerSlot
from workers.accept import SharedSite
from workers.http import GatewayServer, HttpSurface
from workers.uds import FrameServer

log = logging.getLogger("llmkit.worker")

WORKER_OK = 0
WORKER_BOOT_ERROR = 3
HEARTBEAT_S = 0.25
ACCEPT_GRACE_S = 0.2


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor hands a worker at fork."""

    config: Config
    slot: int
    shm_name: str
    tcp: socket.socket
    uds: socket.socket | None


def run(spec: WorkerSpec) -> int:
    """Boot and serve until SIGTERM; the return value is the process exit code."""
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C and a hangup reach the whole process group; only the supervisor decides.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    try:
        state = SharedState.attach(spec.shm_name, spec.config)
        control = state.control(spec.config, spec.slot)
        mux = None
        if spec.config.multiplexer.enabled:
            mux = state.multiplexer(spec.config, spec.slot, spec.shm_name)
        gateway = Gateway(spec.config, control=control, multiplexer=mux)
        observability = Observability.build(spec.config, state.metrics)
    except Exception as exc:
        print(f"llmkit: worker {spec.slot} failed to boot: {exc}", file=sys.stderr, flush=True)
        return WORKER_BOOT_ERROR
    try:
        return uvloop.run(Worker(spec, state, gateway, observability).serve())
    except Exception:
        traceback.print_exc()
        return 1


class Worker:
    """The event-loop side of one worker process."""

    def __init__(
        self, spec: WorkerSpec, state: SharedState, gateway: Gateway, observability: Observability
    ) -> None:
        self._spec = spec
        self._observability = observability
        self._state = state
        self._gateway = gateway
        self._slot: WorkerSlot = state.metrics.workers[spec.slot]
        self._stop = asyncio.Event()
        self._frames = FrameServer(gateway, self._slot, observability)
        self._http: GatewayServer | None = None  # once started: its open connections

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        beating = asyncio.create_task(self._heartbeat())
        runner = await self._start()
        # What boot built lives as long as the worker: out of the collector's reach, a
        # full collection scans only what requests made, not every module and config
        # object (and does not write to pages shared with the supervisor).
        gc.freeze()
        self._slot.set_state(WorkerSlot.SERVING)
        await self._stop.wait()
        self._slot.set_state(WorkerSlot.DRAINING)
        for site in list(runner.sites):
            await site.stop()
        self._frames.close()
        # A connection accepted just before the listener closed may not have sent its
        # request yet; aiohttp would close it as idle. Give it a moment to be read.
        await asyncio.sleep(ACCEPT_GRACE_S)
        drain_s = self._spec.config.server.drain_timeout_s
        await asyncio.gather(runner.cleanup(), self._frames.drain(drain_s))
        await self._gateway.close()
        await self._observability.aclose()
        beating.cancel()
        return WORKER_OK

    async def _start(self) -> web.ServerRunner:
        server = self._spec.config.server
        surface = HttpSurface(self._gateway, self._state.metrics, self._slot, self._observability)
        handler = surface.server(
            access_log=None,
            max_line_size=server.max_header_bytes,
            max_field_size=server.max_header_bytes,
        )
        self._http = handler
        runner = web.ServerRunner(handler, shutdown_timeout=server.drain_timeout_s)
        await runner.setup()
        if server.reuse_port:
            await web.SockSite(runner, own_listener(self._spec.tcp), backlog=2048).start()
        else:
            workers = self._state.metrics.workers
            peers = [slot for i, slot in enumerate(workers) if i != self._spec.slot]
            await SharedSite(runner, self._spec.tcp, self._slot, peers).start()
        if self._spec.uds is not None:
            await self._frames.start(self._spec.uds)
        if self._gateway.multiplexer is not None:
            await self._gateway.multiplexer.start()
        return runner

    async def _heartbeat(self) -> None:
        """Every ``HEARTBEAT_S``: the beat, and the connections open (closes lower it)."""
        while True:
            self._slot.beat(time.monotonic_ns())
            if self._http is not None:
                self._slot.set_connections(self._http.open_connections)
            await asyncio.sleep(HEARTBEAT_S)


def own_listener(held: socket.socket) -> socket.socket:
    """This worker's listening socket on the address the supervisor holds (``held``, bound
    with SO_REUSEPORT): the kernel hashes each new connection to one of the workers'
    listeners, so a burst of connections spreads over the workers instead of going to
    whichever accepts first. Connections queued in it when the worker dies are reset."""
    sock = socket.socket(held.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(held.getsockname())
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def main(spec: WorkerSpec) -> None:
    """Entry point in the forked child: never returns into the supervisor's code."""
    code = 1
    try:
        code = run(spec)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

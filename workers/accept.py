"""The HTTP listener all workers share, accepted from with an eye on the other workers.

Every worker inherits the supervisor's one listening socket. Served the usual way
(``loop.create_server(sock=...)``), a worker's loop accepts every connection waiting
when the socket turns readable, so the first worker to wake takes a whole burst: with
32 keep-alive connections opened at once, one of two workers held all 32 in half the
runs of ``bench/serve_bench.py``, and the other sat idle for as long as they lived.

``SharedSite`` accepts one connection per turn of its loop, and before each it reads
how many connections the other serving workers hold (their shm slots, ``WorkerSlot.
connections``: each worker writes its count there as it accepts, and with every
heartbeat, as connections close). A worker that holds more than
``SLACK`` above the fewest steps back once for ``DEFER_S``, which lets a peer that is
slower to wake take the connection; if none has by then, it accepts anyway. So nothing
is stranded: a connection waits in the shared queue only until some worker takes it,
and a peer that has stalled (no heartbeat for ``STALE_NS``) or is draining is not
waited for. (``server.reuse_port`` is the other way: a socket per worker, balanced by
the kernel's hash, at the price its README section gives.)

Measured against the loop's own accept, 2 workers, ``wrk -c32``, alternating in one
session: keep-alive connections split 14-16 / 16-18 in 6 runs of 6 (28,100 req/s
median) where the loop's accept put all 32 on one worker in 4 (14,300-16,800 req/s);
with a new connection per request, 10,230 req/s against 11,540 (-11%): each connection
is handed to aiohttp by a task (``connect_accepted_socket``), not by uvloop's C loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Sequence

from aiohttp import web

from shm import WorkerSlot
from workers.http import GatewayServer

log = logging.getLogger("llmkit.worker")

SLACK = 4  # connections a worker may hold above the fewest before it steps back
DEFER_S = 0.001  # how long it steps back: a sleeping peer's loop wakes well within it
STALE_NS = 1_000_000_000  # a peer silent this long (4 heartbeats) is not waited for
# accept() failures that mean "out of a resource for now", not "this connection failed":
# back off instead of spinning on a socket that stays readable.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
EXHAUSTED_BACKOFF_S = 0.1


class SharedSite(web.BaseSite):
    """An aiohttp site over a listening socket that ``peers`` (the other workers' slots)
    accept from too; ``slot`` is this worker's, where its count goes as it accepts."""

    __slots__ = ("_sock", "_slot", "_peers", "_hand_overs", "_deferred", "_resuming")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        slot: WorkerSlot,
        peers: Sequence[WorkerSlot],
    ) -> None:
        super().__init__(runner)
        self._sock = sock
        self._slot = slot
        self._peers = peers
        # Accepted, not yet a connection of aiohttp's (and kept: the loop holds tasks weakly).
        self._hand_overs: set[asyncio.Task[None]] = set()
        self._deferred = False  # stepped back for the connection now waiting
        self._resuming: asyncio.TimerHandle | None = None  # the step back's end

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    async def stop(self) -> None:
        """Stop accepting: connections accepted are the runner's to drain; those still
        waiting stay in the socket for the other workers."""
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        if self._resuming is not None:
            self._resuming.cancel()
        await super().stop()

    def open_connections(self) -> int:
        server = self._runner.server
        assert isinstance(server, GatewayServer)
        return len(self._hand_overs) + server.open_connections

    def _readable(self) -> None:
        """A connection waits (level-triggered: called again next turn while any do)."""
        if not self._deferred and self._over_share():
            self._step_back(DEFER_S, deferred=True)
            return
        self._deferred = False
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                log.warning("accept failed: %s; retrying in %gs", exc, EXHAUSTED_BACKOFF_S)
                self._step_back(EXHAUSTED_BACKOFF_S, deferred=False)
            return  # ECONNABORTED and the like: that client is gone, the next waits
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._hand_over(conn))
        self._hand_overs.add(task)
        task.add_done_callback(self._hand_overs.discard)
        self._slot.set_connections(self.open_connections())

    async def _hand_over(self, conn: socket.socket) -> None:
        factory = self._runner.server
        assert factory is not None
        try:
            await asyncio.get_running_loop().connect_accepted_socket(factory, conn)
        except OSError:
            conn.close()  # reset before it could be served

    def _over_share(self) -> bool:
        return over_share(self.open_connections(), self._peers, time.monotonic_ns())

    def _step_back(self, delay_s: float, deferred: bool) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        self._deferred = deferred
        self._resuming = loop.call_later(delay_s, self._resume)

    def _resume(self) -> None:
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)


def over_share(held: int, peers: Sequence[WorkerSlot], now_ns: int) -> bool:
    """A worker holding ``held`` connections holds more than ``SLACK`` above the peer
    with fewest, among those serving with a heartbeat newer than ``STALE_NS``."""
    fewest = min(
        (peer.connections for peer in peers
         if peer.state == WorkerSlot.SERVING and now_ns - peer.heartbeat_ns < STALE_NS),
        default=None,
    )  # fmt: skip
    return fewest is not None and held > fewest + SLACK

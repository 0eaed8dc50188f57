"""The Unix-socket frame server: handshake, limits, malformed input, and a fuzzer.

The fuzz tests drive ``workers.uds.FrameConnection`` in-process over an in-memory
stream, which is the worker's own code path minus the socket; the end-to-end tests
send raw bytes to a real ``llmkit-serve --uds`` and check the workers survive.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat
import struct
import time
import tracemalloc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmkit import frames
from llmkit.client import Client
from llmkit.config import default_config
from llmkit.frames import Hello, Request, Welcome
from llmkit.gateway import Gateway
from tests.conftest import Server, StartServer
from workers.uds import FrameConnection, FrameServer


class MemoryWriter:
    """What ``FrameConnection`` needs of a ``StreamWriter``, keeping what it writes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def drain(self) -> None:
        return None


class Harness:
    """One event loop and one frame server over a demo gateway, reused across cases."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        config = msgspec.structs.replace(
            default_config(), server=msgspec.structs.replace(default_config().server,
                                                             max_body_bytes=4096)
        )  # fmt: skip
        slot = SimpleNamespace(enter=time.monotonic_ns, leave=lambda: None)
        observe = SimpleNamespace(counting=False, detailed=False)  # shm: test_client.py
        self.server = FrameServer(Gateway(config), slot, observe)  # type: ignore[arg-type]

    def feed(self, data: bytes, linger: float = 0) -> MemoryWriter:
        """Serve one connection that sends ``data`` and hangs up; return what came back."""
        return self.loop.run_until_complete(self._serve(data, linger))

    async def _serve(self, data: bytes, linger: float) -> MemoryWriter:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        # Hanging up cancels what is in flight; ``linger`` lets requests finish first.
        asyncio.get_running_loop().call_later(linger, reader.feed_eof)
        writer = MemoryWriter()
        conn = FrameConnection(self.server, reader, writer)  # type: ignore[arg-type]
        await conn.serve()
        await asyncio.sleep(0)
        return writer

    def feed_data(self, data: bytes, linger: float = 0) -> bytearray:
        return self.feed(data, linger).data

    def close(self) -> None:
        self.loop.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    running = Harness()
    yield running
    running.close()


HELLO = frames.encode(Hello(version=frames.PROTOCOL_VERSION))


def replies(data: bytes | bytearray) -> list[frames.ServerFrame]:
    out, view = [], memoryview(bytes(data))
    while view:
        (length,) = struct.unpack(">I", view[:4])
        out.append(frames.decode_server(bytes(view[4 : 4 + length])))
        view = view[4 + length :]
    return out


VALID = [
    msgspec.msgpack.encode(Request(id=1, op="models")),
    msgspec.msgpack.encode(Request(id=2, op="chat", body=b'{"model": "demo/x"}')),
    msgspec.msgpack.encode({"t": "request", "id": -1, "op": "health"}),
    msgspec.msgpack.encode({"t": "cancel", "id": 1}),
]
# Random bytes, or a real frame with random bytes spliced in: mostly-valid input reaches
# deeper than noise does.
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda p, at, junk: p[:at] + junk + p[at + len(junk):],
              st.sampled_from(VALID), st.integers(0, 40), st.binary(max_size=4)),
)  # fmt: skip


def framed(payload: bytes, cut: int | None) -> bytes:
    data = struct.pack(">I", len(payload)) + payload
    return data if cut is None else data[:cut]


connections = st.tuples(
    st.booleans(), st.lists(st.tuples(payloads, st.none() | st.integers(0, 80)), max_size=2)
)


# 2,000 examples of 5 connections each: 10,000 cases, at a fifth of the generation cost.
@settings(
    max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cases=st.lists(connections, min_size=5, max_size=5))
def test_fuzzed_frames_get_an_error_or_an_answer_never_a_crash(
    harness: Harness, cases: list[tuple[bool, list[tuple[bytes, int | None]]]]
) -> None:
    for hello, body in cases:
        data = (HELLO if hello else b"") + b"".join(framed(p, cut) for p, cut in body)
        writer = harness.feed(data)
        assert writer.closed
        for reply in replies(writer.data):
            if isinstance(reply, frames.Error):
                assert reply.status in (400, 401, 404, 413, 500) and reply.message


def test_fuzzing_does_not_leak_memory(harness: Harness) -> None:
    rng = random.Random(6)

    def case() -> bytes:
        payload = rng.randbytes(rng.randrange(64))
        if rng.random() < 0.5:
            req = Request(id=rng.randrange(1, 99), op="models")
            payload = msgspec.msgpack.encode(req)[: rng.randrange(1, 40)]
        return HELLO + framed(payload, rng.choice([None, rng.randrange(70)]))

    for _ in range(1000):
        harness.feed(case())
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(10_000):
        harness.feed(case())
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(diff.size_diff for diff in after.compare_to(before, "filename"))
    assert grown < 256 * 1024, f"{grown} bytes kept across 10,000 malformed frames"


def test_hello_must_come_first_and_match_the_version(harness: Harness) -> None:
    [error] = replies(harness.feed_data(frames.encode(Hello(version=99))))
    assert isinstance(error, frames.Error) and error.id == 0
    assert error.code == "protocol_version" and "99" in error.message
    [error] = replies(harness.feed_data(frames.encode(Request(id=1, op="models"))))
    assert isinstance(error, frames.Error) and error.code == "bad_frame"


def test_oversized_frame_is_refused_before_it_is_read(harness: Harness) -> None:
    welcome, error = replies(harness.feed_data(HELLO + struct.pack(">I", 1 << 30)))
    assert isinstance(welcome, Welcome)
    assert isinstance(error, frames.Error) and error.status == 413


def test_requests_are_answered_by_id(harness: Harness) -> None:
    models = frames.encode(Request(id=7, op="models"))
    chat = frames.encode(
        Request(
            id=8,
            op="chat",
            body=b'{"model": "nope/x", "messages": [{"role": "user", "content": "hi"}]}',
        )
    )
    out = replies(harness.feed_data(HELLO + models + chat, linger=0.1))
    by_id: dict[int, Any] = {r.id: r for r in out if not isinstance(r, Welcome)}
    assert isinstance(by_id[7], frames.Result)
    assert isinstance(by_id[8], frames.Error) and by_id[8].status == 404


# -- a real server -----------------------------------------------------------------


def raw_exchange(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


@pytest.mark.multiprocess
def test_socket_is_0600_and_garbage_never_kills_a_worker(start_server: StartServer) -> None:
    server: Server = start_server()
    assert stat.S_IMODE(os.stat(server.uds).st_mode) == 0o600
    pids = server.worker_pids()
    rng = random.Random(1)
    for _ in range(200):
        junk = rng.randbytes(rng.randrange(1, 200))
        raw_exchange(server.uds, rng.choice([b"", HELLO]) + junk)
    with Client(server.uds) as client:
        assert client.health()["status"] == "ok"
    assert server.worker_pids() == pids

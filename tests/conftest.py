"""Shared fixtures: a real ``llmkit-serve`` process tree on a free port, and one page of
anonymous shared memory for tests that fork processes onto it.

Every server gets port 0 (the kernel picks a free one, read back from the ready line),
its own shared-memory name and its own socket path, so tests run in parallel under
pytest-xdist and leave nothing behind.
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llmkit.cluster import SYNC_PROCESS_NAME
from shm._atomics import Atomics

READY = re.compile(r"llmkit: serving http://([\d.]+):(\d+) with (\d+) workers \(pid (\d+)")
_counter = itertools.count()


def serve_command() -> list[str]:
    script = shutil.which("llmkit-serve")
    if script:
        return [script]
    code = "import sys; from llmkit.cli import serve_main; sys.exit(serve_main())"
    return [sys.executable, "-c", code]


class Server:
    """A running ``llmkit-serve`` started by a test."""

    def __init__(self, tmp: Path, config: str = "", workers: int = 2, uds: bool = True) -> None:
        self.tmp = tmp
        self.config_path = tmp / "llmkit.toml"
        self.config_path.write_text(config)
        self.shm_name = f"/llmkit-t{os.getpid()}-{next(_counter)}"
        self.uds = str(tmp / "llmkit.sock") if uds else ""
        self.log_path = tmp / "server.log"
        args = [
            *serve_command(), "--config", str(self.config_path), "--port", "0",
            "--workers", str(workers), "--shm-name", self.shm_name,
        ]  # fmt: skip
        if self.uds:
            args += ["--uds", self.uds]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self.port, self.workers = self._wait_ready()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 20.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY.search(self.log())
            if match:
                return int(match.group(2)), int(match.group(3))
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict[int, str]:
        """The supervisor's child processes, pid -> process name (``/proc/<pid>/comm``)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        names = {}
        for pid in map(int, path.read_text().split()):
            try:
                names[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
            except (FileNotFoundError, ProcessLookupError):
                continue  # exited between the two reads
        return names

    def worker_pids(self) -> set[int]:
        """The workers only: not the cluster sync task, which is a child too."""
        return {pid for pid, name in self.children().items() if name != SYNC_PROCESS_NAME}

    def sync_pid(self) -> int | None:
        """The cluster sync task's pid, if one is running."""
        pids = [pid for pid, name in self.children().items() if name == SYNC_PROCESS_NAME]
        assert len(pids) <= 1, f"more than one sync task: {pids}"
        return pids[0] if pids else None

    def wait_workers(
        self, count: int, exclude: frozenset[int] | set[int] = frozenset(), timeout: float = 10
    ) -> set[int]:
        """Wait until exactly ``count`` workers, none in ``exclude``, answer /health."""
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        while time.monotonic() < deadline:
            children = self.worker_pids()
            pids = children - exclude
            seen |= {self.health_pid()} & pids
            if len(pids) == count and seen == pids and children == pids:
                return pids
            time.sleep(0.01)
        raise AssertionError(f"workers not serving: seen {seen}, children {self.worker_pids()}")

    def health_pid(self) -> int:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            return int(client.get("/health").json()["pid"])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Factory: ``start_server(config_toml, workers=2)``; stops every server it started."""
    started: list[Server] = []

    def start(config: str = "", workers: int = 2, uds: bool = True) -> Server:
        server = Server(tmp_path / f"s{len(started)}", config, workers, uds)
        started.append(server)
        return server

    for i in range(8):
        (tmp_path / f"s{i}").mkdir()
    yield start
    for server in started:
        server.stop()
        assert not Path(f"/dev/shm{server.shm_name}").exists(), "segment left behind"


@pytest.fixture
def server(start_server: StartServer) -> Server:
    """A two-worker server on the demo provider."""
    return start_server()


@pytest.fixture
def shared() -> Iterator[Atomics]:
    """An anonymous shared mmap page and its Atomics, inherited by forked children."""
    mm = mmap.mmap(-1, mmap.PAGESIZE)
    atomics = Atomics(mm)
    yield atomics
    atomics.release()
    mm.close()

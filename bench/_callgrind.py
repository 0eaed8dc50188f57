"""Instructions per request of one LLMKit worker, counted by valgrind's callgrind.

Wall-clock CPU under wrk moves by 1-2% between runs on a shared machine; an instruction
count does not. ``worker_instructions(config, body, headers)`` serves ``config`` from
one worker process running under ``valgrind --tool=callgrind``, sends warm-up requests,
zeroes the counters (``callgrind_control -z``), sends ``requests`` more from a few
keep-alive connections, dumps the counters (``callgrind_control -d``) and returns the
instructions per request, the median over ``reps`` such windows.

The worker runs the real worker entry (``workers.worker.run``) in the process valgrind
starts, not forked by the supervisor: valgrind's gdbserver, through which
``callgrind_control`` reaches a process, is not there in a forked child. This process
plays the supervisor's boot part (bind, create the segment) and nothing else, so the
production path is exactly what is counted, and nothing in it knows about valgrind.
Instrumentation starts off (``--instr-atstart=no``), so imports run at valgrind's
uninstrumented speed; it is switched on before the warm-up. The worker runs in
``counted_env``'s layout: ``PYTHONHASHSEED=0`` unless the caller's environment sets
another seed, and an environment padded by that seed.

``CallgrindWorker(config, variants=[...])`` serves configs that differ in
``[observability]`` from one process, switched between windows (``use``), so that they
are compared in one memory layout.

Usage, alone: ``python bench/_callgrind.py CONFIG.toml BODY_JSON [requests]`` (the demo
provider needs no upstream).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.MULTILINE)
CHAT = "/v1/chat/completions"


LAYOUT_PAD = "LLMKIT_BENCH_LAYOUT"
PAD_PER_SEED = 37  # bytes: a different pymalloc size class for each of seeds 0-3


def counted_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a counted process: one memory layout per hash seed.

    The seed (``PYTHONHASHSEED``, 0 unless set) fixes str hashes and with them dict probe
    sequences; with a random one, counts of one configuration moved by up to ~0.4%
    between processes. It also pads the environment by ``PAD_PER_SEED`` bytes per unit,
    which shifts the heap addresses of what is allocated after it, interned attribute
    names among them: CPython's method cache is indexed by those addresses, so its
    collisions, and counts by up to ~2%, change with the layout, which a seed alone
    does not move. A figure is then the mean over seeds 0-3, i.e. over four layouts.
    """
    seed = os.environ.get("PYTHONHASHSEED", "0")
    pad = "x" * (PAD_PER_SEED * int(seed)) if seed.isdigit() else ""
    return {**os.environ, **(extra or {}), "PYTHONHASHSEED": seed, LAYOUT_PAD: pad}


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


class CallgrindWorker:
    """One worker serving ``config`` under callgrind, on a free 127.0.0.1 port.

    ``program``, when given, is run instead of an LLMKit worker (a Python script and
    its arguments; the port file's path is appended): any server that binds port 0
    and writes its port there, such as the aiohttp floor proxy.
    """

    def __init__(
        self,
        config: str,
        start_timeout_s: float = 300.0,
        program: list[str] | None = None,
        variants: Sequence[str] = (),
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="llmkit-callgrind-")
        path = Path(self._dir.name)
        (path / "llmkit.toml").write_text(config)
        self._port_file = path / "port"
        self._out = path / "callgrind.out"
        self._log = (path / "worker.log").open("w+")
        self._switch = path / "variant"
        served = program or [__file__, "--serve", str(path / "llmkit.toml")]
        for index, variant in enumerate(variants):
            (path / f"variant{index}.toml").write_text(variant)
            served += ["--variant", str(path / f"variant{index}.toml")]
        args = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=no",
            "--dump-instr=no", "--dump-line=no", "--compress-strings=no",
            f"--callgrind-out-file={self._out}",
            sys.executable, *served, str(self._port_file),
        ]  # fmt: skip
        pythonpath = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env = counted_env({"PYTHONPATH": pythonpath})
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.port = self._wait_port(start_timeout_s)
        self._control("-i", "on")
        self._dumps = 0
        self.zeroed_at = 0.0  # when counted() last zeroed the counters (time.monotonic)

    def _wait_port(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._port_file.exists() and self._port_file.read_text().strip():
                return int(self._port_file.read_text())
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self._log.seek(0)
        raise RuntimeError(f"the callgrind worker did not start:\n{self._log.read()[-4000:]}")

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.proc.pid)], check=True,
                       capture_output=True, timeout=120)  # fmt: skip

    def use(self, variant: int, timeout_s: float = 120.0) -> None:
        """Serve with the observability of ``variants[variant]`` from now on (``serve``)."""
        self._switch.write_text(str(variant))
        acknowledged = Path(f"{self._switch}.ack")
        acknowledged.unlink(missing_ok=True)
        deadline = time.monotonic() + timeout_s
        signalled = 0.0
        while not (acknowledged.exists() and acknowledged.read_text() == str(variant)):
            if time.monotonic() - signalled > 1.0:  # again: a booting worker ignores it
                self.proc.send_signal(signal.SIGUSR1)
                signalled = time.monotonic()
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"the worker did not switch to variant {variant}:\n"
                                   f"{self._log.read()[-4000:]}")  # fmt: skip
            time.sleep(0.05)

    def instructions(
        self, body: str, headers: Mapping[str, str], requests: int, connections: int
    ) -> int:
        """Instructions the worker executed while answering ``requests`` requests."""
        return self.counted(lambda: send(self.port, body, headers, requests, connections))

    def counted(self, action: Callable[[], object]) -> int:
        """Instructions the worker executed while ``action()`` ran."""
        self._control("-z")
        self.zeroed_at = time.monotonic()
        action()
        self._control("-d")
        self._dumps += 1
        dump = Path(f"{self._out}.{self._dumps}")
        deadline = time.monotonic() + 60
        while not (dump.exists() and _TOTALS.search(dump.read_text())):
            if time.monotonic() > deadline:
                raise RuntimeError(f"callgrind wrote no dump at {dump}")
            time.sleep(0.1)
        match = _TOTALS.search(dump.read_text())
        assert match is not None
        return int(match.group(1))

    def __enter__(self) -> CallgrindWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self._dir.cleanup()


def send(port: int, body: str, headers: Mapping[str, str], requests: int, connections: int) -> None:
    """``requests`` POSTs of ``body`` to the chat route over ``connections`` kept-alive
    connections; every answer must be a 200."""
    payload = body.encode()
    all_headers = {"Content-Type": "application/json", **headers}
    failures: list[str] = []

    def client(count: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            for _ in range(count):
                connection.request("POST", CHAT, payload, all_headers)
                answer = connection.getresponse()
                answer.read()
                if answer.status != 200:
                    failures.append(f"HTTP {answer.status}")
        finally:
            connection.close()

    share, extra = divmod(requests, connections)
    threads = [
        threading.Thread(target=client, args=(share + (i < extra),)) for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, first: {failures[0]}")


def worker_instructions(
    config: str,
    body: str,
    headers: Mapping[str, str] | None = None,
    requests: int = 300,
    reps: int = 3,
    connections: int = 4,
    warmup: int = 100,
    program: list[str] | None = None,
) -> float:
    """Median instructions per request of one worker serving ``config`` (see the module),
    or of ``program`` (see ``CallgrindWorker``)."""
    with CallgrindWorker(config, program=program) as worker:
        send(worker.port, body, headers or {}, warmup, connections)
        counts = [worker.instructions(body, headers or {}, requests, connections)
                  for _ in range(reps)]  # fmt: skip
    return statistics.median(counts) / requests


def serve(config_path: str, port_file: str, variants: Sequence[str] = ()) -> int:
    """The process valgrind runs: bind, create the segment, run one worker in place.

    ``variants``: configs whose ``[observability]`` the worker can switch to
    (``CallgrindWorker.use``), so that configurations are compared in one process:
    counts of the same code move by ~1K instructions per request between processes
    (CPython's method cache collides by memory address, which differs with what each
    process allocated), more than some differences being measured."""
    from llmkit.config import load_config, shm_name_for
    from llmkit.gateway import check_secrets
    from llmkit.state import SharedState
    from workers import supervisor, worker

    config = load_config(config_path)
    if variants:
        _switchable(variants, Path(port_file).with_name("variant"))
    check_secrets(config)
    tcp = supervisor._bind_tcp(config.server.host, 0, config.server.reuse_port)
    config = supervisor._with_port(config, tcp.getsockname()[1])
    name = shm_name_for(config, config_path)
    state = SharedState.create(name, config)
    try:
        state.metrics.workers[0].reserve(time.monotonic_ns())
        state.metrics.workers[0].set_pid(os.getpid())
        Path(port_file).write_text(str(config.server.port))
        return worker.run(worker.WorkerSpec(config, 0, name, tcp, None))
    finally:
        tcp.close()
        state.segment.unlink()
        state.close()


def _switchable(variants: Sequence[str], switch_file: Path) -> None:
    """Let SIGUSR1 swap the worker's ``Observability`` for the one built from the variant
    whose index ``switch_file`` holds (then written to ``<switch_file>.ack``). Every
    variant's is built once the HTTP surface exists, before any request, so all windows
    run in one layout. Bench code only: the worker's own code does not know of it."""
    from llmkit.config import load_config
    from llmkit.observability import Observability
    from workers.http import HttpSurface

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the variants are built
    boot = HttpSurface.__init__

    def init(surface: HttpSurface, *args: Any, **kwargs: Any) -> None:
        boot(surface, *args, **kwargs)
        built = []
        for path in variants:
            observability = Observability.build(load_config(path), surface._metrics)
            observability.count_served(surface._slot)
            built.append(observability)

        def switch() -> None:
            index = int(switch_file.read_text())
            surface._observe = built[index]
            Path(f"{switch_file}.ack").write_text(str(index))

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, switch)

    HttpSurface.__init__ = init  # type: ignore[method-assign]


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        config_path, *variant_args, port_file = sys.argv[2:]
        sys.exit(serve(config_path, port_file, variant_args[1::2]))  # "--variant PATH" pairs
    config = Path(sys.argv[1]).read_text()
    requests = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    per_request = worker_instructions(config, sys.argv[2], requests=requests)
    print(f"{per_request:,.0f} instructions per request")


if __name__ == "__main__":
    main()

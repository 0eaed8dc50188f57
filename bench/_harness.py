"""Shared pieces of the end-to-end benchmarks: start servers, drive wrk, summarise.

Nothing here talks to anything but 127.0.0.1 and local Unix sockets.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

READY = re.compile(r"llmkit: serving http://[\d.]+:(\d+) with")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


class LLMKitServer:
    """``llmkit-serve`` on a free port, stopped with SIGTERM on exit."""

    def __init__(self, workers: int, config: str = "") -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="llmkit-bench-")
        path = Path(self._dir.name)
        (path / "llmkit.toml").write_text(config)
        self._log = (path / "server.log").open("w+")
        command = shutil.which("llmkit-serve") or "llmkit-serve"
        args = [command, "-c", str(path / "llmkit.toml"), "--port", "0", "--workers", str(workers),
                "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self._wait_port()}"

    def _wait_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._log.seek(0)
            match = READY.search(self._log.read())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self._log.seek(0)
        raise RuntimeError(f"llmkit-serve did not start:\n{self._log.read()}")

    def __enter__(self) -> LLMKitServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self._log.close()
        self._dir.cleanup()


def stop_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group led by ``proc``; SIGKILL it after ``grace_s``."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wrk(
    url: str,
    body: str,
    seconds: float,
    connections: int,
    threads: int = 1,
    headers: dict[str, str] | None = None,
) -> WrkResult:
    """Run wrk with a POST of ``body``; requests/s and latency percentiles."""
    wrk_bin = shutil.which("wrk")
    if wrk_bin is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    escaped = body.replace("\\", "\\\\").replace("'", "\\'")
    script = (
        "wrk.method = 'POST'\n"
        f"wrk.body = '{escaped}'\n"
        "wrk.headers['Content-Type'] = 'application/json'\n"
    )
    for name, value in (headers or {}).items():
        script += f"wrk.headers['{name}'] = '{value}'\n"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    try:
        out = subprocess.run(
            [wrk_bin, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
             "--latency", "-s", lua.name, url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(lua.name)
    return _parse_wrk(out)


def _parse_wrk(out: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _latency(re.search(r"50%\s+([\d.]+)(\w+)", out))
    p99 = _latency(re.search(r"99%\s+([\d.]+)(\w+)", out))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(rps, p50, p99, errors + (int(non2xx.group(1)) if non2xx else 0))


def _latency(match: re.Match[str] | None) -> float:
    if match is None:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def median_and_range(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the machine, for the report."""
    cpu = cpu_name()
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"

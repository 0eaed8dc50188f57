"""The supervisor: binds once, owns the segment, keeps N workers alive. Plain Python.

Signal handlers only enqueue (``handle_signal``); the main loop wakes on a self-pipe
(``signal.set_wakeup_fd``) or every 250 ms, and then reaps, checks heartbeats and
manages workers. Exit codes: 0 after a clean stop, 2 for a configuration error, 3 when
a worker could not boot (the supervisor stops instead of crash-looping).

With ``[cluster]``, one more child runs ``llmkit.cluster_sync`` (the host's Redis sync
task, named ``llmkit-sync`` in ``ps``). It is forked like a worker, respawned after
``SYNC_RESPAWN_S`` if it dies, restarted on reload, and stopped last, after the
workers, so it can give back what they left unspent.
The supervisor itself never imports a Redis client.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field

import msgspec

from llmkit.cluster import SYNC_PROCESS_NAME, name_process
from llmkit.config import Config, ConfigError, load_config, resolve_workers, shm_name_for
from llmkit.gateway import check_secrets
from llmkit.mux_link import link_path
from llmkit.state import SharedState, build_layout
from shm import SegmentError, WorkerSlot
from workers import worker

log = logging.getLogger("llmkit.supervisor")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_BOOT = 3
TICK_S = 0.25
FAST_DEATH_S = 1.0
MAX_BACKOFF_S = 5.0
SYNC_RESPAWN_S = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class WorkerRecord:
    pid: int
    slot: int
    generation: int
    started: float
    retiring: bool = False


@dataclass
class Supervisor:
    """Spawns, heartbeats, respawns, reloads and drains the workers of one server."""

    config: Config
    config_path: str | None = None
    overrides: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._signals: list[int] = []
        self._workers: dict[int, WorkerRecord] = {}
        self._generation = 0
        self._stopping = False
        self._stop_deadline = 0.0
        self._boot_failed = False
        self._fast_deaths = 0
        self._next_spawn = 0.0
        self._announced = False
        self._sync_pid = 0
        self._next_sync_spawn = 0.0

    # -- lifecycle --------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        try:
            check_secrets(self.config)
            self._bind()
            self._state = SharedState.create(self._shm_name, self.config)
        except (ConfigError, SegmentError, OSError) as exc:
            print(f"llmkit: {exc}", file=sys.stderr, flush=True)
            self._close_sockets()
            return EXIT_CONFIG
        self._slots = self._state.metrics.workers
        self._control = self._state.control(self.config, 0)
        wake = self._install_signals()
        try:
            self._loop(wake)
        finally:
            self._cleanup()
        return EXIT_BOOT if self._boot_failed else EXIT_OK

    def _loop(self, wake: int) -> None:
        while True:
            self._wait(wake)
            self._dispatch_signals()
            self.reap_workers()
            if self._stopping:
                if not self._workers and not self._sync_pid:
                    return
                if time.monotonic() > self._stop_deadline:
                    self.kill_workers(signal.SIGKILL)
                    self._signal_sync(signal.SIGKILL)
                elif not self._workers:
                    self._signal_sync(signal.SIGTERM)
                continue
            self.check_heartbeats()
            self.manage_workers()
            self.manage_sync()
            self._announce_when_ready()

    def _wait(self, wake: int) -> None:
        try:
            ready, _, _ = select.select([wake], [], [], TICK_S)
        except InterruptedError:
            return
        if ready:
            try:
                os.read(wake, 4096)
            except BlockingIOError:
                pass

    # -- signals ----------------------------------------------------------------

    def _install_signals(self) -> int:
        rfd, wfd = os.pipe()
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wfd)
        for sig in (*STOP_SIGNALS, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self.handle_signal)
        self._pipe = (rfd, wfd)
        return rfd

    def handle_signal(self, sig: int, _frame: object) -> None:
        """Only enqueue: logging or forking inside a handler can deadlock."""
        self._signals.append(sig)

    def _dispatch_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig in STOP_SIGNALS:
                self.handle_stop(sig)
            elif sig == signal.SIGHUP:
                self.handle_reload()

    def handle_stop(self, sig: int) -> None:
        if self._stopping:
            log.warning("second stop signal: killing workers now")
            self.kill_workers(signal.SIGKILL)
            return
        log.info("stopping: draining in-flight requests (%s)", signal.Signals(sig).name)
        self._stopping = True
        self._stop_deadline = time.monotonic() + self.config.server.drain_timeout_s + 5
        self._close_sockets()
        self.kill_workers(signal.SIGTERM)

    def handle_reload(self) -> None:
        try:
            config = load_config(self.config_path, self.overrides)
            config = _with_port(config, self.config.server.port)
            check_secrets(config)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        if build_layout(config).digest != self._state.layout.digest:
            log.error("reload refused: the new config changes the shared-memory layout; restart")
            return
        log.info("reloading: rolling %d workers onto the new config", resolve_workers(config))
        self.config = config
        self._control = self._state.control(config, 0)
        self._generation += 1
        self._signal_sync(signal.SIGTERM)  # manage_sync starts it again on the new config

    # -- workers ----------------------------------------------------------------

    def spawn_worker(self) -> None:
        slot = self._free_slot()
        spec = worker.WorkerSpec(self.config, slot, self._shm_name, self._tcp, self._uds)
        self._slots[slot].reserve(time.monotonic_ns())
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            worker.main(spec)
        self._slots[slot].set_pid(pid)
        self._workers[pid] = WorkerRecord(pid, slot, self._generation, time.monotonic())
        log.debug("spawned worker pid %d in slot %d", pid, slot)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self._sync_pid:
                self._sync_exited(status)
                continue
            record = self._workers.pop(pid, None)
            if record is not None:
                self._worker_exited(record, status)

    def _worker_exited(self, record: WorkerRecord, status: int) -> None:
        lost = self._slots[record.slot].clear()
        # Whatever way it ended, its concurrency slots must not stay taken.
        reclaimed = self._control.limiter.reclaim(record.slot)
        if reclaimed:
            log.info("reclaimed %d concurrency slots of worker pid %d", reclaimed, record.pid)
        # And the attempts it had in flight, which the router weighs deployments by.
        self._control.breakers.reclaim(record.slot)
        # Its shared calls ended with it: identical requests must lead afresh.
        self._state.mux_table().reclaim(record.pid)
        _unlink_quietly(link_path(self._shm_name, record.slot))
        code = os.waitstatus_to_exitcode(status)
        if record.retiring or self._stopping:
            return
        if code == worker.WORKER_BOOT_ERROR:
            log.error("worker in slot %d could not boot; stopping, not respawning", record.slot)
            self._boot_failed = True
            self.handle_stop(signal.SIGTERM)
            return
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        log.warning("worker pid %d died (%s, %d requests lost); replacing", record.pid, how, lost)
        self._state.metrics.worker_restarts.inc()
        self._note_death(time.monotonic() - record.started)

    def _note_death(self, lived: float) -> None:
        if lived >= FAST_DEATH_S:
            self._fast_deaths = 0
            return
        self._fast_deaths += 1
        delay = min(0.1 * 2 ** (self._fast_deaths - 1), MAX_BACKOFF_S)
        self._next_spawn = time.monotonic() + delay

    # -- the cluster sync task ----------------------------------------------------

    def manage_sync(self) -> None:
        """Keep one sync task running while ``[cluster]`` is on."""
        if self._sync_pid or not self.config.cluster.enabled:
            return
        if time.monotonic() >= self._next_sync_spawn:
            self.spawn_sync()

    def spawn_sync(self) -> None:
        pid = os.fork()
        if pid == 0:
            name_process(SYNC_PROCESS_NAME)  # not a worker, to ps and to the tests
            signal.set_wakeup_fd(-1)
            from llmkit import cluster_sync  # only this child ever loads redis

            cluster_sync.main(self.config, self._shm_name)
        self._sync_pid = pid
        log.debug("spawned the cluster sync task, pid %d", pid)

    def _signal_sync(self, sig: int) -> None:
        if self._sync_pid:  # never 0: os.kill(0, ...) would signal the whole group
            _kill(self._sync_pid, sig)

    def _sync_exited(self, status: int) -> None:
        pid, self._sync_pid = self._sync_pid, 0
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not self._stopping:
            log.warning("cluster sync task pid %d died (code %d); restarting it", pid, code)
            self._next_sync_spawn = time.monotonic() + SYNC_RESPAWN_S

    def check_heartbeats(self) -> None:
        limit_ns = int(self.config.server.heartbeat_timeout_s * 1e9)
        now = time.monotonic_ns()
        for record in list(self._workers.values()):
            if now - self._slots[record.slot].heartbeat_ns > limit_ns:
                log.warning("worker pid %d missed its heartbeat; killing it", record.pid)
                _kill(record.pid, signal.SIGKILL)

    def manage_workers(self) -> None:
        """Converge on N serving workers of the current config generation."""
        desired = resolve_workers(self.config)
        live = [w for w in self._workers.values() if not w.retiring]
        old = [w for w in live if w.generation != self._generation]
        if old:
            self._roll_step(desired, old, [w for w in live if w not in old])
            return
        for extra in live[desired:]:
            self.retire_worker(extra)
        for _ in range(desired - len(live)):
            if time.monotonic() < self._next_spawn:
                return
            self.spawn_worker()

    def _roll_step(self, desired: int, old: list[WorkerRecord], fresh: list[WorkerRecord]) -> None:
        """One step of a rolling reload: an old worker goes only after a new one serves."""
        if any(not self._serving(w) for w in fresh):
            return
        if len(old) + len(fresh) > desired:
            self.retire_worker(old[0])
        elif time.monotonic() >= self._next_spawn:
            self.spawn_worker()

    def _serving(self, record: WorkerRecord) -> bool:
        return self._slots[record.slot].state == WorkerSlot.SERVING

    def retire_worker(self, record: WorkerRecord) -> None:
        record.retiring = True
        _kill(record.pid, signal.SIGTERM)

    def kill_workers(self, sig: int) -> None:
        for pid in list(self._workers):
            _kill(pid, sig)

    def _free_slot(self) -> int:
        taken = {w.slot for w in self._workers.values()}
        return next(i for i in range(len(self._slots)) if i not in taken)

    def _announce_when_ready(self) -> None:
        if self._announced:
            return
        serving = [w for w in self._workers.values() if self._serving(w)]
        if len(serving) < resolve_workers(self.config):
            return
        self._announced = True
        server = self.config.server
        uds = f", uds {server.uds}" if server.uds else ""
        print(
            f"llmkit: serving http://{server.host}:{server.port} with {len(serving)} workers"
            f" (pid {os.getpid()}, shm {self._shm_name}{uds})",
            file=sys.stderr,
            flush=True,
        )

    # -- sockets and cleanup ----------------------------------------------------

    def _bind(self) -> None:
        server = self.config.server
        self._tcp: socket.socket = _bind_tcp(server.host, server.port, server.reuse_port)
        self.config = _with_port(self.config, self._tcp.getsockname()[1])
        self._uds: socket.socket | None = _bind_uds(server.uds) if server.uds else None
        self._shm_name = shm_name_for(self.config, self.config_path)

    def _close_sockets(self) -> None:
        for sock in (getattr(self, "_tcp", None), getattr(self, "_uds", None)):
            if sock is not None:
                sock.close()

    def _cleanup(self) -> None:
        self._close_sockets()
        if self.config.server.uds:
            _unlink_quietly(self.config.server.uds)
        self._state.segment.unlink()
        self._state.close()
        signal.set_wakeup_fd(-1)
        for fd in self._pipe:
            os.close(fd)
        log.info("stopped")


def _with_port(config: Config, port: int) -> Config:
    return msgspec.structs.replace(config, server=msgspec.structs.replace(config.server, port=port))


def _bind_tcp(host: str, port: int, reuse_port: bool) -> socket.socket:
    """The TCP listener the workers inherit; with ``reuse_port``, a socket that only holds
    the address (bound, never listening: no connection waits in it), which each worker
    binds again with SO_REUSEPORT for a listener of its own (``workers.worker``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    if not reuse_port:
        sock.listen(2048)
    sock.setblocking(False)
    return sock


def _bind_uds(path: str) -> socket.socket:
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the file is born 0600: no window where others can connect
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: left behind by a crashed server
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

"""Supervisor decisions that need a real fork but an injected worker."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from pathlib import Path

import msgspec
import pytest

from llmkit.config import Config
from workers import supervisor, worker

pytestmark = pytest.mark.multiprocess


def run_supervisor(config: Config, fake_worker_exit: int, spawned: Path) -> None:
    """In a forked child: the supervisor, with workers that exit at once."""

    def fake_run(spec: worker.WorkerSpec) -> int:
        with spawned.open("a") as log:
            log.write(f"{os.getpid()}\n")
        return fake_worker_exit

    worker.run = fake_run  # inherited by the workers this supervisor forks
    os._exit(supervisor.Supervisor(config).run())


def config_for(tmp_path: Path) -> Config:
    return msgspec.convert(
        {"server": {"port": 0, "workers": 2, "shm_name": f"/llmkit-sv-{uuid.uuid4().hex[:10]}",
                    "uds": str(tmp_path / "s.sock")}},
        Config,
    )  # fmt: skip


def test_boot_error_stops_instead_of_crash_looping(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    spawned = tmp_path / "spawned"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=run_supervisor, args=(config, worker.WORKER_BOOT_ERROR, spawned))
    child.start()
    child.join(15)
    assert child.exitcode == supervisor.EXIT_BOOT
    assert len(spawned.read_text().split()) == 2  # the first two, and no respawn
    assert not Path(f"/dev/shm{config.server.shm_name}").exists()
    assert not (tmp_path / "s.sock").exists()


def test_crashing_workers_are_respawned_with_backoff(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    spawned = tmp_path / "spawned"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=run_supervisor, args=(config, 1, spawned))
    child.start()
    time.sleep(2.0)
    assert child.pid is not None
    os.kill(child.pid, 15)
    child.join(15)
    assert child.exitcode == supervisor.EXIT_OK
    spawns = len(spawned.read_text().split())
    # Without backoff a tight loop forks hundreds in 2 s; with it: 0.1+0.2+0.4+0.8 s.
    assert 3 <= spawns <= 12, spawns
    assert not Path(f"/dev/shm{config.server.shm_name}").exists()

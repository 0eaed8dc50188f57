"""``workers.accept``: when a worker steps back from the shared listening socket."""

from __future__ import annotations

from shm import Atomics, WorkerSlot
from workers.accept import SLACK, STALE_NS, over_share

NOW = 10 * STALE_NS


def peer(atomics: Atomics, index: int, connections: int, state: int = WorkerSlot.SERVING,
         beat_ns: int = NOW) -> WorkerSlot:  # fmt: skip
    slot = WorkerSlot(atomics, index * WorkerSlot.SIZE)
    slot.reserve(beat_ns)
    slot.set_pid(1000 + index)
    slot.set_state(state)
    slot.set_connections(connections)
    return slot


def test_a_worker_steps_back_only_above_the_fewest_plus_slack(shared: Atomics) -> None:
    peers = [peer(shared, 1, 3), peer(shared, 2, 9)]
    assert not over_share(3 + SLACK, peers, NOW)
    assert over_share(3 + SLACK + 1, peers, NOW)


def test_alone_a_worker_never_steps_back(shared: Atomics) -> None:
    assert not over_share(10_000, [], NOW)


def test_stalled_booting_and_draining_peers_are_not_waited_for(shared: Atomics) -> None:
    """A peer that cannot accept must not make this one hold back: its connections
    would wait for nobody (a stalled peer's heartbeat is older than STALE_NS)."""
    stalled = peer(shared, 1, 0, beat_ns=NOW - STALE_NS)
    booting = peer(shared, 2, 0, state=WorkerSlot.BOOTING)
    draining = peer(shared, 3, 0, state=WorkerSlot.DRAINING)
    assert not over_share(50, [stalled, booting, draining], NOW)
    live = peer(shared, 4, 0, beat_ns=NOW - STALE_NS + 1)
    assert over_share(50, [stalled, booting, draining, live], NOW)

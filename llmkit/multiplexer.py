"""The streaming multiplexer: one upstream call for identical in-flight requests.

Where it sits (DESIGN.md §3): after decode and authentication, before the router and
the adapter. An eligible request computes its key; if an identical call is in flight
(in this worker, or in another one) it joins as a *follower*, else it *leads*: it is
admitted and routed as usual and its upstream call runs in a task of its own, feeding
an ``Entry`` that every subscriber (the leader's own caller included) reads.

Key. The canonical request, as bytes: the request as JSON with its ``model`` replaced
by the resolved deployments' ``provider/model`` labels (``key_model``: so an alias and
the same model asked for directly share), ``stream``,
``stream_options`` and ``user`` cleared (``user`` is an abuse-monitoring tag that does
not change the output), then the extra top-level fields passed through to providers,
as JSON. msgspec's deterministic order sorts dict keys, so
JSON key order in the body does not matter. Everything else (messages and all their
parts, tools, tool_choice, response_format, temperature, top_p, stop, max tokens, seed,
n) is in the key: two requests differing in any of them never share. The key is
compared whole, never by a hash alone: it keys this worker's table, and the attach
handshake sends it to the owning worker (the shm table holds a 64-bit hash of it, to
find that owner).

Eligibility. ``x-llmkit-dedup: off`` opts out, ``on`` opts in; otherwise a request is
eligible when its output is deterministic by intent (``temperature`` 0 or a ``seed``),
or always with ``[multiplexer] eligible = "all"``. ``n > 1`` shares only with the same
``n`` (it is in the key), so the upstream call is the same.

Shape. The shared upstream call is made the way its leader asked (streamed or not):
the leader's request reaches the provider exactly as without the multiplexer, which
keeps the overhead on unshared requests to one key encoding, one dict insert, one C
call to find-or-claim in the shm table (it hashes the key itself and counts the
leader) and one to release; the leader's caller reads its own upstream stream inline
until someone joins (its entry, a ``Lead``, *is* its stream: a ``TrackedStream``
subclass that ``Gateway.open_stream`` builds), keeping each read with a list append
(``bench/streaming_multiplexer_bench.py --instructions`` counts what is left). A
non-streaming follower of a stream gets the completion assembled from its frames; a
streaming follower of a whole completion gets it as chunks (both computed once per
entry). A streamed shared call always asks the provider for the usage chunk; each
subscriber passes it on only if its own request asked for it.

Lifetime. The upstream call runs while at least one subscriber (local, or a follower
worker's link) remains; when the last leaves, its task is cancelled, which closes the
upstream connection. Entries leave the table as soon as their call ends: this is not
a cache.

Accounting. Every subscriber is a request: the HTTP surface counts it, and a follower
is admitted at the global and key levels for requests/min and concurrency, with no
tokens, since it causes no upstream tokens. The leader is admitted as usual and its
tokens are reconciled with the upstream's usage once. Responses carry
``x-llmkit-dedup: leader|follower``. Counters in shm: leaders, followers and upstream
calls avoided (``llmkit_multiplexer_*_total``).

Across workers. ``llmkit.mux_table`` documents the shm table (key hash -> owning
worker, claimed by CAS) and ``llmkit.mux_link`` the attach protocol over each worker's
private Unix socket. A follower worker mirrors the owner's entry into its own table,
so its further identical requests join locally over the one link. Owner death: the
link drops, the mirror fails with a 503 error event to its callers (or, before any
output, they start over); the follower evicts the dead owner's slot when its socket
refuses, and the supervisor clears every slot of a reaped worker, so a new identical
request leads afresh.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from multidict import istr
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from llmkit.attempts import Run, TrackedStream
from llmkit.collector import MetricSource
from llmkit.config import Config, MultiplexerConfig
from llmkit.control import ControlPlane
from llmkit.errors import InternalError, LLMKitError
from llmkit.limiter import Admission
from llmkit.mux_entry import Entry, Lead, Retry, Subscription, pull_into
from llmkit.mux_link import LinkServer, Opened, OwnerGone, connect, mirror_remote
from llmkit.mux_table import FULL, TAKEN, MuxTable, Owner, owner_of, pack_owner
from llmkit.providers.base import Call, Target
from llmkit.types import ChatCompletion, StreamOptions
from shm import Atomics, Counter, Layout, LayoutBuilder, Segment

log = logging.getLogger("llmkit.multiplexer")

HEADER = "x-llmkit-dedup"
# The response header's name as aiohttp's own header names are (``aiohttp.hdrs``): an
# ``istr``, whose case-folded form is computed once here instead of per response.
ROLE_HEADER = istr(HEADER)
COUNTERS = "mux_counters"
LEADERS, FOLLOWERS, AVOIDED = range(3)
JOIN_TRIES = 3
LABELS_KEPT = 4096  # model names whose key labels are remembered
_key_encoder = msgspec.json.Encoder(order="deterministic")
WITH_USAGE = StreamOptions(include_usage=True)


class Leading(Protocol):
    """What the multiplexer needs from the gateway to lead a call."""

    control: ControlPlane | None

    def resolve(self, model: str) -> list[Target]: ...

    def start_run(self, call: Call, stream: bool) -> Run: ...

    async def open_stream(
        self, call: Call, run: Run, strip_usage: bool
    ) -> tuple[Target, TrackedStream]: ...

    async def complete(self, call: Call, run: Run) -> tuple[Target, ChatCompletion]: ...

    def limit_headers(self, call: Call, target: Target) -> None: ...


def dedup_key(call: Call, targets: list[Target]) -> bytes:
    """Everything in ``call`` that can change the output, as canonical bytes."""
    return _canonical(key_model(targets), call)


def key_model(targets: list[Target]) -> str:
    """What of the resolved deployments goes into the key, in the request's ``model``:
    their ``provider/model`` label, or the JSON text of their sorted labels when they
    are several (never mistaken for one: a label starts with a provider name)."""
    if len(targets) == 1:
        return targets[0].label
    labels = sorted({t.label for t in targets})
    return labels[0] if len(labels) == 1 else _key_encoder.encode(labels).decode()


def _canonical(model: str, call: Call) -> bytes:
    """The request with ``model`` (``key_model``'s), then any extras, each one JSON
    value (self-delimiting, so the bytes compare as the parts would); the extras only
    when there are some, which is most of the time not."""
    request = msgspec.structs.replace(
        call.request, model=model, stream=False, stream_options=None, user=None
    )
    key = _key_encoder.encode(request)
    return key + _key_encoder.encode(call.extras) if call.extras else key


def eligible(call: Call, config: MultiplexerConfig) -> bool:
    """Whether ``call`` may share an upstream call (see the module docstring)."""
    asked = call.headers.get(HEADER, "").lower()
    if asked == "off" or not config.enabled:
        return False
    if asked == "on" or config.eligible == "all":
        return True
    request = call.request
    return request.temperature == 0 or request.seed is not None


# -- shared memory: counters and the peers of this worker -------------------------------


def declare(builder: LayoutBuilder, config: MultiplexerConfig) -> None:
    """Add the multiplexer's counters and in-flight table to a layout being built."""
    from llmkit import mux_table

    builder.add(COUNTERS, Counter.KIND, 3, Counter.SIZE)
    mux_table.declare(builder, config.table_slots)


class Counters:
    """Leaders, followers and upstream calls avoided: in shm when given, always local."""

    def __init__(self, segment: Segment | None = None, layout: Layout | None = None) -> None:
        self.local = [0, 0, 0]
        self._cells: list[Counter] = []
        self.offsets: list[int] = []  # of the cells in shm, when there are some
        if segment is not None and layout is not None:
            region = layout[COUNTERS]
            self._cells = [Counter(segment.atomics, region.offset_of(i)) for i in range(3)]
            self._add = segment.atomics.add_i64
            self.offsets = [cell.offset for cell in self._cells]

    def inc(self, which: int, delta: int = 1) -> None:
        """``delta`` more of ``which``: in shm when there is one (``value`` reads it
        there), else in ``local``."""
        if self._cells:
            self._add(self.offsets[which], delta)
        else:
            self.local[which] += delta

    def value(self, which: int) -> int:
        return self._cells[which].value() if self._cells else self.local[which]


@dataclass
class Peers:
    """This worker's place among the others: the shm table and the attach sockets."""

    table: MuxTable
    worker_slot: int
    incarnation: int
    path_of: Callable[[int], str]
    pid: int = 0

    def __post_init__(self) -> None:
        self.pid = self.pid or os.getpid()
        self.owner = pack_owner(self.worker_slot, self.incarnation)
        # The table's C calls, bound: find-or-claim, and release (by slot offset, or
        # ``unlead``: by index); each takes a request key's bytes for its tag and
        # hashes them in C.
        self.claim = self.table.claim
        self.release = self.table.atomics.mux_release
        self.offsets = [self.table.offset_of(i) for i in range(self.table.geometry[2])]
        atomics, words = self.table.atomics, self.table.leader_words(self.owner, self.pid)
        self.unlead = functools.partial(atomics.mux_unlead, words)

    def leading(self, counters: Counters) -> Callable[[bytes], int | tuple[int, int, int]]:
        """Find-or-claim for a leader, ``claim(key)``: one C call, which also counts the
        leader when it claims (in shm; with local counters, here)."""
        table = self.table
        if counters.offsets:
            words = table.leader_words(self.owner, self.pid, counters.offsets[LEADERS])
            return functools.partial(table.atomics.mux_lead, words)

        def claim(key: bytes) -> int | tuple[int, int, int]:
            found = self.claim(key, self.owner, self.pid)
            if isinstance(found, int) and found >= 0:
                counters.inc(LEADERS)
            return found

        return claim


def collect_metrics(atomics: Atomics, layout: Layout, config: Config) -> Iterator[Metric]:
    """The multiplexer's counters and shared calls in flight, read from shm."""
    region = layout[COUNTERS]
    names = (
        ("leaders", "Requests that made the upstream call others shared."),
        ("followers", "Requests that joined an identical call already in flight."),
        ("upstream_calls_avoided", "Upstream calls saved by joining one in flight."),
    )
    for which, (name, text) in enumerate(names):
        family = CounterMetricFamily(f"llmkit_multiplexer_{name}", text)
        family.add_metric((), atomics.load_i64(region.offset_of(which)))
        yield family
    yield GaugeMetricFamily(
        "llmkit_multiplexer_shared_calls",
        "Upstream calls in flight that other workers can join.",
        value=MuxTable(atomics, layout).in_use(),
    )


METRICS = MetricSource(
    "multiplexer", lambda builder, config: declare(builder, config.multiplexer), collect_metrics
)


# -- the multiplexer --------------------------------------------------------------------


class Multiplexer:
    """The in-flight table of one worker, and the join-or-lead decision."""

    def __init__(
        self,
        config: MultiplexerConfig,
        counters: Counters | None = None,
        peers: Peers | None = None,
    ) -> None:
        self.config = config
        self.counters = counters or Counters()
        self._peers = peers if config.cross_worker else None
        self._entries: dict[bytes, Entry] = {}
        self._tasks: dict[Entry, asyncio.Task[None]] = {}
        self._live: set[Entry] = set()  # entries whose task has started
        self._link = LinkServer(self._entries.get)
        self._labels: dict[str, str] = {}  # model name -> its ``key_model``
        self._enabled = config.enabled
        self._all = config.enabled and config.eligible == "all"
        self._claim_lead = self._peers.leading(self.counters) if self._peers else None
        self._unlead = self._peers.unlead if self._peers else None

    def in_flight(self) -> int:
        return len(self._entries)

    def eligible(self, call: Call) -> bool:
        """Whether ``call`` may share an upstream call, under this configuration."""
        if HEADER in call.headers or not self._enabled:
            return eligible(call, self.config)
        # ``seed`` first: ``None == 0`` (the seed's usual temperature) is a slow compare.
        request = call.request
        return self._all or request.seed is not None or request.temperature == 0.0

    async def start(self) -> None:
        """Listen for followers on other workers (when there are peers)."""
        if self._peers is not None:
            await self._link.start(self._peers.path_of(self._peers.worker_slot))

    def close(self) -> None:
        self._link.close()

    # -- the two operations -------------------------------------------------------

    def lead_stream(self, call: Call, gateway: Leading) -> Lead | None:
        """Lead a streamed call, the common case: an eligible stream nobody is making,
        claimed, admitted and in the table; the caller opens it (``Gateway.stream``:
        ``open_stream`` with ``Lead.start`` as its stream) and reads it as its stream.
        None when an identical call may be in flight: ``join_stream`` then joins it, or
        leads after all."""
        key = self._key(call, gateway)
        claim_lead = self._claim_lead
        if claim_lead is not None:
            # One C call, hashing the key and counting a claim as a leader: this
            # worker's own calls in flight are there too (found as ours), so a free
            # slot means nobody makes this call.
            found = claim_lead(key)
            if not isinstance(found, int) or found == TAKEN:
                return None
            if found >= 0:
                return self._lead(key, found, call, gateway, True)  # counted
        entry = self._entries.get(key)  # not in shm (no peers, or no room): only we know
        if entry is not None and not entry.done:
            return None
        return self._lead(key, FULL, call, gateway)

    async def join_stream(
        self, call: Call, gateway: Leading
    ) -> Lead | tuple[Target, AsyncIterator[bytes]]:
        """A streamed call when an identical one may be in flight (``lead_stream`` said
        None): join it, or lead after all (a ``Lead`` to open, as ``lead_stream``'s)."""
        wants_usage = call.request.wants_usage_chunk()
        key = self._key(call, gateway)
        joined = await self._join(key, call, gateway, streamed=True)
        if isinstance(joined, int):
            return self._lead(key, joined, call, gateway)
        entry, target, on_leave = joined
        return target, Subscription(entry, wants_usage, on_leave)

    def _lead(
        self, key: bytes, claim: int, call: Call, gateway: Leading, counted: bool = False
    ) -> Lead:
        """Admit a streaming leader (404/429 reach this caller only) and put its entry
        in the table, holding ``claim``, so identical requests from now on join it. The
        shared call always asks for the usage chunk; each subscriber shows it or not.
        ``counted``: the claim counted it as a leader already."""
        wants_usage = call.request.wants_usage_chunk()
        if not wants_usage:
            call.request = msgspec.structs.replace(call.request, stream_options=WITH_USAGE)
        try:
            run = gateway.start_run(call, True)
        except BaseException:
            if claim >= 0 and (peers := self._peers) is not None:
                peers.unlead(claim, key)
            if counted:  # it did not lead after all
                self.counters.inc(LEADERS, -1)
            raise
        lead = self._entries[key] = Lead(key, claim, self, wants_usage, run)
        if not counted:
            self.counters.inc(LEADERS)
        call.response_headers[ROLE_HEADER] = "leader"
        if call.obs is not None:
            call.obs.multiplexer_role("leader")
        return lead

    async def chat(self, call: Call, gateway: Leading) -> tuple[Target, ChatCompletion]:
        """Join or lead a whole completion."""
        key = self._key(call, gateway)
        joined = await self._join(key, call, gateway, streamed=False)
        if isinstance(joined, int):
            joined = await self._lead_whole(key, joined, call, gateway)
        entry, target, on_leave = joined
        try:
            return target, await entry.wait_whole()
        finally:
            entry.leave()
            if on_leave is not None:
                on_leave()

    # -- join or lead -------------------------------------------------------------

    def _key(self, call: Call, gateway: Leading) -> bytes:
        """``dedup_key``, with each model name's labels resolved once."""
        model = call.request.model
        labels = self._labels.get(model)
        if labels is None:
            if len(self._labels) >= LABELS_KEPT:
                self._labels.clear()
            labels = self._labels[model] = key_model(gateway.resolve(model))
        return _canonical(labels, call)

    async def _join(self, key: bytes, call: Call, gateway: Leading, streamed: bool) -> Joined | int:
        """Join an identical call in flight (in this worker or another); or, when there
        is none, this worker's claim on ``key`` for the caller to lead with.
        Followers read what the leader's call appends to the entry."""
        for _ in range(JOIN_TRIES):
            entry = self._entries.get(key)
            found: Owner | None = None
            if entry is None or entry.done:  # done a moment ago: not a cache
                claim = self._claim(key)
                if claim == TAKEN:
                    await asyncio.sleep(0.001)  # another worker is publishing its claim
                    continue
                if not isinstance(claim, Owner):
                    return claim
                found = claim
            admission = self._admit_follower(call, gateway)  # 429 before joining anything
            if found is not None:
                entry = self._mirror(key, found, call, gateway)
            assert entry is not None
            try:
                target = await self._subscribe(entry)
            except Retry:
                self._settle(gateway, admission, cancel=True)
                continue
            except BaseException:
                self._settle(gateway, admission)
                raise
            self.counters.inc(FOLLOWERS)
            _role(call, "follower")
            gateway.limit_headers(call, target)
            return entry, target, self._follower_done(gateway, admission)
        return await self._alone(call, gateway, streamed)

    async def _subscribe(self, entry: Entry) -> Target:
        entry.join()
        try:
            return await entry.wait_open()
        except BaseException:
            entry.leave()
            raise

    async def _alone(self, call: Call, gateway: Leading, streamed: bool) -> Joined:
        """Sharing kept failing (owners dying as we joined): an entry nobody else sees."""
        if streamed and not call.request.wants_usage_chunk():  # as ``_lead`` asks
            call.request = msgspec.structs.replace(call.request, stream_options=WITH_USAGE)
        entry = Entry(b"")
        run = gateway.start_run(call, streamed)
        self._start(entry, self._pump(entry, gateway, call, run, streamed))
        return entry, await self._subscribe(entry), None

    def _claim(self, key: bytes) -> int | Owner:
        """Another worker's published call for ``key``, else this worker's claim on
        it: a slot index, ``FULL`` (no room, or no peers: lead unpublished) or ``TAKEN``
        (another worker's claim is being published)."""
        peers = self._peers
        if peers is None:
            return FULL
        found = peers.claim(key, peers.owner, peers.pid)  # one C call
        if isinstance(found, int):
            return found
        owner = owner_of(found)
        if owner.pid == peers.pid:  # ours, yet not in flight here: stale
            peers.table.evict(owner, key)
            return peers.table.acquire(key, peers.owner, peers.pid)
        return owner

    async def _lead_whole(self, key: bytes, claim: int, call: Call, gateway: Leading) -> Joined:
        """Admit and make a whole (non-streamed) call in this caller's own task, holding
        ``claim``: an unshared call then costs no extra task and no wake-ups.

        Its errors reach the leader as raised and every follower as the same error; if
        the leader goes away first (cancelled), followers start over.
        """
        entry = Entry(key, 1)  # its leader subscribes
        entry.claim = claim
        entry.keeper = self
        run = self._enter(entry, call, gateway, streamed=False)
        try:
            target, completion = await gateway.complete(call, run)
            entry.open(target, streamed=False)
            entry.complete(completion)
        except BaseException as exc:
            entry.abort(exc)
            raise
        self.counters.inc(LEADERS)
        _role(call, "leader")
        return entry, target, None

    def _enter(self, entry: Entry, call: Call, gateway: Leading, streamed: bool) -> Run:
        """Admit a leader (404/429 reach this caller only) and put its entry in the
        table, holding its claim, so identical requests from now on join it."""
        try:
            run = gateway.start_run(call, streamed)
        except BaseException:
            self._release(entry)
            raise
        self._entries[entry.key] = entry
        return run

    def _release(self, entry: Entry) -> None:
        """Give back the entry's claim on its slot in the shm table (once)."""
        if entry.claim >= 0 and (peers := self._peers) is not None:
            claim, entry.claim = entry.claim, FULL
            peers.release(peers.offsets[claim], entry.key, peers.owner)

    def _mirror(self, key: bytes, found: Owner, call: Call, gateway: Leading) -> Entry:
        """A local entry filled from the owner's over its attach socket."""
        assert self._peers is not None
        peers, model = self._peers, call.request.model
        entry = Entry(key)
        self._entries[key] = entry

        async def mirror() -> None:
            self._live.add(entry)
            try:
                reader, writer = await connect(peers.path_of(found.worker_slot), key)
            except OwnerGone:
                peers.table.evict(found, key)
                entry.fail(Retry("the owner is gone"))
                return
            try:
                await mirror_remote(entry, reader, lambda o: _target_for(gateway, model, o))
            finally:
                writer.close()

        self._start(entry, mirror())
        return entry

    def _start(self, entry: Entry, source: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(source)
        self._tasks[entry] = task
        entry.keeper = self
        task.add_done_callback(lambda _: self.forget(entry))

    # -- the keeper of its entries (``mux_entry.Keeper``) ---------------------------

    def hand_off(self, entry: Entry, chunks: TrackedStream) -> None:
        """The leader's caller stops reading the upstream (it left, or others joined):
        a task of its own carries the call on for the subscribers that remain."""
        self._start(entry, self._pump_rest(entry, chunks))

    def abandon(self, entry: Entry) -> None:
        """The last subscriber left: stop the upstream call."""
        task = self._tasks.get(entry)
        started = entry in self._live
        entry.fail(Retry("every subscriber left"))  # a task not started yet sees this
        self.forget(entry)
        if task is not None and started:
            task.cancel()

    def ended(self, lead: Lead) -> None:
        """``forget`` for a ``Lead`` whose leader read it to the end alone (the path of
        every unshared stream): it is in the table, no task runs for it."""
        key, claim, unlead = lead.key, lead.claim, self._unlead
        self._entries.pop(key, None)
        if claim >= 0 and unlead is not None:  # its slot in the shm table
            unlead(claim, key)

    def forget(self, entry: Entry) -> None:
        """The entry's call ended: out of the table (this is not a cache)."""
        key, claim = entry.key, entry.claim
        held = self._entries.pop(key, None)
        if held is not entry and held is not None:  # a newer call for the same key
            self._entries[key] = held
        if self._tasks or self._live:  # none for a leader reading inline
            self._tasks.pop(entry, None)
            self._live.discard(entry)
        if claim >= 0 and (peers := self._peers) is not None:  # ``_release``, inline
            entry.claim = FULL
            unlead = peers.unlead  # an attribute, not a method: loaded, then called
            unlead(claim, key)

    async def _pump_rest(self, entry: Entry, chunks: TrackedStream) -> None:
        self._live.add(entry)
        if entry.done:  # abandoned before this task ever ran
            await TrackedStream.aclose(chunks)
            return
        await _feed(entry, _pump_frames(entry, chunks))

    async def _pump(
        self, entry: Entry, gateway: Leading, call: Call, run: Run, streamed: bool
    ) -> None:
        """The upstream call of a leader, feeding ``entry``."""
        self._live.add(entry)
        if entry.done:  # abandoned before this task ever ran
            run.close(None)
            return
        if streamed:
            await _feed(entry, _pump_stream(entry, gateway, call, run))
        else:
            await _feed(entry, _pump_whole(entry, gateway, call, run))

    # -- follower accounting ------------------------------------------------------

    def _admit_follower(self, call: Call, gateway: Leading) -> Admission | None:
        """A follower's request costs requests/min and a concurrency slot, no tokens."""
        control = gateway.control
        if control is None:
            return None
        return control.admit_request(call.key, 0, time.monotonic_ns())

    def _settle(self, gateway: Leading, admission: Admission | None, cancel: bool = False) -> None:
        control = gateway.control
        if control is None or admission is None:
            return
        if cancel:
            control.limiter.cancel(admission)
        else:
            control.limiter.release(admission)

    def _follower_done(self, gateway: Leading, admission: Admission | None) -> Callable[[], None]:
        def done() -> None:
            self.counters.inc(AVOIDED)
            self._settle(gateway, admission)

        return done


Joined = tuple[Entry, Target, Callable[[], None] | None]
"""What joining gave: the entry, its target and a follower's settle hook."""


async def _feed(entry: Entry, source: Coroutine[Any, Any, None]) -> None:
    """Run ``source``, which feeds ``entry``; however it ends reaches every subscriber."""
    try:
        await source
    except LLMKitError as exc:
        entry.fail(exc)
    except asyncio.CancelledError:
        entry.fail(Retry("cancelled"))
        raise
    except Exception:
        log.exception("shared upstream call failed")
        entry.fail(InternalError("internal error; see the server log"))


async def _pump_whole(entry: Entry, gateway: Leading, call: Call, run: Run) -> None:
    target, completion = await gateway.complete(call, run)
    entry.open(target, streamed=False)
    entry.complete(completion)


async def _pump_stream(entry: Entry, gateway: Leading, call: Call, run: Run) -> None:
    target, chunks = await gateway.open_stream(call, run, strip_usage=False)
    entry.open(target, streamed=True)
    await _pump_frames(entry, chunks)


async def _pump_frames(entry: Entry, chunks: TrackedStream) -> None:
    """Append the rest of ``chunks`` to ``entry`` until it ends. ``chunks`` may be a
    ``Lead`` (the leader's own stream, handed off): closed as the upstream it reads,
    not left as its leader's stream."""
    try:
        while await pull_into(entry, chunks) is not None:
            pass
    finally:
        await TrackedStream.aclose(chunks)


def _role(call: Call, role: str) -> None:
    call.response_headers[ROLE_HEADER] = role
    if call.obs is not None:
        call.obs.multiplexer_role(role)


def _target_for(gateway: Leading, model: str, opened: Opened) -> Target:
    """This worker's ``Target`` for the deployment the owner's call went to."""
    targets = gateway.resolve(model)
    label = f"{opened.provider}/{opened.model}"
    for target in targets:
        if target.deployment == opened.deployment and target.label == label:
            return target
    return next((t for t in targets if t.label == label), targets[0])

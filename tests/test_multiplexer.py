"""The multiplexer in one process: keys, eligibility, fan-out, lifetime, the shm table.

Upstream calls go to a real mock server over a real socket (``PacedMock``), so "one
upstream call" is what the mock counted, and "cancelled" is what it saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
from aiohttp import web

from llmkit.config import Config, MultiplexerConfig, load_config
from llmkit.errors import RateLimitError, ServiceUnavailableError
from llmkit.gateway import Gateway
from llmkit.multiplexer import dedup_key, eligible
from llmkit.mux_entry import Entry, Subscription, assemble, completion_frames
from llmkit.mux_table import FULL, OWNER, TAKEN, MuxTable, declare, pack_owner
from llmkit.providers.base import Call
from llmkit.state import SharedState
from llmkit.types import ChatRequest, chunk_decoder
from shm import Atomics, LayoutBuilder
from tests.mocks.openai import OpenAIMock, chunks


class PacedMock(OpenAIMock):
    """The OpenAI mock, streaming one chunk every ``chunk_delay_s``; with ``gate`` set,
    it holds before chunk ``gate_at`` until the test opens the gate."""

    def __init__(self) -> None:
        self.chunk_delay_s = 0.0
        self.gate: threading.Event | None = None
        self.gate_at = 0
        super().__init__(key=None)

    async def _stream(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n, chunk in enumerate(chunks(body, model)):
            while self.gate is not None and n == self.gate_at and not self.gate.is_set():
                await asyncio.sleep(0.005)
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
def mock() -> Iterator[PacedMock]:
    with PacedMock() as upstream:
        yield upstream


def config_for(mock: OpenAIMock, extra: str = "") -> Config:
    """A provider "local" at ``mock``, then ``extra``; read from a file removed once read."""
    with tempfile.NamedTemporaryFile("w", prefix="llmkit-mux-test-", suffix=".toml") as f:
        f.write(f'[[providers]]\nname = "local"\nbase_url = "{mock.url}/v1"\n{extra}')
        f.flush()
        return load_config(f.name)


def gateway_for(mock: OpenAIMock, extra: str = "") -> Gateway:
    return Gateway(config_for(mock, extra))


def call(stream: bool = True, headers: dict[str, str] | None = None, **fields: Any) -> Call:
    body: dict[str, Any] = {"model": "local/m", "seed": 1, "stream": stream}
    body.setdefault("messages", [{"role": "user", "content": "one two three four"}])
    body.update(fields)
    extras = {k: body.pop(k) for k in list(body) if k not in ChatRequest.__struct_fields__}
    return Call(msgspec.convert(body, ChatRequest), extras, dict(headers or {}))


def deltas(frames: list[bytes]) -> list[str]:
    text = b"".join(frames).split(b"\n\n")
    out = []
    for event in text:
        if event:
            chunk = chunk_decoder.decode(event[6:])
            out += [c.delta.content for c in chunk.choices if isinstance(c.delta.content, str)]
    return out


async def read_all(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [frame async for frame in stream]


# -- key and eligibility ------------------------------------------------------------


def key(c: Call, gateway: Gateway | None = None) -> bytes:
    targets = (gateway or Gateway(Config())).resolve(c.request.model)
    return dedup_key(c, targets)


def test_the_key_ignores_stream_transport_and_user_but_not_the_output_fields() -> None:
    base = key(call(model="demo/x"))
    assert key(call(model="demo/x", stream=False)) == base
    assert key(call(model="demo/x", user="alice", stream_options={"include_usage": True})) == base
    assert key(call(model="demo/x", headers={"x-request-id": "abc"})) == base
    tool = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    different = [
        call(model="demo/y"),
        call(model="demo/x", temperature=0.5),
        call(model="demo/x", seed=2),
        call(model="demo/x", stop=["\n"]),
        call(model="demo/x", max_tokens=5),
        call(model="demo/x", n=2),
        call(model="demo/x", top_p=0.5),
        call(model="demo/x", tools=[tool]),
        call(model="demo/x", tool_choice="none"),
        call(model="demo/x", response_format={"type": "json_object"}),
        call(model="demo/x", logit_bias={"50256": -100}),  # a provider extra
        call(model="demo/x", messages=[{"role": "system", "content": "be terse"},
                                       {"role": "user", "content": "one two three four"}]),
        call(model="demo/x", messages=[{"role": "user", "content": [
            {"type": "text", "text": "one two three four"},
            {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]),
    ]  # fmt: skip
    keys = [key(c) for c in different]
    assert base not in keys
    assert len(set(keys)) == len(keys)


def test_the_key_does_not_depend_on_json_key_order() -> None:
    a = call(model="demo/x", response_format={"type": "json_schema", "json_schema": {"a": 1}})
    b = call(model="demo/x", response_format={"json_schema": {"a": 1}, "type": "json_schema"})
    assert key(a) == key(b)


def test_an_alias_shares_with_the_model_it_resolves_to(mock: PacedMock) -> None:
    gateway = gateway_for(
        mock, '[[models]]\nname = "fast"\n[[models.deployments]]\nprovider = "local"\nmodel = "m"\n'
    )
    assert key(call(model="fast"), gateway) == key(call(model="local/m"), gateway)


def test_an_alias_of_several_deployments_keys_on_all_their_labels(mock: PacedMock) -> None:
    def alias(name: str, models: tuple[str, ...]) -> str:
        rows = "".join(
            f'[[models.deployments]]\nprovider = "local"\nmodel = "{m}"\n' for m in models
        )
        return f'[[models]]\nname = "{name}"\n{rows}'

    gateway = gateway_for(mock, alias("ab", ("a", "b")) + alias("ba", ("b", "a")))
    both = key(call(model="ab"), gateway)
    assert both == key(call(model="ba"), gateway)  # the same deployments, in any order
    assert both != key(call(model="local/a"), gateway)
    assert both != key(call(model="local/b"), gateway)
    assert b'"model":"[' in both  # never mistaken for one label: a label starts with a name


def test_eligibility() -> None:
    default = MultiplexerConfig()
    assert eligible(call(), default)  # a seed
    assert eligible(call(seed=None, temperature=0), default)
    assert not eligible(call(seed=None, temperature=0.7), default)
    assert not eligible(call(seed=None), default)
    assert eligible(call(seed=None, headers={"x-llmkit-dedup": "on"}), default)
    assert not eligible(call(headers={"x-llmkit-dedup": "off"}), default)
    assert eligible(call(seed=None), MultiplexerConfig(eligible="all"))
    assert not eligible(call(), MultiplexerConfig(enabled=False))


# -- entries and subscriptions ------------------------------------------------------


async def test_a_late_joiner_gets_every_frame_and_a_stalled_reader_delays_nobody() -> None:
    entry = Entry(b"k")
    early = Subscription(entry, wants_usage=False)
    stalled = Subscription(entry, wants_usage=True)
    entry.join()
    entry.join()
    frames = [f"data: {i}\n\n".encode() for i in range(20)]
    reading = asyncio.ensure_future(read_all(early))
    for frame in frames[:10]:
        entry.append(frame)
        await asyncio.sleep(0)
    entry.join()
    late = asyncio.ensure_future(read_all(Subscription(entry, wants_usage=False)))
    for frame in frames[10:]:
        entry.append(frame)
    entry.append(b"data: usage\n\n", usage=True)
    entry.finish()
    assert await asyncio.wait_for(reading, 5) == frames  # the stalled one never read
    assert await asyncio.wait_for(late, 5) == frames
    got = await read_all(stalled)
    assert got == [*frames, b"data: usage\n\n"]
    assert all(a is b for a, b in zip(got, frames, strict=False))  # the same bytes objects


async def test_an_error_reaches_every_subscriber_after_what_came_before() -> None:
    entry = Entry(b"k")
    subs = [Subscription(entry, wants_usage=False) for _ in range(3)]
    for _ in subs:
        entry.join()
    entry.append(b"data: 1\n\n")
    entry.fail(ServiceUnavailableError("upstream went away"))
    for sub in subs:
        assert await anext(sub) == b"data: 1\n\n"
        with pytest.raises(ServiceUnavailableError, match="went away"):
            await anext(sub)


def test_a_completion_round_trips_through_frames() -> None:
    from llmkit.types import completion_decoder

    tool_body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
                 "tools": [{"type": "function", "function": {"name": "weather"}}]}  # fmt: skip
    plain_body = {"model": "m", "messages": [{"role": "user", "content": "a b c"}]}
    for body in (plain_body, tool_body):
        from tests.mocks.openai import completion

        original = completion_decoder.decode(json.dumps(completion(body, "m")))
        rebuilt = assemble(completion_frames(original))
        assert rebuilt.choices == original.choices
        assert rebuilt.usage == original.usage
        assert rebuilt.id == original.id


# -- through the gateway, against a real upstream -----------------------------------


async def test_identical_concurrent_streams_make_one_upstream_call(mock: PacedMock) -> None:
    mock.delay_s = 0.2
    gateway = gateway_for(mock)
    try:
        opened = await asyncio.gather(*(gateway.stream(call()) for _ in range(20)))
        outputs = await asyncio.gather(*(read_all(s) for _, s in opened))
    finally:
        await gateway.close()
    assert len(mock.requests) == 1
    assert mock.requests[0].json()["stream_options"] == {"include_usage": True}
    assert all(o == outputs[0] for o in outputs)
    assert "".join(deltas(outputs[0])) == "Hello from m: one two three four"
    assert b'"usage"' not in b"".join(outputs[0])  # nobody asked for it
    stats = gateway.multiplexer.counters.local  # type: ignore[union-attr]
    assert stats == [1, 19, 19]


async def test_distinct_requests_each_get_their_own_call(mock: PacedMock) -> None:
    mock.delay_s = 0.2
    gateway = gateway_for(mock)
    tool = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    variants = [call(), call(temperature=0.3), call(tools=[tool]), call(stop=["x"]),
                call(messages=[{"role": "system", "content": "s"},
                               {"role": "user", "content": "one two three four"}])]  # fmt: skip
    try:
        opened = await asyncio.gather(*(gateway.stream(c) for c in variants + variants))
        await asyncio.gather(*(read_all(s) for _, s in opened))
    finally:
        await gateway.close()
    assert len(mock.requests) == len(variants)


async def test_usage_reaches_only_the_subscribers_that_asked(mock: PacedMock) -> None:
    mock.delay_s = 0.2
    gateway = gateway_for(mock)
    try:
        asked = call(stream_options={"include_usage": True})
        opened = await asyncio.gather(gateway.stream(call()), gateway.stream(asked))
        without, with_usage = await asyncio.gather(*(read_all(s) for _, s in opened))
    finally:
        await gateway.close()
    assert len(mock.requests) == 1
    assert b'"usage"' not in b"".join(without)
    assert with_usage[: len(without)] == without
    last = chunk_decoder.decode(with_usage[-1][6:])
    assert last.choices == [] and last.usage is not None


async def test_stream_and_whole_callers_share_in_both_directions(mock: PacedMock) -> None:
    mock.delay_s = 0.2
    gateway = gateway_for(mock)
    try:
        # A whole request leads; a streaming one joins it and gets chunks.
        whole, streamed = await asyncio.gather(gateway.chat(call(False)), gateway.stream(call()))
        frames = await read_all(streamed[1])
        # A streaming request leads; a whole one joins and gets the assembled JSON.
        streamed2, whole2 = await asyncio.gather(
            gateway.stream(call(max_tokens=9)), gateway.chat(call(False, max_tokens=9))
        )
        await read_all(streamed2[1])
    finally:
        await gateway.close()
    assert [r.json().get("stream", False) for r in mock.requests] == [False, True]
    text = "Hello from m: one two three four"
    assert "".join(deltas(frames)) == text
    assert whole[1].choices[0].message.content == text
    assert whole2[1].choices[0].message.content == text
    assert whole2[1].usage is not None and whole2[1].usage.total_tokens > 0


async def test_a_stalled_subscriber_does_not_delay_the_others(mock: PacedMock) -> None:
    mock.delay_s = 0.1
    mock.chunk_delay_s = 0.01
    gateway = gateway_for(mock)
    try:
        both = await asyncio.gather(gateway.stream(call()), gateway.stream(call()))
        (_, stalled), (_, reader) = both
        started = time.monotonic()
        frames = await asyncio.wait_for(read_all(reader), 10)
        took = time.monotonic() - started
        late = await read_all(stalled)  # it lost nothing while it stalled
    finally:
        await gateway.close()
    assert late == frames
    assert took < 5  # the stalled reader never held the other back


async def test_a_late_joiner_through_the_gateway_gets_the_whole_stream(mock: PacedMock) -> None:
    mock.gate, mock.gate_at = threading.Event(), 10
    gateway = gateway_for(mock)
    long_text = " ".join(f"w{i}" for i in range(15))  # 20 chunks with role, prefix, finish
    request = {"messages": [{"role": "user", "content": long_text}]}
    try:
        _, first = await gateway.stream(call(**request))
        early: list[bytes] = []
        while sum(item.count(b"\n\n") for item in early) < 10:  # an item may hold several
            early.append(await anext(first))
        _, late = await gateway.stream(call(**request))
        mock.gate.set()
        rest, everything = await asyncio.gather(read_all(first), read_all(late))
    finally:
        await gateway.close()
    assert len(mock.requests) == 1
    assert everything == early + rest
    assert len(deltas(everything)) == 19  # role delta, 18 words; then the finish chunk


async def test_when_every_subscriber_leaves_the_upstream_call_is_cancelled(
    mock: PacedMock,
) -> None:
    mock.chunk_delay_s = 0.05
    gateway = gateway_for(mock)
    try:
        opened = await asyncio.gather(*(gateway.stream(call()) for _ in range(3)))
        for _, stream in opened:
            await anext(stream)
        for _, stream in opened:
            await stream.aclose()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while mock.disconnects < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert gateway.multiplexer is not None and gateway.multiplexer.in_flight() == 0
    finally:
        await gateway.close()
    assert mock.disconnects == 1
    assert len(mock.requests) == 1


async def test_an_upstream_error_reaches_every_subscriber(mock: PacedMock) -> None:
    from tests.mocks.base import Fault

    mock.delay_s = 0.2
    mock.faults.append(Fault("status", status=503, times=10))
    gateway = gateway_for(mock)
    try:
        results = await asyncio.gather(
            *(gateway.stream(call()) for _ in range(5)), return_exceptions=True
        )
    finally:
        await gateway.close()
    assert all(isinstance(r, ServiceUnavailableError) for r in results)
    assert len(mock.requests) == 1  # the leader's try, not one per subscriber


async def test_completed_calls_leave_the_table(mock: PacedMock) -> None:
    gateway = gateway_for(mock)
    try:
        for _ in range(2):
            _, stream = await gateway.stream(call())
            await read_all(stream)
    finally:
        await gateway.close()
    assert len(mock.requests) == 2  # not a cache


async def test_a_follower_joining_during_the_leaders_own_read_misses_nothing(
    mock: PacedMock,
) -> None:
    """The leader reads the upstream inline; a follower arriving while that read is
    under way makes it hand off once the read is in, and both see every frame."""
    mock.gate, mock.gate_at = threading.Event(), 10
    gateway = gateway_for(mock)
    request = {"messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(15))}]}
    try:
        _, leader = await gateway.stream(call(**request))
        early: list[bytes] = []
        while sum(item.count(b"\n\n") for item in early) < 10:  # all there is before the gate
            early.append(await anext(leader))
        pending = asyncio.ensure_future(anext(leader))  # held at the gate, mid-read
        await asyncio.sleep(0.05)
        assert not pending.done()
        _, follower = await asyncio.wait_for(gateway.stream(call(**request)), 5)
        mock.gate.set()
        middle = await pending
        rest, everything = await asyncio.gather(read_all(leader), read_all(follower))
    finally:
        await gateway.close()
    assert len(mock.requests) == 1
    assert b"".join(everything) == b"".join([*early, middle, *rest])


async def test_a_leader_that_stalls_between_reads_hands_off_to_a_follower(
    mock: PacedMock,
) -> None:
    """The leader's caller reads the upstream itself until someone joins; a follower
    joining while the leader is not reading (its client stalled) takes the upstream over
    at once, and the leader, reading again later, misses nothing."""
    mock.chunk_delay_s = 0.01
    gateway = gateway_for(mock)
    request = {"messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(15))}]}
    try:
        _, leader = await gateway.stream(call(**request))
        early = [await anext(leader), await anext(leader)]
        await asyncio.sleep(0.05)  # the leader stalls between reads; the upstream goes on
        _, follower = await gateway.stream(call(**request))
        everything = await asyncio.wait_for(read_all(follower), 10)  # not held by the leader
        rest = await read_all(leader)
    finally:
        await gateway.close()
    assert len(mock.requests) == 1
    assert b"".join(everything) == b"".join(early + rest)
    assert len(deltas(everything)) == 19


async def test_a_leader_refused_by_a_limit_is_not_counted_and_frees_its_claim(
    mock: PacedMock,
) -> None:
    config = config_for(mock, "[limits]\nrpm = 1\n")
    name = f"/llmkit-test-mux-refused-{os.getpid()}"
    state = SharedState.create(name, config)
    try:
        mux = state.multiplexer(config, 0, name)
        gateway = Gateway(config, control=state.control(config, 0), multiplexer=mux)
        try:
            _, stream = await gateway.stream(call(seed=1))
            await read_all(stream)
            await stream.aclose()  # type: ignore[attr-defined]
            with pytest.raises(RateLimitError):
                await gateway.stream(call(seed=2))  # claimed, counted, then refused
            assert mux.counters.value(0) == 1  # leaders: the refused one uncounted
            assert mux.in_flight() == 0 and state.mux_table().in_use() == 0
        finally:
            await gateway.close()
    finally:
        state.segment.unlink()
        state.close()
    assert len(mock.requests) == 1


async def test_unshared_streams_with_shm_peers_leave_no_claim_behind(mock: PacedMock) -> None:
    """The path of most requests: lead, read inline, end; the shm slot is given back."""
    config = config_for(mock)
    name = f"/llmkit-test-mux-{os.getpid()}"
    state = SharedState.create(name, config)
    plain = Gateway(msgspec.structs.replace(config, multiplexer=MultiplexerConfig(enabled=False)))
    try:
        mux = state.multiplexer(config, 0, name)
        gateway = Gateway(config, control=state.control(config, 0), multiplexer=mux)
        try:
            for seed in range(10):
                for usage in (False, True):
                    options = {"stream_options": {"include_usage": True}} if usage else {}
                    request = call(seed=seed, **options)
                    _, stream = await gateway.stream(request)
                    frames = await read_all(stream)
                    await stream.aclose()  # type: ignore[attr-defined]
                    assert request.response_headers["x-llmkit-dedup"] == "leader"
                    _, unshared = await plain.stream(call(seed=seed, **options))
                    assert b"".join(frames) == b"".join(await read_all(unshared))
                    assert (b'"usage"' in b"".join(frames)) == usage
            assert mux.in_flight() == 0 and state.mux_table().in_use() == 0
            assert mux.counters.value(0) == 20  # leaders
        finally:
            await gateway.close()
            await plain.close()
    finally:
        state.segment.unlink()
        state.close()
    assert len(mock.requests) == 40


# -- the shm table --------------------------------------------------------------------


def table(slots: int = 16) -> MuxTable:
    builder = LayoutBuilder()
    declare(builder, slots)
    layout = builder.build()
    return MuxTable(Atomics(bytearray(layout.size)), layout)


def test_the_table_claims_finds_releases_and_reclaims() -> None:
    t = table()
    tag, owner = t.tag(b"\x01" * 16), pack_owner(3, 7)
    slot = t.acquire(tag, owner, 1234)
    assert slot >= 0
    found = t.find(tag)
    assert found is not None and (found.worker_slot, found.pid) == (3, 1234)
    assert t.acquire(tag, pack_owner(4, 1), 999) == found  # held: its owner, no claim
    assert t.in_use() == 1
    t.release(slot, tag, pack_owner(4, 1))  # not the owner: nothing happens
    assert t.find(tag) is not None
    t.release(slot, tag, owner)
    assert t.find(tag) is None and t.in_use() == 0
    t.acquire(tag, owner, 1234)
    t.acquire(t.tag(b"\x02" * 16), owner, 1234)
    assert t.reclaim(1234) == 2 and t.in_use() == 0


def test_a_full_probe_window_refuses_and_tags_are_never_zero() -> None:
    t = table(8)
    tags = [8 * i + 5 for i in range(1, 9)]  # all start at the same slot
    assert all(t.acquire(tag, pack_owner(0, 1), 1) >= 0 for tag in tags)
    assert t.acquire(8 * 99 + 5, pack_owner(0, 1), 1) == FULL
    assert t.tag(bytes(16)) != 0


def test_racing_claims_for_one_tag_leave_one_owner() -> None:
    t = table()
    tag = t.tag(b"\x07" * 16)
    first = t.acquire(tag, pack_owner(0, 1), 100)
    assert first >= 0
    assert t.acquire(tag, pack_owner(1, 1), 200) == t.find(tag)
    assert t.find(tag).pid == 100  # type: ignore[union-attr]


def test_an_unpublished_claim_makes_others_wait() -> None:
    t = table()
    tag = t.tag(b"\x08" * 16)
    slot = t.acquire(tag, pack_owner(0, 1), 100)
    assert isinstance(slot, int)
    t._a.store_i64(t._offsets[slot] + OWNER, 0)  # the claimer is between CAS and publish
    assert t.acquire(tag, pack_owner(1, 1), 200) == TAKEN
    assert t.in_use() == 1


async def test_the_owner_shares_only_the_exact_key(tmp_path: Any) -> None:
    """The shm tag only finds a candidate owner: over the attach socket the whole key
    is compared, so a key whose tag collides gets a miss, never another call's frames."""
    from llmkit.mux_link import MISS, LinkServer, connect, mirror_remote
    from llmkit.providers.base import Provider, Target

    asked = dedup_key(call(), Gateway(Config()).resolve("demo/x"))
    other = asked[:-2] + b"0}"  # same length, one byte apart
    owned = Entry(asked)
    server = LinkServer({asked: owned}.get)
    path = str(tmp_path / "link" / "owner.sock")
    await server.start(path)
    try:
        reader, writer = await connect(path, other)
        assert (await reader.readexactly(1)) == MISS
        writer.close()
        target = Target(Provider("local", "openai", "http://127.0.0.1:9"), "m", "local/m")
        reader, writer = await connect(path, asked)
        mirrored = Entry(asked)
        mirroring = asyncio.ensure_future(mirror_remote(mirrored, reader, lambda _: target))
        for _ in range(500):  # until the owner has read the hello and subscribed
            if owned.subscribers:
                break
            await asyncio.sleep(0.01)
        owned.open(target, streamed=True)
        owned.append(b"data: 1\n\n")
        owned.finish()
        await asyncio.wait_for(mirroring, 5)
        writer.close()
    finally:
        server.close()
    assert mirrored.frames == [b"data: 1\n\n"] and mirrored.done and mirrored.error is None


async def test_an_unshared_stream_cut_mid_way_fails_its_leader_and_leaves_nothing() -> None:
    from llmkit.errors import LLMKitError
    from tests.mocks.base import Fault

    with OpenAIMock(key=None) as upstream:
        upstream.faults.append(Fault("reset", after_chunks=2))
        gateway = gateway_for(upstream)
        mux = gateway.multiplexer
        assert mux is not None
        try:
            _, stream = await gateway.stream(call())
            got = []
            tasks = asyncio.all_tasks()
            with pytest.raises(LLMKitError):
                async for frame in stream:
                    got.append(frame)
            assert asyncio.all_tasks() <= tasks  # nothing was handed off to a task
            await stream.aclose()  # type: ignore[attr-defined]
            assert got and mux.in_flight() == 0
            _, again = await gateway.stream(call())  # the same request leads afresh
            frames = b"".join(await read_all(again)).replace(b"data: [DONE]\n\n", b"")
            assert "".join(deltas([frames])) == "Hello from m: one two three four"
        finally:
            await gateway.close()
    assert len(upstream.requests) == 2

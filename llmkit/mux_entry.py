"""One shared upstream call (``Entry``) and the subscriptions that read it.

An entry stores what its source produced once: a stream's SSE frames as immutable
``bytes`` in a list, or a whole ``ChatCompletion``. A subscription is an index into that
list, so a slow reader costs nothing to the others, a late joiner starts at frame 0, and
no payload is copied per subscriber. Conversions between the two shapes (a streaming
caller joining a whole completion, a non-streaming caller joining a stream) are computed
once per entry and cached.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import msgspec

from llmkit.attempts import Attempt, Run, TrackedStream
from llmkit.errors import LLMKitError, ServiceUnavailableError
from llmkit.providers.base import SSE_DONE, Frames, Target, sse_event
from llmkit.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
    chunk_decoder,
)

FRAME_PREFIX = b"data: "
FRAME_SUFFIX = b"\n\n"


class Keeper(Protocol):
    """The table an entry is in (``llmkit.multiplexer.Multiplexer``): told when the
    entry's call ends (``ended``: a ``Lead`` that nobody else read), when its last
    subscriber leaves, and when a leading caller stops reading the upstream itself."""

    def forget(self, entry: Entry) -> None: ...

    def ended(self, lead: Lead) -> None: ...

    def abandon(self, entry: Entry) -> None: ...

    def hand_off(self, entry: Entry, chunks: TrackedStream) -> None: ...


class Entry:
    """One in-flight upstream call: its target, its output so far, and who reads it.

    ``key`` is the request's canonical bytes (``llmkit.multiplexer.dedup_key``).
    ``frames[usage_at]`` is the usage-only chunk (-1: none yet); each subscription
    passes it on only if its caller asked for usage. ``subscribers`` counts readers;
    when it drops to 0 before the end, its ``keeper`` cancels the source.
    """

    # Class-level defaults: a new entry sets only what differs (one is made per eligible
    # request, so its construction is on the unshared path).
    claim = -2  # its slot in the shm table (mux_table.FULL: none)
    target: Target | None = None
    streamed = True
    usage_at = -1
    completion: ChatCompletion | None = None
    error: LLMKitError | None = None
    opened = False
    done = False
    keeper: Keeper | None = None
    _waiters: list[asyncio.Future[None]] | None = None
    _assembled: ChatCompletion | None = None
    _chunked = False

    def __init__(self, key: bytes, subscribers: int = 0) -> None:
        self.key = key
        self.frames: list[bytes] = []
        self.subscribers = subscribers

    # -- the source's side --------------------------------------------------------

    def open(self, target: Target, streamed: bool) -> None:
        self.target, self.streamed, self.opened = target, streamed, True
        if self._waiters:
            self.notify()

    def append(self, frame: bytes, usage: bool = False) -> None:
        if usage:
            self.usage_at = len(self.frames)
        self.frames.append(frame)
        if self._waiters:
            self.notify()

    def add(self, frames: Frames) -> None:
        """One upstream read: its events, then its usage event apart."""
        stored = self.frames
        if frames.events:
            stored.append(frames.events)
        if frames.usage_event:
            self.usage_at = len(stored)
            stored.append(frames.usage_event)
        if self._waiters:
            self.notify()

    def complete(self, completion: ChatCompletion) -> None:
        """A whole (non-streamed) answer arrived: the entry is done."""
        self.completion = completion
        self.finish()

    def finish(self) -> None:
        self.done = True
        if self._waiters:
            self.notify()
        if self.keeper is not None:
            self.keeper.forget(self)  # the table holds calls in flight, never results

    def fail(self, error: LLMKitError) -> None:
        if self.done:
            return
        self.error = error
        self.finish()

    def abort(self, exc: BaseException) -> None:
        """Its leader's call failed before its first output: followers get the same
        error, or start over if the leader just went away; the leader leaves."""
        self.fail(exc if isinstance(exc, LLMKitError) else Retry("the leading request went away"))
        self.leave()

    def notify(self) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- the readers' side --------------------------------------------------------

    async def changed(self) -> None:
        """Wait for the next append, open, finish or failure."""
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        await waiter

    def join(self) -> None:
        self.subscribers += 1

    def leave(self) -> None:
        self.subscribers -= 1
        if self.subscribers <= 0 and not self.done and self.keeper is not None:
            self.keeper.abandon(self)

    async def wait_open(self) -> Target:
        """The target once the source produced its first output; its error if it failed."""
        while not self.opened:
            if self.done:
                raise self.raised()
            await self.changed()
        assert self.target is not None
        return self.target

    async def wait_whole(self) -> ChatCompletion:
        """The whole answer, assembled from the frames if the source streamed."""
        while not self.done:
            await self.changed()
        if self.error is not None:
            raise self.raised()
        if self.completion is not None:
            return self.completion
        if self._assembled is None:
            self._assembled = assemble(self.frames)
        return self._assembled

    def stream_frames(self) -> list[bytes]:
        """The frames so far; a whole answer becomes frames once it is done (none
        before)."""
        if not self.streamed and self.completion is not None and not self._chunked:
            self._chunked = True
            frames = completion_frames(self.completion)
            self.usage_at = len(frames) - 1 if self.completion.usage is not None else -1
            self.frames = frames
        return self.frames

    def raised(self) -> LLMKitError:
        """A copy of the error for one subscriber: its headers are its own."""
        assert self.error is not None
        error = copy.copy(self.error)
        error.headers = {}
        return error


class Subscription:
    """One streaming caller's view of an entry: SSE frames from index 0, at its own pace.

    A class rather than an async generator so that ``aclose()`` leaves the entry even
    when the caller never iterated (it went away before the first write).
    """

    __slots__ = ("_entry", "_index", "_left", "_on_leave", "_wants_usage")

    def __init__(
        self, entry: Entry, wants_usage: bool, on_leave: Callable[[], None] | None = None
    ) -> None:
        self._entry = entry
        self._index = 0
        self._wants_usage = wants_usage
        self._on_leave = on_leave
        self._left = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        entry = self._entry
        while True:
            frames = entry.frames if entry.streamed else entry.stream_frames()
            index = self._index
            if index < len(frames):
                self._index = index + 1
                if index == entry.usage_at and not self._wants_usage:
                    continue
                return frames[index]
            if entry.done:
                self._leave()
                if entry.error is not None:
                    raise entry.raised()
                raise StopAsyncIteration
            await entry.changed()

    async def aclose(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if self._left:
            return
        self._left = True
        self._entry.leave()
        if self._on_leave is not None:
            self._on_leave()


class Lead(Entry, TrackedStream):
    """An entry that is also its leading caller's stream: the call nobody shares (yet).

    While nobody else reads it, the leader's caller reads the upstream itself, through
    this object's own ``TrackedStream`` side, and gets each read at once; the read is
    kept in ``frames`` for late joiners with one list append. An unshared stream then
    costs one object (this entry *is* its stream), no task and no wake-ups. Once a
    follower has joined (or when the leader leaves first while followers remain) the
    upstream is handed to the keeper, which carries it on in a task of its own, so the
    leader's caller going away can no longer cut the followers short; the leader then
    reads the entry through a ``Subscription`` of its own, from where it had got to.

    A follower joining while the leader waits for an upstream read cannot take the
    upstream over mid-read: it swaps ``_keep`` (``frames`` itself until then) for a
    ``_HandOff``, whose ``append`` keeps the read in ``frames``, wakes the followers and
    hands off; the alone leader's read path checks for nothing.

    Every attribute it reads per upstream read is set in ``__init__`` or ``start``
    (no class defaults): CPython then keeps them inline in the instance and
    specializes each access, which the class-default lookups of ``Entry`` are not.
    """

    def __init__(self, key: bytes, claim: int, keeper: Keeper, wants_usage: bool, run: Run) -> None:
        self.key = key
        self.claim = claim
        self.keeper: Keeper = keeper
        self.frames = []
        self.subscribers = 1  # its leader
        self.done = False
        self._waiters = None
        self.run = run  # the leader's tries
        self._reader: Subscription | None = None  # the leader's, once it stops reading
        self._wants_usage = wants_usage
        self._keep: list[bytes] | _HandOff = self.frames  # what each read is appended to

    def start(
        self,
        run: Run,
        attempt: Attempt,
        first: Frames | None,
        rest: AsyncIterator[Frames],
        strip_usage: bool,
    ) -> Lead:
        """The call is open (``Gateway.open_stream`` builds its stream with this):
        its first output is in ``first``, the leader reads on."""
        TrackedStream.__init__(self, run, attempt, first, rest, strip_usage)
        self.target, self.opened = attempt.target, True
        if self._waiters:
            self.notify()
        if self.subscribers > 1:  # followers joined while the first chunk was awaited
            self._give_away(0)
        return self

    def __aiter__(self) -> Lead:
        return self

    def join(self) -> None:
        """A follower joined: the keeper takes the upstream over now, so a leader that
        stalls never stalls the others; or, if the leader is waiting for a read (its
        upstream generator is running), once that read is kept."""
        self.subscribers += 1
        if self._reader is None and self.opened and not self.done:
            if getattr(self._rest, "ag_running", True):
                self._keep = _HandOff(self)
            else:
                self._give_away(len(self.frames))  # every frame so far was returned

    def _keep_then_hand_off(self, events: bytes) -> None:
        self.frames.append(events)
        self._shared_from(len(self.frames))

    def _shared_from(self, index: int) -> None:
        """Others joined during the leader's read, now kept: wake them, hand off."""
        if self._waiters:
            self.notify()
        self._give_away(index)

    def _give_away(self, index: int) -> None:
        """Stop reading the upstream: the keeper carries it on, and the leader reads the
        entry from ``index`` on."""
        reader = self._reader = Subscription(self, self._wants_usage)
        reader._index = index
        self.keeper.hand_off(self, self)

    async def __anext__(self) -> bytes:
        # Alone and caught up: read the upstream ourselves and return each read at
        # once, kept in ``frames`` for late joiners. This runs per upstream read of
        # every unshared stream, so it does only what ``TrackedStream.__anext__``
        # does, plus the keeping; it loops rather than recursing: the end of the
        # stream is an exception, and every frame it passes costs a traceback entry.
        while self._reader is None:
            try:
                read = await self.next_frames()
            except StopAsyncIteration:
                # The end, settled inline (every unshared stream comes here once):
                # finish(). The leader need not leave a finished entry (``aclose``).
                self.done = True
                if self._waiters:
                    self.notify()
                self.keeper.ended(self)
                raise
            except LLMKitError as exc:
                self.fail(exc)  # the others get their copy
                raise
            except BaseException:  # cancelled mid-read: the call ends for all
                self.fail(_gone(self))
                raise
            events = read.events
            if read.usage_event or not events:
                events = self._kept(read, events)
                if not events:
                    continue
                return events
            self._keep.append(events)  # a list's append, done inline by CPython
            # The end with the last events, in one write; if this read was handed off,
            # the entry's end says it, as it does to every subscriber.
            return events + SSE_DONE if read.last and self._reader is None else events
        return await self._reader.__anext__()  # handed off: read the entry

    def _kept(self, read: Frames, events: bytes) -> bytes:
        """The rest of ``__anext__`` for a read that is not plain events (the usage
        chunk, or nothing): keep it, hand off if others joined meanwhile, and return
        what this caller is shown (b"": nothing, read on)."""
        frames = self.frames
        if events:
            frames.append(events)
        if read.usage_event:
            self.usage_at = len(frames)
            frames.append(read.usage_event)
            if self._wants_usage:
                events += read.usage_event
        if self.subscribers > 1:  # joined during the read: hand off
            self._shared_from(len(frames))
        elif read.last:
            events += SSE_DONE
        return events

    async def aclose(self) -> None:
        if self._reader is None and not self._closed:  # left while reading the upstream
            if self.subscribers == 1 or self.done:
                await TrackedStream.aclose(self)
                self.leave()
                return
            self._give_away(len(self.frames))  # the others carry on without it
        if self._reader is not None:
            await self._reader.aclose()  # leaves the entry, once
        # else it ended by itself: a finished entry needs no leaving


class _HandOff:
    """Stands in for a ``Lead``'s ``frames`` as what its leader keeps each read in,
    once a follower joined while the leader waited for that read: keeping it hands
    the upstream off."""

    __slots__ = ("_lead",)

    def __init__(self, lead: Lead) -> None:
        self._lead = lead

    def append(self, events: bytes) -> None:
        self._lead._keep_then_hand_off(events)


async def pull_into(entry: Entry, chunks: TrackedStream) -> Frames | None:
    """Read the next upstream frames into ``entry`` and return them; None once the
    stream has ended (finished, or failed with the upstream's error)."""
    try:
        frames = await chunks.next_frames()
    except StopAsyncIteration:
        entry.finish()
        return None
    except LLMKitError as exc:
        entry.fail(exc)
        return None
    entry.add(frames)
    return frames


def _gone(entry: Entry) -> LLMKitError:
    """The leader left mid-read: before any output followers start over, after it
    they end with an error event."""
    if entry.frames:
        return ServiceUnavailableError("the shared upstream call was cut short; retry")
    return Retry("the leading request went away")


class Retry(LLMKitError):
    """Internal: the shared call could not be joined before its first output; the
    subscriber starts over (leads, or joins whoever leads now). Never sent to a client."""


# -- shape conversions --------------------------------------------------------------


def completion_frames(completion: ChatCompletion) -> list[bytes]:
    """A whole completion as the stream OpenAI would have sent: per choice a delta with
    everything and a finish chunk, then the usage chunk if there is usage."""
    head = ChatCompletionChunk(
        id=completion.id, created=completion.created, model=completion.model, choices=[],
        system_fingerprint=completion.system_fingerprint,
    )  # fmt: skip
    frames = []
    for choice in completion.choices:
        message = choice.message
        delta = Delta(role="assistant", content=message.content)
        if message.tool_calls:
            delta.tool_calls = [
                ToolCallDelta(index=i, id=call.id, type="function",
                              function=FunctionCallDelta(name=call.function.name,
                                                         arguments=call.function.arguments))
                for i, call in enumerate(message.tool_calls)
            ]  # fmt: skip
        if message.refusal is not None:
            delta.refusal = message.refusal
        frames.append(_frame(head, [ChunkChoice(index=choice.index, delta=delta)]))
        finish = ChunkChoice(index=choice.index, delta=Delta(), finish_reason=choice.finish_reason)
        frames.append(_frame(head, [finish]))
    if completion.usage is not None:
        frames.append(sse_event(msgspec.structs.replace(head, usage=completion.usage)))
    return frames


def _frame(head: ChatCompletionChunk, choices: list[ChunkChoice]) -> bytes:
    return sse_event(msgspec.structs.replace(head, choices=choices))


class _Assembly:
    __slots__ = ("content", "finish", "refusal", "tools")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.tools: dict[int, list[str]] = {}  # index -> [id, name, arguments...]
        self.finish: str | None = None


def assemble(frames: list[bytes]) -> ChatCompletion:
    """The ``ChatCompletion`` a stream of SSE frames adds up to."""
    events = b"".join(frames).split(FRAME_SUFFIX)
    chunks = [chunk_decoder.decode(e[len(FRAME_PREFIX) :]) for e in events if e]
    choices: dict[int, _Assembly] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            parts = choices.setdefault(choice.index, _Assembly())
            _add_delta(parts, choice.delta)
            parts.finish = choice.finish_reason or parts.finish
    first = chunks[0]
    return ChatCompletion(
        id=first.id,
        created=first.created,
        model=first.model,
        system_fingerprint=first.system_fingerprint,
        usage=usage,
        choices=[_choice(i, parts) for i, parts in sorted(choices.items())],
    )


def _add_delta(parts: _Assembly, delta: Delta) -> None:
    if isinstance(delta.content, str):
        parts.content.append(delta.content)
    if isinstance(delta.refusal, str):
        parts.refusal.append(delta.refusal)
    if isinstance(delta.tool_calls, list):
        for call in delta.tool_calls:
            slot = parts.tools.setdefault(call.index, ["", ""])
            if isinstance(call.id, str):
                slot[0] = call.id
            if isinstance(call.function, FunctionCallDelta):
                if isinstance(call.function.name, str):
                    slot[1] = call.function.name
                if isinstance(call.function.arguments, str):
                    slot.append(call.function.arguments)


def _choice(index: int, parts: _Assembly) -> Choice:
    message = ResponseMessage(
        content="".join(parts.content) if parts.content or not parts.tools else None,
        refusal="".join(parts.refusal) if parts.refusal else None,
    )
    if parts.tools:
        message.tool_calls = [
            ToolCall(id=slot[0], function=FunctionCall(name=slot[1], arguments="".join(slot[2:])))
            for _, slot in sorted(parts.tools.items())
        ]
    return Choice(index=index, message=message, finish_reason=parts.finish)

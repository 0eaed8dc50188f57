"""One request's tries across its deployments, and the control plane's books for each.

A ``Run`` is made per request. It admits the request at the levels every request
passes once (global, virtual key), orders the deployments with the router, and hands
out ``Attempt``s one at a time: each admitted at its provider and deployment levels
and by its deployment's breaker, with backoff between tries. Whatever happens, every
admission is reconciled with the tokens really used and released exactly once, and
every breaker slot taken is recorded or released:

- an attempt that gets an answer records success (latency, time to first token);
- one that fails with a retryable error records failure, except an upstream 429,
  which puts the deployment in cooldown for its Retry-After instead;
- one that is refused by a limit or a breaker never reached the upstream and
  costs nothing;
- a request that no deployment would take gives back its global and key charge too.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator

from llmkit.control import ControlPlane
from llmkit.errors import LLMKitError, RateLimitError, ServiceUnavailableError
from llmkit.limiter import Admission
from llmkit.providers.base import SSE_DONE, Call, Frames, Target
from llmkit.router import backoff_s, retryable
from llmkit.types import Usage

Clock = time.monotonic_ns
_RNG = random.Random()  # backoff jitter when there is no control plane


class Attempt:
    """One try at one deployment, admitted; settled once by ``succeeded``, ``failed`` or
    ``abandoned`` (later calls do nothing)."""

    def __init__(
        self, run: Run, target: Target, cell: int | None, admission: Admission | None
    ) -> None:
        self.target = target
        # Not the run itself: the run keeps its attempts, and a cycle would leave every
        # request's objects to the garbage collector.
        self._control = run.control
        self._obs = run.obs
        self._cell = cell
        self._admission = admission
        self._started = Clock()
        self.first_byte_ns = 0  # when a stream's first chunk came (0: not yet, or no stream)
        self.error: LLMKitError | None = None  # why it failed, once settled
        self._done = False

    def first_byte(self) -> None:
        """A stream's first chunk arrived: its time to first token is known."""
        if not self.first_byte_ns:
            self.first_byte_ns = Clock()

    def abandoned(self) -> None:
        """The caller went away or a bug struck: judge nothing; tokens stay at the
        estimate, since what the upstream used is unknown."""
        self._settle(Clock(), None, ok=None)

    def succeeded(self, usage: Usage | None) -> None:
        now = Clock()
        first = self.first_byte_ns
        ttft = (first - self._started) / 1e9 if first else None
        self._settle(now, usage, ok=True, ttft_s=ttft)

    def failed(self, error: LLMKitError, partial: bool = False) -> None:
        """The upstream refused or failed. Before any answer it produced no tokens to pay
        for; a stream cut part-way (``partial``) keeps its estimate."""
        now = Clock()
        nothing = None if partial else Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        control, cell = self._control, self._cell
        if control is not None and cell is not None and isinstance(error, RateLimitError):
            # The provider is busy, not broken: skip it until it says to come back.
            wait_s = error.retry_after if error.retry_after is not None else 1.0
            control.breakers.cooldown(cell, now + int(wait_s * 1e9))
            self._settle(now, nothing, ok=None, error=error)
            return
        self._settle(now, nothing, ok=False, error=error)

    def _settle(
        self,
        now: int,
        usage: Usage | None,
        ok: bool | None,
        ttft_s: float | None = None,
        error: LLMKitError | None = None,
    ) -> None:
        if self._done:
            return
        self._done = True
        self.error = error
        if self._obs is not None:
            self._obs.attempt_settled(ok, error)
        control = self._control
        if control is None:
            return
        if self._cell is not None:
            if ok is None:
                control.breakers.release(self._cell)
            else:
                latency = (now - self._started) / 1e9
                control.breakers.record(self._cell, ok, latency, now, ttft_s)
        if self._admission is not None:
            tokens = usage.total_tokens if usage is not None else self._admission.tokens
            control.limiter.reconcile(self._admission, tokens, now)
            control.limiter.release(self._admission)


class Run:
    """The tries of one request, in router order, within ``router.attempts``."""

    def __init__(
        self,
        control: ControlPlane | None,
        call: Call,
        targets: list[Target],
        tokens: int,
        attempts: int,
        backoff: tuple[float, float],
    ) -> None:
        self.control = control
        self.obs = call.obs
        # The call's parts, not the call: the call keeps its run (``Call.run``).
        self._key = call.key
        self._model = call.request.model
        self._headers = call.headers
        self.targets = targets
        self.attempts: list[Attempt] = []  # admitted tries, in order
        self.usage: Usage | None = None  # what the serving upstream reported, once closed
        self._tokens = tokens
        self._attempts = attempts
        self._backoff = backoff
        self._rng = control.rng if control is not None else _RNG
        self._errors: list[LLMKitError] = []  # what upstreams answered
        self._refusals: list[RateLimitError] = []  # what this gateway's limits said
        self._admission: Admission | None = None
        self._tried = 0
        self._position = 0

    def admit(self, key: str | None) -> None:
        """The request's own levels (global, key); raises RateLimitError when refused."""
        if self.control is None:
            return
        obs = self.obs
        mark = obs.mark() if obs is not None else 0
        try:
            self._admission = self.control.admit_request(key, self._tokens, Clock())
        except RateLimitError:
            if obs is not None:
                obs.admitted(mark, refused=True)
            raise
        if obs is not None:
            obs.admitted(mark, refused=False)

    def tries(self) -> Iterator[Attempt]:
        """Admitted attempts, best deployment first; ``failed`` waits out the backoff.

        A plain generator (the hot path pays for no async one): it is lazy, so the next
        deployment is admitted only after the caller's ``await run.failed(...)``.
        """
        for position, target in enumerate(self.targets):
            if self._tried >= self._attempts:
                return
            self._position = position
            attempt = self._open(target)
            if attempt is not None:
                self._tried += 1
                self.attempts.append(attempt)
                if self.obs is not None:
                    self.obs.attempt_started(target, self._headers)
                yield attempt

    def _open(self, target: Target) -> Attempt | None:
        control = self.control
        if control is None:
            return Attempt(self, target, None, None)
        now = Clock()
        try:
            admission = control.admit_attempt(target, self._tokens, now)
        except RateLimitError as refused:
            self._refusals.append(refused)
            return None
        cell = control.cell(target)
        if cell is not None and not control.breakers.acquire(cell, now):
            control.limiter.cancel(admission)
            return None
        return Attempt(self, target, cell, admission)

    async def failed(self, attempt: Attempt, error: LLMKitError) -> None:
        """Book a failed try; raise ``error`` if another would not help, else back off."""
        attempt.failed(error)
        self._errors.append(error)
        if not retryable(error):
            raise error
        if self._tried < self._attempts and self._position + 1 < len(self.targets):
            await asyncio.sleep(backoff_s(self._tried, *self._backoff, self._rng))

    def error(self) -> LLMKitError:
        """Why the request failed after every try: the last upstream error, else why none
        could be tried (a limit's Retry-After, or every deployment's breaker open)."""
        if self._errors:
            error = self._errors[-1]
        elif self._refusals:
            error = min(self._refusals, key=lambda e: e.retry_after or 0.0)
            if self.control is not None:
                target = self.targets[0] if self.targets else None
                error.headers.update(self.control.limit_headers(self._key, target, Clock()))
        else:
            model = self._model
            error = ServiceUnavailableError(
                f"every deployment of '{model}' is unavailable (circuit open or cooling down)",
                retry_after=1.0,
            )
        return error

    def close(self, usage: Usage | None, keep_estimate: bool = False) -> None:
        """Settle the request's own admission (once): refund it all if nothing was tried.

        Unknown ``usage`` means no tokens were used (every try failed), unless
        ``keep_estimate``: a stream cut part-way, whose real usage nobody reported.
        """
        if usage is not None:
            self.usage = usage
        if self.obs is not None:
            self.obs.settled(usage)
        control, admission = self.control, self._admission
        if control is None or admission is None:
            return
        self._admission = None
        if not self._tried:
            control.limiter.cancel(admission)
            return
        if usage is not None:
            control.limiter.reconcile(admission, usage.total_tokens, Clock())
        elif not keep_estimate:
            control.limiter.reconcile(admission, 0, Clock())
        control.limiter.release(admission)


def estimate_tokens(call: Call, default_completion: int) -> tuple[int, int]:
    """(prompt, completion) tokens a request may cost before it runs: its prompt at
    about four characters a token, and its ``max_tokens`` or the configured default."""
    request = call.request
    chars = 0
    for message in request.messages:
        content = message.content
        chars += len(content) if isinstance(content, str) else len(message.text()) + 64
    if request.tools:
        chars += 256 * len(request.tools)
    return chars // 4 + 1, request.token_limit() or default_completion


class TrackedStream:
    """A stream as the client sees it: SSE event bytes; settles its run exactly once.

    A class rather than an async generator so that ``aclose()`` settles the books even
    when the stream was never iterated (the client left before the first write). A
    usage chunk the gateway asked for on its own behalf is read, not passed on.
    """

    def __init__(
        self,
        run: Run,
        attempt: Attempt,
        first: Frames | None,
        rest: AsyncIterator[Frames],
        strip_usage: bool,
    ) -> None:
        self._run = run
        self._attempt = attempt
        self._next: Frames | None = first
        self._rest = rest
        self._strip_usage = strip_usage
        self._usage: Usage | None = None
        self._closed = first is None

    def __aiter__(self) -> TrackedStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            frames = await self.next_frames()
            events = frames.events
            if frames.usage_event and not self._strip_usage:
                events += frames.usage_event
            if frames.last:
                events += SSE_DONE
            if events:
                return events

    async def next_frames(self) -> Frames:
        """The next upstream read with its usage event apart, for a reader that decides
        per subscriber whether to show it (the multiplexer); settles like iteration.

        It reads the upstream itself rather than through a helper coroutine: both the
        client's iteration and the multiplexer's leader come here once per read.
        """
        frames = self._next
        if frames is not None:
            self._next = None
        elif self._closed:
            self._finish()
            raise StopAsyncIteration
        else:
            try:
                frames = await anext(self._rest)
            except StopAsyncIteration:
                self._closed = True
                self._finish()
                raise
            except LLMKitError as exc:
                self._closed = True
                self._attempt.failed(exc, partial=True)
                self._run.close(self._usage, keep_estimate=True)
                raise
        if frames.usage is not None:
            self._usage = frames.usage
        return frames

    async def aclose(self) -> None:
        """Stop early (client gone, or done): release the upstream and settle."""
        aclose = getattr(self._rest, "aclose", None)
        if aclose is not None:
            await aclose()
        if not self._closed:
            self._closed = True
            self._attempt.abandoned()
        self._run.close(self._usage, keep_estimate=True)

    def _finish(self) -> None:
        """The stream ended normally."""
        self._attempt.succeeded(self._usage)
        self._run.close(self._usage)


OpenedStream = Callable[[Run, Attempt, Frames | None, AsyncIterator[Frames], bool], TrackedStream]
"""What makes a stream once its first read is in: ``TrackedStream``, or a subclass's."""

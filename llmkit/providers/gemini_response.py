"""Gemini answers as OpenAI completions and chunks.

- candidates become choices (by ``index``); their text parts are joined, thought parts
  (reasoning summaries) left out; ``functionCall`` parts become tool calls with ids
  ``call_<n>``, counted from 0 across one response or one stream;
- finish reasons: STOP is ``stop`` (``tool_calls`` when the candidate called
  functions), MAX_TOKENS ``length``, the safety family ``content_filter``, anything
  else ``stop``;
- a prompt Gemini blocks (``promptFeedback.blockReason``, no candidates) is answered as
  one choice with empty content and finish reason ``content_filter``, as OpenAI
  answers a filtered prompt, rather than as an error;
- usage: thoughts count as completion tokens (and as ``reasoning_tokens``),
  ``cachedContentTokenCount`` becomes ``prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import BadUpstreamResponseError
from llmkit.providers.gemini_types import Candidate, GenerateContentResponse, Part, UsageMetadata
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
    Usage,
    encoder,
)

CONTENT_FILTER_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)


def finish_reason_of(reason: str | None, called_functions: bool) -> str:
    """Gemini's ``finishReason`` in OpenAI's vocabulary."""
    if reason == "MAX_TOKENS":
        return "length"
    if reason in CONTENT_FILTER_REASONS:
        return "content_filter"
    return "tool_calls" if called_functions else "stop"


def usage_of(meta: UsageMetadata) -> Usage:
    """``usageMetadata`` as OpenAI usage."""
    completion = meta.candidates_token_count + meta.thoughts_token_count
    total = meta.total_token_count or meta.prompt_token_count + completion
    usage = Usage(
        prompt_tokens=meta.prompt_token_count, completion_tokens=completion, total_tokens=total
    )
    if meta.cached_content_token_count:
        usage.prompt_tokens_details = {"cached_tokens": meta.cached_content_token_count}
    if meta.thoughts_token_count:
        usage.completion_tokens_details = {"reasoning_tokens": meta.thoughts_token_count}
    return usage


def _parts(candidate: Candidate) -> list[Part]:
    return candidate.content.parts if candidate.content is not None else []


def _text(parts: list[Part]) -> str:
    return "".join(p.text for p in parts if p.text is not None and not p.thought)


class _CallIds:
    """``call_0``, ``call_1`` ... in the order the calls arrive."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"call_{self.count - 1}"


def _tool_call(part: Part, ids: _CallIds) -> ToolCall | None:
    if part.function_call is None:
        return None
    call = part.function_call
    arguments = encoder.encode(call.args).decode()
    return ToolCall(id=ids.next(), function=FunctionCall(name=call.name, arguments=arguments))


def _tool_calls(parts: list[Part], ids: _CallIds) -> list[ToolCall]:
    calls = (_tool_call(part, ids) for part in parts)
    return [call for call in calls if call is not None]


# -- whole responses ----------------------------------------------------------------------


def completion_of(
    response: GenerateContentResponse, completion_id: str, created: int, model: str
) -> ChatCompletion:
    """A ``generateContent`` answer as a chat completion."""
    if response.candidates:
        ids = _CallIds()
        ordered = sorted(response.candidates, key=lambda c: c.index)
        choices = [_choice(candidate, ids) for candidate in ordered]
    elif response.prompt_feedback is not None and response.prompt_feedback.block_reason:
        choices = [_blocked_choice()]
    else:
        raise BadUpstreamResponseError(f"{model}: Gemini answered without candidates")
    usage = usage_of(response.usage_metadata) if response.usage_metadata else None
    return ChatCompletion(
        id=completion_id, created=created, model=model, choices=choices, usage=usage
    )


def _choice(candidate: Candidate, ids: _CallIds) -> Choice:
    parts = _parts(candidate)
    calls = _tool_calls(parts, ids)
    text = _text(parts)
    message = ResponseMessage(content=text or (None if calls else ""))
    if calls:
        message.tool_calls = calls
    finish = finish_reason_of(candidate.finish_reason, bool(calls))
    return Choice(index=candidate.index, message=message, finish_reason=finish)


def _blocked_choice() -> Choice:
    return Choice(index=0, message=ResponseMessage(content=""), finish_reason="content_filter")


# -- streams ------------------------------------------------------------------------------


@dataclass(slots=True)
class _ChoiceState:
    tool_calls: int = 0
    finished: bool = False


class StreamTranslator:
    """Turns the events of one ``streamGenerateContent`` into OpenAI chunks.

    Each event is a whole response holding only the new parts, so text parts become
    content deltas and each ``functionCall`` part one complete tool-call delta (Gemini
    does not split arguments). A choice's first chunk is the role delta; the chunk with
    its finish reason follows its last delta; ``finish()`` adds the usage chunk.
    """

    def __init__(self, completion_id: str, created: int, model: str, wants_usage: bool) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.wants_usage = wants_usage
        self.choices: dict[int, _ChoiceState] = {}
        self.ids = _CallIds()
        self.usage: Usage | None = None

    def translate(self, event: GenerateContentResponse) -> list[ChatCompletionChunk]:
        """The chunks one upstream event adds."""
        if event.usage_metadata is not None:
            self.usage = usage_of(event.usage_metadata)
        chunks: list[ChatCompletionChunk] = []
        for candidate in sorted(event.candidates, key=lambda c: c.index):
            chunks.extend(self._candidate_chunks(candidate))
        feedback = event.prompt_feedback
        if not event.candidates and feedback is not None and feedback.block_reason:
            state = self._state(0, chunks)
            if not state.finished:
                state.finished = True
                chunks.append(self._chunk(0, Delta(), "content_filter"))
        return chunks

    def finish(self) -> list[ChatCompletionChunk]:
        """The usage chunk, if asked for; raises if the stream ended unfinished."""
        if not self.choices or not all(state.finished for state in self.choices.values()):
            raise BadUpstreamResponseError(f"{self.model}: Gemini ended the stream unfinished")
        if not self.wants_usage:
            return []
        usage = self.usage or Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        return [
            ChatCompletionChunk(
                id=self.completion_id, created=self.created, model=self.model,
                choices=[], usage=usage,
            )
        ]  # fmt: skip

    def _candidate_chunks(self, candidate: Candidate) -> list[ChatCompletionChunk]:
        chunks: list[ChatCompletionChunk] = []
        index = candidate.index
        state = self._state(index, chunks)
        if state.finished:
            return chunks  # nothing may follow a choice's finish chunk
        parts = _parts(candidate)
        text = _text(parts)
        if text:
            chunks.append(self._chunk(index, Delta(content=text)))
        calls = _tool_calls(parts, self.ids)
        if calls:
            deltas = [self._call_delta(state.tool_calls + n, call) for n, call in enumerate(calls)]
            state.tool_calls += len(calls)
            chunks.append(self._chunk(index, Delta(tool_calls=deltas)))
        if candidate.finish_reason:
            state.finished = True
            reason = finish_reason_of(candidate.finish_reason, state.tool_calls > 0)
            chunks.append(self._chunk(index, Delta(), reason))
        return chunks

    def _state(self, index: int, chunks: list[ChatCompletionChunk]) -> _ChoiceState:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = _ChoiceState()
            chunks.append(self._chunk(index, Delta(role="assistant", content="")))
        return state

    @staticmethod
    def _call_delta(index: int, call: ToolCall) -> ToolCallDelta:
        function = FunctionCallDelta(name=call.function.name, arguments=call.function.arguments)
        return ToolCallDelta(index=index, id=call.id, type="function", function=function)

    def _chunk(self, index: int, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish)
        return ChatCompletionChunk(
            id=self.completion_id, created=self.created, model=self.model, choices=[choice]
        )

"""OpenAI-compatible wire types as msgspec Structs, with codecs built once.

Requests are decoded strictly where a wrong type would change the meaning (``messages``,
``stream``, numeric sampling parameters) and loosely where providers extend the shape
(content parts, tools, ``response_format``), which stay plain JSON values.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

JSON = Any
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class Message(Struct, kw_only=True, omit_defaults=True):
    """One chat message; ``content`` is a string or a list of typed parts."""

    role: Role
    content: str | list[dict[str, JSON]] | None = None
    name: str | UnsetType = UNSET
    tool_calls: list[dict[str, JSON]] | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET


class StreamOptions(Struct, kw_only=True, omit_defaults=True):
    include_usage: bool = False


class ChatRequest(Struct, kw_only=True, omit_defaults=True):
    """``POST /v1/chat/completions`` body (fields a gateway must understand)."""

    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[Message], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    seed: int | None = None
    user: str | None = None
    tools: list[dict[str, JSON]] | None = None
    tool_choice: str | dict[str, JSON] | None = None
    response_format: dict[str, JSON] | None = None

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` if given, else ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def wants_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, JSON]] | UnsetType = UNSET
    refusal: str | None = None


class Choice(Struct, kw_only=True):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class Delta(Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | None | UnsetType = UNSET
    tool_calls: list[dict[str, JSON]] | UnsetType = UNSET
    refusal: str | None | UnsetType = UNSET


class ChunkChoice(Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None


class Model(Struct, kw_only=True):
    id: str
    created: int
    owned_by: str
    object: Literal["model"] = "model"


class ModelList(Struct, kw_only=True):
    data: list[Model]
    object: Literal["list"] = "list"


chat_request_decoder = msgspec.json.Decoder(ChatRequest)
encoder = msgspec.json.Encoder()

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


class FunctionCall(Struct, kw_only=True):
    """A function the model called; ``arguments`` is JSON text, as OpenAI sends it."""

    name: str
    arguments: str


class ToolCall(Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class FunctionCallDelta(Struct, kw_only=True, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    """A piece of a streamed tool call: the first carries id and name, later ones
    append to ``function.arguments`` of the call at the same ``index``."""

    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: FunctionCallDelta | UnsetType = UNSET


class Message(Struct, kw_only=True, omit_defaults=True):
    """One chat message.

    ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``,
    ``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`` and the
    other part types OpenAI defines, kept as plain JSON.
    """

    role: Role
    content: str | list[dict[str, JSON]] | None = None
    name: str | UnsetType = UNSET
    tool_calls: list[ToolCall] | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET

    def text(self) -> str:
        """The text parts of ``content`` joined; images and audio are left out."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


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


class Usage(Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, JSON] | None = None
    completion_tokens_details: dict[str, JSON] | None = None


class ResponseMessage(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET
    refusal: str | None = None


class Choice(Struct, kw_only=True):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: JSON = None


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
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET
    refusal: str | None | UnsetType = UNSET


class ChunkChoice(Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: JSON = None


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


class EmbeddingRequest(Struct, kw_only=True, omit_defaults=True):
    """``POST /v1/embeddings`` body."""

    model: Annotated[str, Meta(min_length=1)]
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None

    def texts(self) -> list[str]:
        """The inputs as strings; token-id inputs are only for OpenAI-compatible upstreams."""
        if isinstance(self.input, str):
            return [self.input]
        texts = [item for item in self.input if isinstance(item, str)]
        if len(texts) != len(self.input):
            raise TypeError("token-id input")
        return texts


class Embedding(Struct, kw_only=True):
    index: int
    embedding: list[float] | str
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Struct, kw_only=True):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"


chat_request_decoder = msgspec.json.Decoder(ChatRequest)
completion_decoder = msgspec.json.Decoder(ChatCompletion)
chunk_decoder = msgspec.json.Decoder(ChatCompletionChunk)
embedding_response_decoder = msgspec.json.Decoder(EmbeddingResponse)
embedding_request_decoder = msgspec.json.Decoder(EmbeddingRequest)
json_decoder = msgspec.json.Decoder()
encoder = msgspec.json.Encoder()


def decode_events(events: bytes) -> list[ChatCompletionChunk]:
    """The chunks in whole SSE events (``data: <json>\\n\\n``...), as a gateway stream sends."""
    return [
        chunk_decoder.decode(event[6:])
        for event in events.split(b"\n\n")
        if event.strip() and event != b"data: [DONE]"
    ]

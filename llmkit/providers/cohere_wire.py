"""Cohere v2's wire shapes as msgspec Structs, with their decoders built once.

Outbound: ``POST /v2/chat`` and ``POST /v2/embed`` bodies. Inbound: the chat response,
the one Struct every chat-stream event decodes into, and the embed response. Inbound
Structs keep only what the gateway translates and accept ``null`` wherever Cohere may
send it; unknown fields are ignored, so new upstream fields never break a decode.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

from llmkit.types import ToolCall

# -- outbound: POST /v2/chat ---------------------------------------------------------


class ImageURL(Struct, kw_only=True, omit_defaults=True):
    url: str  # a data: URI or an http(s) URL; Cohere takes both as they are
    detail: Literal["auto", "low", "high"] | UnsetType = UNSET


class TextPart(Struct, tag="text", tag_field="type"):
    text: str


class ImagePart(Struct, tag="image_url", tag_field="type"):
    image_url: ImageURL


class ChatMessage(Struct, kw_only=True, omit_defaults=True):
    """One v2 message: system / user / assistant / tool (fields by role, as Cohere's)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | UnsetType = UNSET
    tool_calls: list[ToolCall] | UnsetType = UNSET  # same shape as OpenAI's
    tool_plan: str | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET


class ToolFunction(Struct, kw_only=True, omit_defaults=True):
    name: str
    parameters: dict[str, Any]
    description: str | UnsetType = UNSET


class Tool(Struct, kw_only=True):
    function: ToolFunction
    type: Literal["function"] = "function"


class ResponseFormat(Struct, kw_only=True):
    """Cohere's JSON mode; a schema, if any, rides inside ``json_object``."""

    type: Literal["json_object"] = "json_object"
    json_schema: dict[str, Any] | UnsetType = UNSET


class ChatBody(Struct, kw_only=True, omit_defaults=True):
    """The ``/v2/chat`` request; the last group passes through from the client's extras."""

    model: str
    messages: list[ChatMessage]
    stream: bool = False
    tools: list[Tool] | UnsetType = UNSET
    strict_tools: bool | UnsetType = UNSET
    tool_choice: Literal["REQUIRED", "NONE"] | UnsetType = UNSET
    response_format: ResponseFormat | UnsetType = UNSET
    stop_sequences: list[str] | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    p: float | UnsetType = UNSET
    max_tokens: int | UnsetType = UNSET
    seed: int | UnsetType = UNSET
    k: Any = UNSET
    frequency_penalty: Any = UNSET
    presence_penalty: Any = UNSET
    safety_mode: Any = UNSET
    priority: Any = UNSET


# Client fields Cohere understands under the same name and meaning; sent untouched.
PASSTHROUGH_FIELDS = ("k", "frequency_penalty", "presence_penalty", "safety_mode", "priority")


# -- inbound: the chat response ------------------------------------------------------


class Tokens(Struct, kw_only=True):
    """``usage.tokens`` or ``usage.billed_units`` (the SDK types them as floats)."""

    input_tokens: float | None = None
    output_tokens: float | None = None


class Usage(Struct, kw_only=True):
    tokens: Tokens | None = None
    billed_units: Tokens | None = None
    cached_tokens: float | None = None


class ContentBlock(Struct, kw_only=True):
    type: str = "text"  # "text" or "thinking"; only text reaches the client
    text: str | None = None


class FunctionCall(Struct, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class ResponseToolCall(Struct, kw_only=True):
    id: str | None = None
    function: FunctionCall | None = None


class ResponseMessage(Struct, kw_only=True):
    content: list[ContentBlock] | None = None
    tool_calls: list[ResponseToolCall] | None = None
    tool_plan: str | None = None


class ChatResponse(Struct, kw_only=True):
    id: str
    finish_reason: str
    message: ResponseMessage
    usage: Usage | None = None


# -- inbound: chat-stream events -----------------------------------------------------


class StreamContent(Struct, kw_only=True):
    text: str | None = None  # thinking deltas carry ``thinking`` instead and are dropped


class StreamMessage(Struct, kw_only=True):
    """``delta.message``: an object on content and tool-call events, lists on message-start."""

    content: StreamContent | list[Any] | None = None
    tool_calls: ResponseToolCall | list[Any] | None = None
    tool_plan: str | None = None


class StreamDelta(Struct, kw_only=True):
    message: StreamMessage | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


class StreamEvent(Struct, kw_only=True):
    """Any v2 chat-stream event, told apart by ``type`` (the SSE ``event:`` name repeats it).

    ``message`` is set only on an error object sent in place of an event.
    """

    type: str = ""
    id: str | None = None
    index: int = 0
    delta: StreamDelta | None = None
    message: str | None = None


# -- POST /v2/embed ------------------------------------------------------------------


class EmbedBody(Struct, kw_only=True, omit_defaults=True):
    model: str
    texts: list[str]
    input_type: str
    embedding_types: list[str]
    output_dimension: int | UnsetType = UNSET


class Embeddings(Struct, kw_only=True):
    float_: list[list[float]] | None = msgspec.field(default=None, name="float")


class EmbedMeta(Struct, kw_only=True):
    billed_units: Tokens | None = None
    tokens: Tokens | None = None


class EmbedResponse(Struct, kw_only=True):
    embeddings: Embeddings
    meta: EmbedMeta | None = None


chat_response_decoder = msgspec.json.Decoder(ChatResponse)
stream_event_decoder = msgspec.json.Decoder(StreamEvent)
embed_response_decoder = msgspec.json.Decoder(EmbedResponse)

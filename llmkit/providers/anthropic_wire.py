"""Anthropic Messages API shapes as msgspec Structs, with codecs built once.

Outbound blocks are tagged unions on ``type`` so the encoder writes exactly the JSON
Anthropic documents. Inbound shapes are decoded leniently: content blocks and deltas
are one Struct with optional fields, because Anthropic adds block types (thinking,
server tools, citations ...) that a chat-completions client has no place for and
that must not make a valid answer undecodable.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

# -- request ------------------------------------------------------------------------


class Base64Source(Struct, tag="base64", tag_field="type", kw_only=True):
    media_type: str
    data: str


class UrlSource(Struct, tag="url", tag_field="type", kw_only=True):
    url: str


class TextBlock(Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ImageBlock(Struct, tag="image", tag_field="type", kw_only=True):
    source: Base64Source | UrlSource


class DocumentBlock(Struct, tag="document", tag_field="type", kw_only=True):
    source: Base64Source | UrlSource


class ToolUseBlock(Struct, tag="tool_use", tag_field="type", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Struct, tag="tool_result", tag_field="type", kw_only=True):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock]


Block = TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock


class AnthropicMessage(Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: list[Block]


class ToolSpec(Struct, kw_only=True, omit_defaults=True):
    name: str
    input_schema: dict[str, Any]
    description: str | UnsetType = UNSET


class ToolChoice(Struct, kw_only=True, omit_defaults=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | UnsetType = UNSET
    disable_parallel_tool_use: bool | UnsetType = UNSET


class Metadata(Struct, kw_only=True):
    user_id: str


class MessagesRequest(Struct, kw_only=True, omit_defaults=True):
    """``POST /v1/messages`` body."""

    model: str
    max_tokens: int
    messages: list[AnthropicMessage]
    system: list[TextBlock] | UnsetType = UNSET
    stop_sequences: list[str] | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    tools: list[ToolSpec] | UnsetType = UNSET
    tool_choice: ToolChoice | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET
    stream: bool = False


# -- response and stream events ------------------------------------------------------


class ResponseBlock(Struct, kw_only=True):
    """Any content block: ``text`` has ``text``; ``tool_use`` has ``id``, ``name``, ``input``."""

    type: str
    text: str = ""
    id: str = ""
    name: str = ""
    input: Any = None


class AnthropicUsage(Struct, kw_only=True):
    """Token counts; in ``message_delta`` every field but ``output_tokens`` is optional
    and, when present, cumulative for the whole message."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageResponse(Struct, kw_only=True):
    id: str
    content: list[ResponseBlock]
    usage: AnthropicUsage
    model: str = ""
    stop_reason: str | None = None
    stop_sequence: str | None = None


class MessageStartEvent(Struct, kw_only=True):
    message: MessageResponse


class ContentBlockStartEvent(Struct, kw_only=True):
    index: int
    content_block: ResponseBlock


class BlockDelta(Struct, kw_only=True):
    """``text_delta`` carries ``text``; ``input_json_delta`` carries ``partial_json``."""

    type: str
    text: str = ""
    partial_json: str = ""


class ContentBlockDeltaEvent(Struct, kw_only=True):
    index: int
    delta: BlockDelta


class ContentBlockStopEvent(Struct, kw_only=True):
    index: int


class MessageDeltaBody(Struct, kw_only=True):
    stop_reason: str | None = None
    stop_sequence: str | None = None


class MessageDeltaEvent(Struct, kw_only=True):
    delta: MessageDeltaBody
    usage: AnthropicUsage | None = None


class ErrorObject(Struct, kw_only=True):
    type: str = "api_error"
    message: str = ""


class ErrorEvent(Struct, kw_only=True):
    """``{"type": "error", "error": {"type": ..., "message": ...}}``: body and event alike."""

    error: ErrorObject


message_response_decoder = msgspec.json.Decoder(MessageResponse)
message_start_decoder = msgspec.json.Decoder(MessageStartEvent)
block_start_decoder = msgspec.json.Decoder(ContentBlockStartEvent)
block_delta_decoder = msgspec.json.Decoder(ContentBlockDeltaEvent)
block_stop_decoder = msgspec.json.Decoder(ContentBlockStopEvent)
message_delta_decoder = msgspec.json.Decoder(MessageDeltaEvent)
error_event_decoder = msgspec.json.Decoder(ErrorEvent)

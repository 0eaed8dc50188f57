"""Gemini's wire shapes (Generative Language API, v1beta) as msgspec Structs.

Python fields are snake_case and go on the wire as camelCase (``rename="camel"``), the
JSON mapping of Google's protos. Responses ignore fields they do not name, so a new
upstream field never breaks decoding; requests omit every field left at its default.
Codecs are built once, at the bottom.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct, field

# -- content: shared by requests and responses ------------------------------------------


class Blob(Struct, rename="camel", kw_only=True):
    """``inlineData``: base64 bytes and their mime type."""

    mime_type: str
    data: str


class FileData(Struct, rename="camel", kw_only=True):
    """``fileData``: a file the upstream fetches itself."""

    mime_type: str
    file_uri: str


class FunctionCall(Struct, kw_only=True, omit_defaults=True):
    name: str
    args: dict[str, Any] = field(default_factory=dict)


class FunctionResponse(Struct, kw_only=True):
    name: str
    response: dict[str, Any]


class Part(Struct, rename="camel", kw_only=True, omit_defaults=True):
    """One part of a turn; exactly one of the payload fields is set."""

    text: str | None = None
    thought: bool = False
    inline_data: Blob | None = None
    file_data: FileData | None = None
    function_call: FunctionCall | None = None
    function_response: FunctionResponse | None = None


class Content(Struct, kw_only=True, omit_defaults=True):
    """A turn: ``role`` is ``user`` or ``model`` (none for ``systemInstruction``)."""

    parts: list[Part] = field(default_factory=list)
    role: str | None = None


# -- generateContent / streamGenerateContent requests -----------------------------------


class FunctionDeclaration(Struct, rename="camel", kw_only=True, omit_defaults=True):
    """A tool; parameters travel as JSON Schema (``parametersJsonSchema``)."""

    name: str
    description: str | None = None
    parameters_json_schema: dict[str, Any] | None = None


class Tool(Struct, rename="camel", kw_only=True):
    function_declarations: list[FunctionDeclaration]


class FunctionCallingConfig(Struct, rename="camel", kw_only=True, omit_defaults=True):
    mode: str  # AUTO | ANY | NONE
    allowed_function_names: list[str] | None = None


class ToolConfig(Struct, rename="camel", kw_only=True):
    function_calling_config: FunctionCallingConfig


class GenerationConfig(Struct, rename="camel", kw_only=True, omit_defaults=True):
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    stop_sequences: list[str] | None = None
    candidate_count: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_mime_type: str | None = None
    response_json_schema: Any = None


class GenerateContentRequest(Struct, rename="camel", kw_only=True, omit_defaults=True):
    contents: list[Content]
    system_instruction: Content | None = None
    generation_config: GenerationConfig | None = None
    tools: list[Tool] | None = None
    tool_config: ToolConfig | None = None


# -- responses ----------------------------------------------------------------------------


class Candidate(Struct, rename="camel", kw_only=True):
    content: Content | None = None
    finish_reason: str | None = None
    index: int = 0


class UsageMetadata(Struct, rename="camel", kw_only=True):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int = 0
    total_token_count: int = 0
    cached_content_token_count: int = 0


class PromptFeedback(Struct, rename="camel", kw_only=True):
    block_reason: str | None = None
    block_reason_message: str | None = None


class ErrorDetail(Struct, rename="camel", kw_only=True):
    """One of ``error.details``: ``ErrorInfo`` carries ``reason``, ``RetryInfo`` a delay."""

    type: str = field(name="@type", default="")
    reason: str = ""
    retry_delay: str = ""


class GoogleError(Struct, kw_only=True):
    """Google's error object: HTTP ``code``, gRPC ``status`` name, ``message``."""

    code: int = 0
    message: str = ""
    status: str = ""
    details: list[ErrorDetail] = field(default_factory=list)


class ErrorEnvelope(Struct, kw_only=True):
    error: GoogleError


class GenerateContentResponse(Struct, rename="camel", kw_only=True):
    """One answer, or one SSE event of a stream (each event is a whole response)."""

    candidates: list[Candidate] = field(default_factory=list)
    prompt_feedback: PromptFeedback | None = None
    usage_metadata: UsageMetadata | None = None
    model_version: str | None = None
    # Only in a stream: an error that happened after the 200 was sent.
    error: GoogleError | None = None


# -- batchEmbedContents -------------------------------------------------------------------


class EmbedContentRequest(Struct, rename="camel", kw_only=True, omit_defaults=True):
    model: str  # "models/{model}"
    content: Content
    output_dimensionality: int | None = None


class BatchEmbedContentsRequest(Struct, kw_only=True):
    requests: list[EmbedContentRequest]


class ContentEmbedding(Struct, kw_only=True):
    values: list[float]


class EmbeddingUsageMetadata(Struct, rename="camel", kw_only=True):
    prompt_token_count: int = 0


class BatchEmbedContentsResponse(Struct, rename="camel", kw_only=True):
    embeddings: list[ContentEmbedding]
    usage_metadata: EmbeddingUsageMetadata | None = None


response_decoder = msgspec.json.Decoder(GenerateContentResponse)
embeddings_decoder = msgspec.json.Decoder(BatchEmbedContentsResponse)
error_decoder = msgspec.json.Decoder(ErrorEnvelope | list[ErrorEnvelope])

"""OpenAI chat requests as Bedrock Converse request bodies.

What Converse cannot say the way OpenAI does is decided here, once:

* ``system`` and ``developer`` messages, wherever they stand, go to the one ``system``
  list: Converse has no system turn inside ``messages``.
* Turns must alternate user / assistant, so consecutive turns of one role are merged.
  OpenAI ``tool`` messages become ``toolResult`` blocks of a user turn (consecutive
  results share one turn), sent as ``[{"text": ...}]``: OpenAI's tool content is text,
  and text keeps it byte for byte.
* Images travel as bytes: ``data:`` URLs (png, jpeg, gif, webp; base64) go inline;
  ``http(s)`` URLs are refused (400) rather than fetched by the gateway.
* ``tool_choice``: "auto" (or none given) leaves ``toolChoice`` out, which is Converse's
  default and the form every tool-capable model accepts; "required" is ``{"any": {}}``;
  a named function is ``{"tool": {"name": ...}}``. "none" has no Converse counterpart,
  so ``toolConfig`` is left out and no tool can be called; but Converse refuses
  ``toolUse`` / ``toolResult`` blocks without a ``toolConfig``, so "none" with tool calls
  in the history is a 400 (as is such a history with no ``tools`` at all).
* ``response_format`` json_schema / json_object: Converse has no JSON mode that every
  model honours, so the schema (any object, for json_object) becomes a tool the model
  is forced to call; ``bedrock_response`` turns that call back into the message content
  with finish_reason "stop". It cannot be combined with the caller's own tools (400).
* ``n`` > 1 is refused, and so is ``temperature`` above 1 (Converse's range is 0..1).
  ``seed`` is not sent: Converse has no field for it, and OpenAI documents it as best
  effort. ``user`` goes to ``requestMetadata`` (metadata for Bedrock's invocation logs)
  when it fits Bedrock's pattern for those values. Unknown top-level fields are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

from llmkit.errors import InvalidRequestError
from llmkit.types import ChatRequest, Message, ToolCall, encoder, json_decoder

JSON_OBJECT_TOOL = "json_response"
MAX_TEMPERATURE = 1.0
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_METADATA_VALUE = re.compile(r"[a-zA-Z0-9\s:_@$#=/+,\-.]{0,256}")


# -- Converse request shapes (field names camelCased on the wire) --------------------


class ImageSource(Struct, gc=False):
    bytes: str  # base64, which is how a JSON body carries a blob


class ImageBlock(Struct, gc=False):
    format: str
    source: ImageSource


class ToolUseBlock(Struct, rename="camel", gc=False):
    tool_use_id: str
    name: str
    input: dict[str, Any]


class ToolResultText(Struct, gc=False):
    text: str


class ToolResultBlock(Struct, rename="camel", gc=False):
    tool_use_id: str
    content: list[ToolResultText]


class ContentBlock(Struct, rename="camel", omit_defaults=True, gc=False):
    """Exactly one field is set, as Converse's union requires."""

    text: str | UnsetType = UNSET
    image: ImageBlock | UnsetType = UNSET
    tool_use: ToolUseBlock | UnsetType = UNSET
    tool_result: ToolResultBlock | UnsetType = UNSET


class Turn(Struct, gc=False):
    role: Literal["user", "assistant"]
    content: list[ContentBlock]


class SystemBlock(Struct, gc=False):
    text: str


class InferenceConfig(Struct, rename="camel", omit_defaults=True, gc=False):
    max_tokens: int | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    stop_sequences: list[str] | UnsetType = UNSET


class ToolInputSchema(Struct, gc=False):
    json: dict[str, Any]


class ToolSpec(Struct, rename="camel", omit_defaults=True, gc=False):
    name: str
    input_schema: ToolInputSchema
    description: str | UnsetType = UNSET
    strict: bool | UnsetType = UNSET


class Tool(Struct, rename="camel", gc=False):
    tool_spec: ToolSpec


class ToolConfig(Struct, rename="camel", omit_defaults=True, gc=False):
    tools: list[Tool]
    tool_choice: dict[str, Any] | UnsetType = UNSET


class ConverseRequest(Struct, rename="camel", omit_defaults=True, gc=False):
    messages: list[Turn]
    system: list[SystemBlock] | UnsetType = UNSET
    inference_config: InferenceConfig | UnsetType = UNSET
    tool_config: ToolConfig | UnsetType = UNSET
    request_metadata: dict[str, str] | UnsetType = UNSET


@dataclass(frozen=True, slots=True)
class ConverseBody:
    """The encoded body, and the tool that carries a JSON answer (None without one)."""

    body: bytes
    json_tool: str | None


def converse_body(request: ChatRequest) -> ConverseBody:
    """Translate ``request``; anything Converse cannot express raises InvalidRequestError."""
    _check_expressible(request)
    system, turns = conversation(request.messages)
    json_tool, tool_config = _tool_config(request, _has_tool_blocks(turns))
    payload = ConverseRequest(
        messages=turns,
        system=system or UNSET,
        inference_config=_inference_config(request),
        tool_config=tool_config,
        request_metadata=_request_metadata(request.user),
    )
    return ConverseBody(encoder.encode(payload), json_tool)


def _check_expressible(request: ChatRequest) -> None:
    if request.n is not None and request.n > 1:
        raise InvalidRequestError(
            "Bedrock Converse returns one choice; n > 1 is not supported", param="n"
        )
    if request.temperature is not None and request.temperature > MAX_TEMPERATURE:
        raise InvalidRequestError(
            f"Bedrock Converse takes temperature from 0 to {MAX_TEMPERATURE:g}",
            param="temperature",
        )


# -- messages -------------------------------------------------------------------------


def conversation(messages: list[Message]) -> tuple[list[SystemBlock], list[Turn]]:
    """The system blocks, and the turns with consecutive same-role turns merged."""
    system: list[SystemBlock] = []
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            system.extend(SystemBlock(text) for text in _texts(message, index) if text)
            continue
        role, blocks = _turn(message, index)
        if not blocks:
            continue
        if turns and turns[-1].role == role:
            turns[-1].content.extend(blocks)
        else:
            turns.append(Turn(role, blocks))
    return system, turns


def _turn(message: Message, index: int) -> tuple[Literal["user", "assistant"], list[ContentBlock]]:
    if message.role == "user":
        return "user", _user_blocks(message, index)
    if message.role == "assistant":
        return "assistant", _assistant_blocks(message, index)
    if message.role == "tool":
        return "user", [_tool_result(message, index)]
    raise InvalidRequestError(
        f"messages[{index}]: role '{message.role}' is not supported; use 'tool' messages",
        param="messages",
    )


def _user_blocks(message: Message, index: int) -> list[ContentBlock]:
    if not isinstance(message.content, list):
        return [ContentBlock(text=message.content)] if message.content else []
    blocks: list[ContentBlock] = []
    for part in message.content:
        if part.get("type") == "image_url":
            blocks.append(ContentBlock(image=_image(part, index)))
        else:
            text = _part_text(part, index)
            if text:
                blocks.append(ContentBlock(text=text))
    return blocks


def _assistant_blocks(message: Message, index: int) -> list[ContentBlock]:
    blocks = [ContentBlock(text=text) for text in _texts(message, index) if text]
    for call in message.tool_calls or []:
        use = ToolUseBlock(call.id, call.function.name, _arguments(call, index))
        blocks.append(ContentBlock(tool_use=use))
    return blocks


def _tool_result(message: Message, index: int) -> ContentBlock:
    if not message.tool_call_id:
        raise InvalidRequestError(
            f"messages[{index}]: a tool message needs tool_call_id", param="messages"
        )
    text = "".join(_texts(message, index))
    return ContentBlock(tool_result=ToolResultBlock(message.tool_call_id, [ToolResultText(text)]))


def _texts(message: Message, index: int) -> list[str]:
    """The text of a message that may only hold text (system, assistant, tool)."""
    if not isinstance(message.content, list):
        return [message.content] if message.content else []
    return [_part_text(part, index) for part in message.content]


def _part_text(part: dict[str, Any], index: int) -> str:
    kind = part.get("type")
    text = part.get("refusal" if kind == "refusal" else "text")
    if kind not in ("text", "refusal") or not isinstance(text, str):
        raise InvalidRequestError(
            f"messages[{index}]: content part '{kind}' is not supported by Bedrock Converse",
            param="messages",
        )
    return text


def _image(part: dict[str, Any], index: int) -> ImageBlock:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url.startswith("data:"):
        raise InvalidRequestError(
            f"messages[{index}]: Bedrock needs the image's bytes; send it as a base64 data: "
            "URL, not a link",
            param="messages",
        )
    header, comma, data = url[5:].partition(",")
    mime, *parameters = header.split(";")
    image_format = _IMAGE_FORMATS.get(mime.lower())
    if not comma or parameters[-1:] != ["base64"] or image_format is None:
        raise InvalidRequestError(
            f"messages[{index}]: images must be base64 data: URLs of type png, jpeg, gif or "
            f"webp (got '{header[:40]}')",
            param="messages",
        )
    return ImageBlock(image_format, ImageSource(data))


def _arguments(call: ToolCall, index: int) -> dict[str, Any]:
    try:
        arguments = json_decoder.decode(call.function.arguments or "{}")
    except msgspec.DecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidRequestError(
            f"messages[{index}]: the arguments of tool call '{call.id}' are not a JSON object",
            param="messages",
        )
    return arguments


def _has_tool_blocks(turns: list[Turn]) -> bool:
    return any(
        block.tool_use is not UNSET or block.tool_result is not UNSET
        for turn in turns
        for block in turn.content
    )


# -- tools and JSON answers -----------------------------------------------------------


def _tool_config(
    request: ChatRequest, history_has_tools: bool
) -> tuple[str | None, ToolConfig | UnsetType]:
    json_tool = _json_answer_tool(request.response_format)
    if json_tool is not None:
        if request.tools:
            raise InvalidRequestError(
                "Bedrock Converse cannot combine tools with a JSON response_format: JSON "
                "answers are produced by forcing a tool call",
                param="response_format",
            )
        name = json_tool.tool_spec.name
        return name, ToolConfig([json_tool], {"tool": {"name": name}})
    if request.tools and request.tool_choice != "none":
        tools = [_tool(tool, index) for index, tool in enumerate(request.tools)]
        names = {tool.tool_spec.name for tool in tools}
        return None, ToolConfig(tools, _tool_choice(request.tool_choice, names))
    if history_has_tools:
        why = "tool_choice 'none'" if request.tools else "a request without tools"
        raise InvalidRequestError(
            f"Bedrock Converse cannot take {why} when the conversation holds tool calls or "
            "results: it needs the tools defined and has no way to forbid calling them",
            param="tool_choice" if request.tools else "tools",
        )
    return None, UNSET


def _tool(tool: dict[str, Any], index: int) -> Tool:
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        raise InvalidRequestError(
            f"tools[{index}]: only function tools are supported", param="tools"
        )
    name = function.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise InvalidRequestError(
            f"tools[{index}]: the name must match [a-zA-Z0-9_-]{{1,64}}", param="tools"
        )
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    strict = function.get("strict")
    spec = ToolSpec(
        name,
        ToolInputSchema(schema),
        description=function.get("description") or UNSET,
        strict=strict if isinstance(strict, bool) else UNSET,
    )
    return Tool(spec)


def _tool_choice(
    choice: str | dict[str, Any] | None, names: set[str]
) -> dict[str, Any] | UnsetType:
    if choice is None or choice == "auto":
        return UNSET
    if choice == "required":
        return {"any": {}}
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise InvalidRequestError(
                f"tool_choice names '{name}', which is not in tools", param="tool_choice"
            )
        return {"tool": {"name": name}}
    raise InvalidRequestError(f"tool_choice {choice!r} is not supported", param="tool_choice")


def _json_answer_tool(response_format: dict[str, Any] | None) -> Tool | None:
    """The forced tool that stands in for a JSON response_format, or None."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        schema: dict[str, Any] = {"type": "object"}
        return _answer_tool(JSON_OBJECT_TOOL, schema, "Answer with a JSON object.", None)
    spec = response_format.get("json_schema")
    if kind != "json_schema" or not isinstance(spec, dict):
        raise InvalidRequestError(
            f"response_format type '{kind}' is not supported", param="response_format"
        )
    name = spec.get("name") or JSON_OBJECT_TOOL
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise InvalidRequestError(
            "response_format.json_schema.name must match [a-zA-Z0-9_-]{1,64}",
            param="response_format",
        )
    description = spec.get("description") or "Answer with JSON that matches this schema."
    strict = spec.get("strict")
    return _answer_tool(name, spec.get("schema") or {"type": "object"}, description, strict)


def _answer_tool(name: str, schema: dict[str, Any], description: str, strict: object) -> Tool:
    flag = strict if isinstance(strict, bool) else UNSET
    return Tool(ToolSpec(name, ToolInputSchema(schema), description=description, strict=flag))


# -- sampling and metadata ------------------------------------------------------------


def _inference_config(request: ChatRequest) -> InferenceConfig | UnsetType:
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    config = InferenceConfig(
        max_tokens=request.token_limit() or UNSET,
        temperature=UNSET if request.temperature is None else request.temperature,
        top_p=UNSET if request.top_p is None else request.top_p,
        stop_sequences=stop or UNSET,
    )
    return UNSET if config == InferenceConfig() else config


def _request_metadata(user: str | None) -> dict[str, str] | UnsetType:
    # Metadata only labels invocation logs; a value Bedrock's pattern would refuse is left
    # out rather than failing a request whose answer it does not affect.
    if user and _METADATA_VALUE.fullmatch(user):
        return {"user": user}
    return UNSET

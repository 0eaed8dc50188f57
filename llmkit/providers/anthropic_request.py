"""OpenAI chat requests as Anthropic Messages requests.

Where the two wires differ, this module decides, and says so here:

- ``system`` and ``developer`` messages become the top-level ``system`` text blocks, in
  order, wherever they stood: Anthropic has no system turns.
- Anthropic wants user and assistant turns to alternate, so consecutive turns of one
  role (tool results are user turns) are merged into one message with several blocks.
- ``max_tokens`` is required by Anthropic: ``request.token_limit()`` or
  ``DEFAULT_MAX_TOKENS``.
- ``temperature`` above 1 is refused (400): Anthropic's range is 0-1, and clamping or
  rescaling would silently sample differently from what the client asked for. Otherwise
  ``temperature`` and ``top_p`` go as given: API version 2023-06-01 takes them; models
  or versions that refuse sampling parameters answer 400, which the client gets back.
- ``n > 1`` is refused (400): one Anthropic call gives one answer.
- ``seed`` is ignored: Anthropic has no seed, and sampling stays as non-deterministic as
  an OpenAI seed (best effort, never guaranteed) leaves it.
- ``response_format`` ``json_schema`` / ``json_object`` use the standard workaround: a
  tool named ``JSON_TOOL_NAME`` whose ``input_schema`` is the schema (a permissive object
  schema for ``json_object``) is forced; the adapter returns that tool's input as the
  message content, with finish reason ``stop``. When the client's own tools may be called
  (``tool_choice`` auto), the model must call one of them or the JSON tool (``any``).
  A named or ``required`` tool_choice makes the answer a tool call, so the format does
  not apply. ``strict`` is not sent: the schema guides the model but is not enforced.
- ``user`` becomes ``metadata.user_id``; ``parallel_tool_calls: false`` becomes
  ``disable_parallel_tool_use``. A message's ``name`` and an image's ``detail`` have no
  equivalent and are left out.
- OpenAI-only output controls (penalties, ``logit_bias``, ``logprobs``, audio output,
  predictions) given a non-default value are refused (400) rather than dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from msgspec import UNSET, UnsetType

from llmkit.errors import InvalidRequestError
from llmkit.providers.anthropic_wire import (
    AnthropicMessage,
    Base64Source,
    Block,
    DocumentBlock,
    ImageBlock,
    MessagesRequest,
    Metadata,
    TextBlock,
    ToolChoice,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    UrlSource,
)
from llmkit.providers.base import Call
from llmkit.types import ChatRequest, Message, json_decoder

T = TypeVar("T")

DEFAULT_MAX_TOKENS = 4096
MAX_TEMPERATURE = 1.0
JSON_TOOL_NAME = "json_response"
JSON_TOOL_DESCRIPTION = "Give the answer as a JSON value that matches the input schema."
PERMISSIVE_SCHEMA: dict[str, Any] = {"type": "object", "additionalProperties": True}
EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
DOCUMENT_MEDIA_TYPES = frozenset({"application/pdf"})
UNSUPPORTED_FIELDS = (
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
    "audio", "prediction",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Translation:
    """The Anthropic body, and whether the JSON tool's input is the answer's content."""

    body: MessagesRequest
    json_mode: bool


def translate_request(call: Call, model: str, stream: bool) -> Translation:
    """``call`` as a Messages request for ``model``; InvalidRequestError if it cannot be."""
    request = call.request
    check_supported(request, call.extras)
    system, messages = translate_messages(request.messages)
    tools, choice, json_mode = translate_tools(request, call.extras)
    body = MessagesRequest(
        model=model,
        max_tokens=request.token_limit() or DEFAULT_MAX_TOKENS,
        messages=messages,
        system=system or UNSET,
        stop_sequences=stop_sequences(request.stop) or UNSET,
        temperature=_given(request.temperature),
        top_p=_given(request.top_p),
        tools=tools or UNSET,
        tool_choice=_given(choice),
        metadata=Metadata(user_id=request.user) if request.user else UNSET,
        stream=stream,
    )
    return Translation(body, json_mode)


def check_supported(request: ChatRequest, extras: Mapping[str, Any]) -> None:
    """Refuse what Anthropic cannot do instead of quietly doing something else."""
    if (request.n or 1) > 1:
        raise InvalidRequestError(
            "Anthropic returns one choice per request: n must be 1", param="n"
        )
    if request.temperature is not None and request.temperature > MAX_TEMPERATURE:
        raise InvalidRequestError(
            f"Anthropic accepts temperature from 0 to {MAX_TEMPERATURE:g}, "
            f"got {request.temperature:g}",
            param="temperature",
        )
    for name in UNSUPPORTED_FIELDS:
        if extras.get(name):
            raise InvalidRequestError(f"Anthropic does not support '{name}'", param=name)


def stop_sequences(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# -- messages -------------------------------------------------------------------------


def translate_messages(messages: list[Message]) -> tuple[list[TextBlock], list[AnthropicMessage]]:
    """The system prompt, and the turns merged so that roles alternate."""
    system: list[TextBlock] = []
    turns: list[AnthropicMessage] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.role in ("system", "developer"):
            system.extend(_system_blocks(message, where))
            continue
        role, blocks = _turn(message, where)
        if not blocks:
            continue
        if turns and turns[-1].role == role:
            turns[-1].content.extend(blocks)
        else:
            turns.append(AnthropicMessage(role=role, content=blocks))
    if not turns:
        raise InvalidRequestError(
            "Anthropic needs at least one user or assistant message", param="messages"
        )
    return system, turns


def _turn(message: Message, where: str) -> tuple[Literal["user", "assistant"], list[Block]]:
    if message.role == "user":
        return "user", _user_blocks(message, where)
    if message.role == "assistant":
        return "assistant", _assistant_blocks(message, where)
    if message.role == "tool":
        return "user", [_tool_result(message, where)]
    raise InvalidRequestError(
        f"role '{message.role}' is not supported; send tool results as role 'tool'",
        param=f"{where}.role",
    )


def _system_blocks(message: Message, where: str) -> list[TextBlock]:
    for i, part in enumerate(_parts(message)):
        if part.get("type") != "text":
            raise InvalidRequestError(
                "Anthropic system prompts take text only", param=f"{where}.content[{i}]"
            )
    text = message.text()
    return [TextBlock(text=text)] if text else []


def _user_blocks(message: Message, where: str) -> list[Block]:
    if isinstance(message.content, str):
        return [TextBlock(text=message.content)] if message.content else []
    blocks: list[Block] = []
    for i, part in enumerate(_parts(message)):
        kind, param = part.get("type"), f"{where}.content[{i}]"
        if kind == "text":
            if part.get("text"):
                blocks.append(TextBlock(text=str(part["text"])))
        elif kind == "image_url":
            blocks.append(ImageBlock(source=image_source(part.get("image_url"), param)))
        elif kind == "file":
            blocks.append(DocumentBlock(source=_document_source(part.get("file"), param)))
        else:
            raise InvalidRequestError(f"Anthropic does not accept '{kind}' parts", param=param)
    return blocks


def _assistant_blocks(message: Message, where: str) -> list[Block]:
    blocks: list[Block] = []
    for i, part in enumerate(_parts(message)):
        if part.get("type") not in ("text", "refusal"):
            raise InvalidRequestError(
                f"assistant messages take text only, not '{part.get('type')}'",
                param=f"{where}.content[{i}]",
            )
    text = (
        message.content
        if isinstance(message.content, str)
        else "".join(str(p.get("text") or p.get("refusal") or "") for p in _parts(message))
    )
    if text:
        blocks.append(TextBlock(text=text))
    for i, tool_call in enumerate(message.tool_calls or []):
        arguments = _tool_input(tool_call.function.arguments, f"{where}.tool_calls[{i}]")
        blocks.append(ToolUseBlock(id=tool_call.id, name=tool_call.function.name, input=arguments))
    return blocks


def _tool_result(message: Message, where: str) -> ToolResultBlock:
    if not message.tool_call_id:
        raise InvalidRequestError("a tool message needs tool_call_id", param=where)
    if not isinstance(message.content, list):
        return ToolResultBlock(tool_use_id=message.tool_call_id, content=message.content or "")
    content: list[TextBlock | ImageBlock] = []
    for i, part in enumerate(message.content):
        kind, param = part.get("type"), f"{where}.content[{i}]"
        if kind == "text":
            content.append(TextBlock(text=str(part.get("text", ""))))
        elif kind == "image_url":
            content.append(ImageBlock(source=image_source(part.get("image_url"), param)))
        else:
            raise InvalidRequestError(
                f"tool results take text and images, not '{kind}'", param=param
            )
    return ToolResultBlock(tool_use_id=message.tool_call_id, content=content)


def _parts(message: Message) -> list[dict[str, Any]]:
    return message.content if isinstance(message.content, list) else []


def _tool_input(arguments: str, where: str) -> dict[str, Any]:
    """Tool-call arguments (JSON text) as the object Anthropic's ``input`` must be."""
    if not arguments.strip():
        return {}
    try:
        value = json_decoder.decode(arguments)
    except Exception:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequestError(
            "tool call arguments must be a JSON object", param=f"{where}.function.arguments"
        )
    return value


def image_source(image_url: Any, param: str) -> Base64Source | UrlSource:
    """A ``data:`` URL as inline base64, an http(s) URL as a URL source."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise InvalidRequestError("image_url needs a url", param=param)
    if url.startswith(("http://", "https://")):
        return UrlSource(url=url)
    if url.startswith("data:"):
        return _data_url(url, IMAGE_MEDIA_TYPES, param)
    raise InvalidRequestError("image URLs must be data: or http(s) URLs", param=param)


def _document_source(file: Any, param: str) -> Base64Source:
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str) or not data.startswith("data:"):
        raise InvalidRequestError(
            "Anthropic takes files as inline data: URLs (file_data), not file ids", param=param
        )
    return _data_url(data, DOCUMENT_MEDIA_TYPES, param)


def _data_url(url: str, media_types: frozenset[str], param: str) -> Base64Source:
    header, comma, data = url.removeprefix("data:").partition(",")
    media_type, *attributes = header.split(";")
    if not comma or "base64" not in attributes:
        raise InvalidRequestError("data: URLs must be base64-encoded", param=param)
    if media_type not in media_types:
        allowed = ", ".join(sorted(media_types))
        raise InvalidRequestError(
            f"Anthropic does not accept '{media_type}' here (accepts {allowed})", param=param
        )
    return Base64Source(media_type=media_type, data=data)


# -- tools and JSON output --------------------------------------------------------------


def translate_tools(
    request: ChatRequest, extras: Mapping[str, Any]
) -> tuple[list[ToolSpec], ToolChoice | None, bool]:
    """Tools, tool_choice and whether the JSON-output workaround is on."""
    tools = [_tool_spec(tool, i) for i, tool in enumerate(request.tools or [])]
    choice = _tool_choice(request.tool_choice)
    json_tool = _json_tool(request.response_format)
    json_mode = json_tool is not None and (choice is None or choice.type in ("auto", "none"))
    if json_tool is not None and json_mode:
        if any(tool.name == JSON_TOOL_NAME for tool in tools):
            raise InvalidRequestError(
                f"the tool name '{JSON_TOOL_NAME}' is reserved for response_format",
                param="tools",
            )
        may_call_own_tools = bool(tools) and (choice is None or choice.type == "auto")
        choice = ToolChoice(type="any") if may_call_own_tools else _forced(JSON_TOOL_NAME)
        tools.append(json_tool)
    if not tools:
        if choice is not None and choice.type in ("any", "tool"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return [], None, False
    if extras.get("parallel_tool_calls") is False:
        choice = _without_parallel_calls(choice)
    return tools, choice, json_mode


def _tool_spec(tool: dict[str, Any], index: int) -> ToolSpec:
    function = tool.get("function")
    if tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise InvalidRequestError(
            "Anthropic takes function tools only", param=f"tools[{index}].type"
        )
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("a tool needs a name", param=f"tools[{index}].function.name")
    description = function.get("description")
    return ToolSpec(
        name=name,
        input_schema=function.get("parameters") or EMPTY_SCHEMA,
        description=str(description) if description else UNSET,
    )


def _tool_choice(value: str | dict[str, Any] | None) -> ToolChoice | None:
    if value is None:
        return None
    if value in ("auto", "none"):
        return ToolChoice(type="auto" if value == "auto" else "none")
    if value == "required":
        return ToolChoice(type="any")
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return _forced(name)
    raise InvalidRequestError(
        "tool_choice must be auto, none, required or a named function", param="tool_choice"
    )


def _forced(name: str) -> ToolChoice:
    return ToolChoice(type="tool", name=name)


def _without_parallel_calls(choice: ToolChoice | None) -> ToolChoice | None:
    if choice is None:
        return ToolChoice(type="auto", disable_parallel_tool_use=True)
    if choice.type == "none":
        return choice
    return ToolChoice(type=choice.type, name=choice.name, disable_parallel_tool_use=True)


def _json_tool(response_format: dict[str, Any] | None) -> ToolSpec | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ToolSpec(
            name=JSON_TOOL_NAME, input_schema=PERMISSIVE_SCHEMA, description=JSON_TOOL_DESCRIPTION
        )
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format type '{kind}' is not supported", param="response_format"
        )
    spec = (response_format or {}).get("json_schema")
    if not isinstance(spec, dict):
        spec = {}
    schema = spec.get("schema") or PERMISSIVE_SCHEMA
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise InvalidRequestError(
            "Anthropic needs a JSON schema whose root is an object",
            param="response_format.json_schema.schema",
        )
    description = " ".join(filter(None, [JSON_TOOL_DESCRIPTION, spec.get("description")]))
    return ToolSpec(name=JSON_TOOL_NAME, input_schema=schema, description=description)


def _given(value: T | None) -> T | UnsetType:
    return UNSET if value is None else value

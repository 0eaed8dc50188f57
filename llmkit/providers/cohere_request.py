"""OpenAI chat requests as Cohere v2 ``/chat`` bodies.

Choices where the two wires differ:

- ``developer`` messages become ``system`` messages, in place.
- An assistant message's text next to ``tool_calls`` becomes Cohere's ``tool_plan``
  (the text the model writes before calling tools), so it round-trips with responses.
- ``tool_choice``: ``auto`` is Cohere's default (omitted), ``none`` / ``required`` are
  ``NONE`` / ``REQUIRED``; a named function is sent as the only tool, with ``REQUIRED``.
- ``response_format`` ``json_schema`` is Cohere's ``json_object`` with the schema inside.
  Cohere refuses JSON mode together with tools, so that pair is refused here.
- ``top_p`` is clamped into Cohere's ``p`` range [0.01, 0.99] (1.0 means "off" in both).
- A tool's ``strict: true`` turns on Cohere's request-wide ``strict_tools``.
- ``n > 1``, the legacy ``function`` role and non-image media are refused. ``user`` and a
  message's ``name`` have no Cohere field and are dropped; they do not steer the output.
"""

from __future__ import annotations

from typing import Any, Literal

from msgspec import UNSET, UnsetType

from llmkit.errors import InvalidRequestError
from llmkit.providers.cohere_wire import (
    PASSTHROUGH_FIELDS,
    ChatBody,
    ChatMessage,
    ImagePart,
    ImageURL,
    ResponseFormat,
    TextPart,
    Tool,
    ToolFunction,
)
from llmkit.types import ChatRequest, Message

EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
MIN_P, MAX_P = 0.01, 0.99


def chat_body(request: ChatRequest, extras: dict[str, Any], model: str, stream: bool) -> ChatBody:
    """The ``/v2/chat`` body for ``request``; raises InvalidRequestError if Cohere can't."""
    if request.n is not None and request.n > 1:
        raise InvalidRequestError("cohere returns one choice per request; n must be 1", param="n")
    tools, tool_choice = _tools_and_choice(request)
    response_format = _response_format(request.response_format)
    if tools is not UNSET and response_format is not UNSET:
        raise InvalidRequestError(
            "cohere does not support response_format together with tools",
            param="response_format",
        )
    passthrough = {name: extras[name] for name in PASSTHROUGH_FIELDS if name in extras}
    return ChatBody(
        model=model,
        messages=[_message(m, i) for i, m in enumerate(request.messages)],
        stream=stream,
        tools=tools,
        strict_tools=_strict_tools(request.tools),
        tool_choice=tool_choice,
        response_format=response_format,
        stop_sequences=_stop_sequences(request.stop),
        temperature=_given(request.temperature),
        p=UNSET if request.top_p is None else min(MAX_P, max(MIN_P, request.top_p)),
        max_tokens=_given(request.token_limit()),
        seed=_given(request.seed),
        **passthrough,
    )


def _given(value: Any) -> Any:
    return UNSET if value is None else value


def _stop_sequences(stop: str | list[str] | None) -> list[str] | UnsetType:
    if stop is None or stop == []:
        return UNSET
    return [stop] if isinstance(stop, str) else stop


# -- messages ------------------------------------------------------------------------


def _message(message: Message, index: int) -> ChatMessage:
    where = f"messages[{index}]"
    role = message.role
    if role in ("system", "developer"):
        return ChatMessage(role="system", content=_text_only(message, where))
    if role == "user":
        return ChatMessage(role="user", content=_user_content(message.content, where))
    if role == "assistant":
        return _assistant(message, where)
    if role == "tool":
        if not message.tool_call_id:
            raise InvalidRequestError(f"{where}: a tool message needs tool_call_id", param=where)
        content = _text_only(message, where)
        return ChatMessage(role="tool", tool_call_id=message.tool_call_id, content=content)
    raise InvalidRequestError(
        f"{where}: cohere does not support the '{role}' role; use tool_calls and tool messages",
        param=where,
    )


def _assistant(message: Message, where: str) -> ChatMessage:
    text = _text_only(message, where)
    if not message.tool_calls:
        return ChatMessage(role="assistant", content=text)
    return ChatMessage(
        role="assistant", tool_calls=message.tool_calls, tool_plan=text if text else UNSET
    )


def _text_only(message: Message, where: str) -> str:
    """The message's text; refuses media parts on roles that carry only text."""
    if isinstance(message.content, list):
        for part in message.content:
            if part.get("type") not in ("text", "refusal"):
                raise InvalidRequestError(
                    f"{where}: cohere takes only text in {message.role} messages", param=where
                )
        return "".join(str(p.get("text") or p.get("refusal") or "") for p in message.content)
    return message.content or ""


def _user_content(
    content: str | list[dict[str, Any]] | None, where: str
) -> str | list[TextPart | ImagePart]:
    if not isinstance(content, list):
        return content or ""
    return [_user_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]


def _user_part(part: dict[str, Any], where: str) -> TextPart | ImagePart:
    kind = part.get("type")
    if kind == "text":
        return TextPart(str(part.get("text", "")))
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise InvalidRequestError(f"{where}: image_url needs a url", param=where)
        detail = image.get("detail", UNSET) if isinstance(image, dict) else UNSET
        return ImagePart(ImageURL(url=url, detail=detail if detail in _DETAILS else UNSET))
    raise InvalidRequestError(f"{where}: cohere does not accept '{kind}' content", param=where)


_DETAILS = ("auto", "low", "high")


# -- tools ---------------------------------------------------------------------------


ToolChoice = Literal["REQUIRED", "NONE"] | UnsetType
TOOL_CHOICES: dict[str, ToolChoice] = {"auto": UNSET, "none": "NONE", "required": "REQUIRED"}


def _tools_and_choice(request: ChatRequest) -> tuple[list[Tool] | UnsetType, ToolChoice]:
    tools = [_tool(t, i) for i, t in enumerate(request.tools or [])]
    choice = request.tool_choice
    if isinstance(choice, dict):
        name = _named_choice(choice)
        chosen = [t for t in tools if t.function.name == name]
        if not chosen:
            raise InvalidRequestError(
                f"tool_choice names '{name}', which is not in tools", param="tool_choice"
            )
        return chosen, "REQUIRED"
    key = "auto" if choice is None else choice
    if key not in TOOL_CHOICES:
        raise InvalidRequestError(f"unknown tool_choice '{key}'", param="tool_choice")
    if key == "required" and not tools:
        raise InvalidRequestError("tool_choice 'required' needs tools", param="tool_choice")
    if not tools:
        return UNSET, UNSET
    return tools, TOOL_CHOICES[key]


def _named_choice(choice: dict[str, Any]) -> str:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequestError(
            "tool_choice must be auto, none, required or a function by name", param="tool_choice"
        )
    return name


def _tool(tool: dict[str, Any], index: int) -> Tool:
    where = f"tools[{index}]"
    function = tool.get("function")
    if tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise InvalidRequestError(f"{where}: cohere takes only function tools", param=where)
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{where}: a function needs a name", param=where)
    description = function.get("description")
    return Tool(
        function=ToolFunction(
            name=name,
            parameters=function.get("parameters") or EMPTY_SCHEMA,
            description=description if isinstance(description, str) else UNSET,
        )
    )


def _strict_tools(tools: list[dict[str, Any]] | None) -> bool | UnsetType:
    strict = any((t.get("function") or {}).get("strict") is True for t in tools or [])
    return True if strict else UNSET


# -- JSON mode -----------------------------------------------------------------------


def _response_format(response_format: dict[str, Any] | None) -> ResponseFormat | UnsetType:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return UNSET
    if kind == "json_object":
        return ResponseFormat()
    if kind == "json_schema":
        spec = (response_format or {}).get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return ResponseFormat(json_schema=schema if isinstance(schema, dict) else UNSET)
    raise InvalidRequestError(
        f"cohere does not support response_format '{kind}'", param="response_format"
    )

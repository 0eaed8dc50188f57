"""OpenAI chat requests as Gemini ``generateContent`` requests.

How the shapes meet:

- system and developer messages, wherever they stand, become one ``systemInstruction``
  (their text parts in order): Gemini has no system turn inside ``contents``;
- user turns stay ``user``, assistant turns become ``model``, and tool results become
  ``functionResponse`` parts of a ``user`` turn, named after the earlier tool call
  whose id they answer. Consecutive turns of one role merge, since Gemini wants the
  roles to alternate; messages with nothing to send are left out;
- images: a ``data:`` URL becomes ``inlineData``; an http(s) URL becomes ``fileData``
  with the mime type guessed from the path's extension (png, jpeg, webp, gif, heic,
  heif), and a URL with any other extension is refused, since Gemini needs the type;
  ``input_audio`` (wav, mp3) and ``file`` parts with a ``data:`` URL go inline too;
- a tool result that is a JSON object is the ``functionResponse.response``; any other
  text goes as ``{"output": text}``;
- tool parameters go as ``parametersJsonSchema`` rather than ``parameters``: the latter
  is Gemini's OpenAPI subset (upper-case types, no type lists), which OpenAI's JSON
  Schema does not fit. ``json_schema`` response formats likewise go as
  ``responseJsonSchema``. OpenAI's ``strict`` flags have no counterpart and are dropped;
- ``presence_penalty`` and ``frequency_penalty``, which ``ChatRequest`` leaves in the
  call's extras, go to ``generationConfig``; other extras are ignored;
- ``user`` has no Gemini field and is dropped; it does not change the output.
"""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import msgspec

from llmkit.errors import InvalidRequestError
from llmkit.providers.base import Call
from llmkit.providers.gemini_types import (
    Blob,
    Content,
    FileData,
    FunctionCall,
    FunctionCallingConfig,
    FunctionDeclaration,
    FunctionResponse,
    GenerateContentRequest,
    GenerationConfig,
    Part,
    Tool,
    ToolConfig,
)
from llmkit.types import ChatRequest, Message, json_decoder

IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".heic": "image/heic",
    ".heif": "image/heif",
}
AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mp3"}
TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


def generate_content_request(call: Call) -> GenerateContentRequest:
    """The Gemini request for ``call``; InvalidRequestError for what Gemini cannot say."""
    request = call.request
    contents = contents_of(request.messages)
    if not contents:
        raise InvalidRequestError(
            "Gemini needs at least one non-empty user or assistant message", param="messages"
        )
    tools = tools_of(request.tools)
    return GenerateContentRequest(
        contents=contents,
        system_instruction=system_instruction_of(request.messages),
        generation_config=generation_config_of(request, call.extras),
        tools=tools,
        tool_config=tool_config_of(request.tool_choice, tools),
    )


# -- messages -----------------------------------------------------------------------------


def system_instruction_of(messages: Iterable[Message]) -> Content | None:
    """Every system and developer message's text, in order, as one instruction."""
    parts: list[Part] = []
    for message in messages:
        if message.role in ("system", "developer"):
            for part in content_parts(message.content):
                if part.text is None:
                    raise InvalidRequestError(
                        "Gemini takes only text in system messages", param="messages"
                    )
                parts.append(part)
    return Content(parts=parts) if parts else None


def contents_of(messages: Iterable[Message]) -> list[Content]:
    """The conversation as alternating ``user`` / ``model`` turns."""
    call_names: dict[str, str] = {}  # tool_call id -> function name, for tool results
    turns: list[Content] = []
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        role, parts = _turn(message, call_names)
        if not parts:
            continue
        if turns and turns[-1].role == role:
            turns[-1].parts.extend(parts)
        else:
            turns.append(Content(role=role, parts=parts))
    return turns


def _turn(message: Message, call_names: dict[str, str]) -> tuple[str, list[Part]]:
    if message.role == "user":
        return "user", content_parts(message.content)
    if message.role == "assistant":
        return "model", _assistant_parts(message, call_names)
    if message.role == "tool":
        name = call_names.get(message.tool_call_id or "")
        if name is None:
            raise InvalidRequestError(
                f"tool message answers tool_call_id '{message.tool_call_id or ''}', "
                "which no earlier assistant message called",
                param="messages",
            )
        return "user", [_function_response(name, message.text())]
    # The legacy "function" role names its function itself.
    if not message.name:
        raise InvalidRequestError("a function message needs a name", param="messages")
    return "user", [_function_response(message.name, message.text())]


def _assistant_parts(message: Message, call_names: dict[str, str]) -> list[Part]:
    parts = content_parts(message.content, assistant=True)
    for tool_call in message.tool_calls or ():
        call_names[tool_call.id] = tool_call.function.name
        args = _arguments(tool_call.function.arguments)
        parts.append(Part(function_call=FunctionCall(name=tool_call.function.name, args=args)))
    return parts


def _arguments(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        args = json_decoder.decode(text)
    except msgspec.DecodeError:
        args = None
    if not isinstance(args, dict):
        raise InvalidRequestError(
            "tool call arguments must be a JSON object for Gemini", param="messages"
        )
    return args


def _function_response(name: str, text: str) -> Part:
    """A tool's result: a JSON object goes as is, anything else as ``{"output": text}``
    (Gemini's documented key for a function's output)."""
    try:
        value = json_decoder.decode(text) if text else None
    except msgspec.DecodeError:
        value = None
    response = value if isinstance(value, dict) else {"output": text}
    return Part(function_response=FunctionResponse(name=name, response=response))


# -- content parts ------------------------------------------------------------------------


def content_parts(
    content: str | list[dict[str, Any]] | None, assistant: bool = False
) -> list[Part]:
    """OpenAI content (a string or typed parts) as Gemini parts; empty text is left out."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Part(text=content)] if content else []
    parts = (_part(item, assistant) for item in content)
    return [part for part in parts if part is not None]


def _part(item: dict[str, Any], assistant: bool) -> Part | None:
    kind = item.get("type")
    if kind == "text":
        text = item.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError("a text part needs a string 'text'", param="messages")
        return Part(text=text) if text else None
    if kind == "refusal" and assistant:
        return None  # the model's own refusal; nothing the next turn needs
    if kind == "image_url":
        image = item.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise InvalidRequestError("an image_url part needs a url", param="messages")
        return media_part(url)
    if kind == "input_audio":
        return _audio_part(item.get("input_audio"))
    if kind == "file":
        return _file_part(item.get("file"))
    raise InvalidRequestError(f"Gemini cannot take a '{kind}' content part", param="messages")


def media_part(url: str) -> Part:
    """A ``data:`` URL inline, an http(s) URL as ``fileData`` (mime type from extension)."""
    if url.startswith("data:"):
        return Part(inline_data=_blob_from_data_url(url))
    address = urlsplit(url)
    if address.scheme not in ("http", "https"):
        raise InvalidRequestError(
            "Gemini takes images as data: URLs or http(s) URLs", param="messages"
        )
    extension = posixpath.splitext(address.path)[1].lower()
    mime_type = IMAGE_TYPES.get(extension)
    if mime_type is None:
        known = ", ".join(sorted(IMAGE_TYPES))
        raise InvalidRequestError(
            f"cannot tell the image type of '{url}' for Gemini: use a data: URL or a URL "
            f"ending in one of {known}",
            param="messages",
        )
    return Part(file_data=FileData(mime_type=mime_type, file_uri=url))


def _blob_from_data_url(url: str) -> Blob:
    header, comma, payload = url.removeprefix("data:").partition(",")
    if not comma:
        raise InvalidRequestError("a data: URL needs a ',' before its data", param="messages")
    mime_type, *params = header.split(";")
    if "base64" in params:
        data = "".join(payload.split())
    else:
        data = base64.b64encode(unquote_to_bytes(payload)).decode("ascii")
    return Blob(mime_type=mime_type or "text/plain", data=data)


def _audio_part(audio: Any) -> Part:
    audio_format = audio.get("format") if isinstance(audio, dict) else None
    mime_type = AUDIO_TYPES.get(str(audio_format))
    if mime_type is None or not isinstance(audio.get("data"), str):
        raise InvalidRequestError(
            "an input_audio part needs base64 'data' and a format of wav or mp3",
            param="messages",
        )
    return Part(inline_data=Blob(mime_type=mime_type, data=audio["data"]))


def _file_part(file: Any) -> Part:
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str) or not data.startswith("data:"):
        raise InvalidRequestError(
            "Gemini takes files only inline, as a data: URL in 'file_data'", param="messages"
        )
    return Part(inline_data=_blob_from_data_url(data))


# -- tools --------------------------------------------------------------------------------


def tools_of(tools: list[dict[str, Any]] | None) -> list[Tool] | None:
    """OpenAI function tools as one Gemini tool of function declarations."""
    if not tools:
        return None
    declarations = [_declaration(tool) for tool in tools]
    return [Tool(function_declarations=declarations)]


def _declaration(tool: dict[str, Any]) -> FunctionDeclaration:
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        raise InvalidRequestError("Gemini takes only function tools", param="tools")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("a function tool needs a name", param="tools")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequestError(f"tool '{name}': parameters must be an object", param="tools")
    description = function.get("description")
    return FunctionDeclaration(
        name=name,
        description=description if isinstance(description, str) else None,
        parameters_json_schema=parameters,
    )


def tool_config_of(
    choice: str | dict[str, Any] | None, tools: list[Tool] | None
) -> ToolConfig | None:
    """``tool_choice`` as ``functionCallingConfig``: auto, none, required (ANY), a name."""
    if choice is None:
        return None
    names = [d.name for tool in tools or () for d in tool.function_declarations]
    if isinstance(choice, str):
        mode = TOOL_MODES.get(choice)
        if mode is None:
            raise InvalidRequestError(f"unknown tool_choice '{choice}'", param="tool_choice")
        if mode == "ANY" and not names:
            raise InvalidRequestError("tool_choice 'required' needs tools", param="tool_choice")
        return _tool_config(mode) if names else None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequestError("tool_choice must name a function", param="tool_choice")
    if name not in names:
        raise InvalidRequestError(
            f"tool_choice names '{name}', not among tools", param="tool_choice"
        )
    return _tool_config("ANY", [name])


def _tool_config(mode: str, allowed: list[str] | None = None) -> ToolConfig:
    config = FunctionCallingConfig(mode=mode, allowed_function_names=allowed)
    return ToolConfig(function_calling_config=config)


# -- generation config --------------------------------------------------------------------


def generation_config_of(request: ChatRequest, extras: dict[str, Any]) -> GenerationConfig | None:
    """Sampling, limits, stop sequences, candidates and JSON mode; None when all unset."""
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    mime_type, schema = json_mode_of(request.response_format)
    config = GenerationConfig(
        temperature=request.temperature,
        top_p=request.top_p,
        max_output_tokens=request.token_limit(),
        stop_sequences=stop or None,
        candidate_count=request.n if request.n and request.n > 1 else None,
        seed=request.seed,
        presence_penalty=_number(extras, "presence_penalty"),
        frequency_penalty=_number(extras, "frequency_penalty"),
        response_mime_type=mime_type,
        response_json_schema=schema,
    )
    return None if config == GenerationConfig() else config


def json_mode_of(response_format: dict[str, Any] | None) -> tuple[str | None, Any]:
    """``response_format`` as (responseMimeType, responseJsonSchema)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return "application/json", None
    if kind == "json_schema":
        spec = (response_format or {}).get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is not None and not isinstance(schema, dict):
            raise InvalidRequestError(
                "json_schema.schema must be an object", param="response_format"
            )
        return "application/json", schema
    raise InvalidRequestError(f"unknown response_format type '{kind}'", param="response_format")


def _number(extras: dict[str, Any], key: str) -> float | None:
    value = extras.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{key} must be a number", param=key)
    return float(value)

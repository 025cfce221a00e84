"""Tool calls as each model family writes them, read back into OpenAI ``tool_calls``.

A model calls a tool in the format its chat template taught it; the gateway picks the format from
the model folder once (`detect`) and reads a finished choice's text with it (`parse`):

* ``hermes`` (Qwen2.5 / Qwen3, Hermes, and our demo template; the default):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number, anywhere in the text;
  the rest of the text stays content.
* ``llama3_json`` (Llama 3.1 / 3.2 / 3.3 with custom tools): the reply IS the call, a JSON object
  ``{"name": ..., "parameters": {...}}`` (``arguments`` accepted too), optionally after
  ``<|python_tag|>``; several are separated by ``;``. Text after the last call stays content.
* ``mistral`` (Mistral v0.3 and later): ``[TOOL_CALLS]`` then a JSON list of
  ``{"name": ..., "arguments": {...}}``; text before the marker stays content.

Why lenient about the markers: the detokenizer skips special tokens (a client never sees
``<|eot_id|>``), and ``<|python_tag|>`` / ``[TOOL_CALLS]`` are special tokens in those families'
vocabularies, so they are usually gone from the text by the time it is parsed. A reply is then a
call when it is exactly the JSON of calls that name the request's tools (a list, for Mistral);
anything else, or a call naming an unknown tool, stays content, as in the Hermes format.

Which format: ``[TOOL_CALLS]`` in the vocabulary or template -> ``mistral``; a template that writes
``<tool_call>`` -> ``hermes``; a Llama 3 header template (``<|start_header_id|>``) that renders
tools -> ``llama3_json``; anything else -> ``hermes``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway import protocol

FORMATS = ("hermes", "llama3_json", "mistral")
HERMES_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
PYTHON_TAG = "<|python_tag|>"
MISTRAL_MARKER = "[TOOL_CALLS]"
_decoder = json.JSONDecoder()


def detect(tokenizer: Any) -> str:
    """The tool-call format a tokenizer's chat template and special tokens speak."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates: the tool one speaks for tools
        template = template.get("tool_use") or template.get("default") or ""
    vocab = tokenizer.get_vocab()
    if MISTRAL_MARKER in vocab or MISTRAL_MARKER in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|start_header_id|>" in template and "tools" in template:
        return "llama3_json"
    return "hermes"


def parse(
    fmt: str, text: str, names: tuple[str, ...], max_calls: int | None = None
) -> tuple[str | None, list[protocol.ToolCall]]:
    """``(content, tool calls)`` of a finished choice's `text` in format `fmt`; at most
    `max_calls` calls (those past it are dropped in the JSON formats, kept as text in Hermes')."""
    if fmt == "llama3_json":
        return _llama3_json(text, names, max_calls)
    if fmt == "mistral":
        return _mistral(text, names, max_calls)
    return _hermes(text, names, max_calls)


def _call(item: Any, names: tuple[str, ...], arguments_key: str = "arguments") -> protocol.ToolCall | None:
    """A call from one decoded JSON value, or None when it is not a call of one of `names`."""
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get(arguments_key, item.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return protocol.ToolCall(
        function=protocol.FunctionCall(name=item["name"], arguments=json.dumps(arguments, ensure_ascii=False))
    )


def _hermes(
    text: str, names: tuple[str, ...], max_calls: int | None
) -> tuple[str | None, list[protocol.ToolCall]]:
    calls: list[protocol.ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in HERMES_RE.finditer(text):
        if max_calls is not None and len(calls) >= max_calls:
            break
        try:
            call = _call(json.loads(match.group(1)), names)
        except ValueError:
            call = None
        if call is not None:
            calls.append(call)
            kept.append(text[last : match.start()])
            last = match.end()
    if not calls:
        return text, []
    kept.append(text[last:])
    content = "".join(kept).strip()
    return content or None, calls


def _llama3_json(
    text: str, names: tuple[str, ...], max_calls: int | None
) -> tuple[str | None, list[protocol.ToolCall]]:
    body = text.lstrip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].lstrip()
    calls: list[protocol.ToolCall] = []
    at = 0
    while at < len(body) and body[at] == "{":
        try:
            value, end = _decoder.raw_decode(body, at)
        except ValueError:
            break
        call = _call(value, names, "parameters")
        if call is None:
            break
        calls.append(call)
        at = end
        rest = body[at:].lstrip()
        if not rest.startswith(";"):
            at = len(body) - len(rest)
            break
        at = len(body) - len(rest[1:].lstrip())
    if not calls:
        return text, []
    content = body[at:].strip()
    return content or None, calls[:max_calls] if max_calls is not None else calls


def _mistral(
    text: str, names: tuple[str, ...], max_calls: int | None
) -> tuple[str | None, list[protocol.ToolCall]]:
    before, marker, after = text.partition(MISTRAL_MARKER)
    if not marker:
        before, after = "", text
    body = after.lstrip()
    if not body.startswith("["):
        return text, []
    try:
        value, end = _decoder.raw_decode(body)
    except ValueError:
        return text, []
    calls = [_call(item, names) for item in value] if isinstance(value, list) else []
    if not calls or any(call is None for call in calls):
        return text, []
    content = (before + body[end:]).strip()
    return content or None, calls[:max_calls] if max_calls is not None else calls

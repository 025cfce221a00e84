"""What the model must write for a chat request (`response_format`, `tools`), and reading tool
calls back out of the text.

Tool calls
----------
* ``tool_choice`` "required" or a named function: the output is constrained (see
  `gateway.constrained`) to one JSON object ``{"name": ..., "arguments": {...}}``; with one candidate
  tool, ``arguments`` follows that tool's ``parameters`` schema; with several, ``name`` is one of
  their names and ``arguments`` any JSON object (the subset we compile has no ``anyOf`` to tie
  arguments to the name). The object is returned as ``message.tool_calls`` with
  ``finish_reason: "tool_calls"``.
* ``tool_choice`` "auto": the model is free; a tool call is text in the Hermes / Qwen format the
  chat template documents to the model::

      <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

  Every such block whose JSON parses and names a given tool becomes a tool call; the rest of the
  text stays ``content`` (null when only whitespace is left). A stream with tools in "auto" mode
  is therefore sent when the choice ends (the text cannot be shown before it is known not to be a
  call), as one content delta or one tool-call delta per call.
* "none": tools are rendered in the prompt but the output is plain text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gateway import errors, protocol
from gateway.constrained import Grammar, SchemaError

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclass
class OutputPlan:
    """How one chat request's output is produced and read back."""

    mode: str  # "text", "json" (response_format), "tool_forced", "tool_auto"
    grammar: Grammar | None = None
    tool_names: tuple[str, ...] = ()
    max_calls: int | None = None  # `parallel_tool_calls: false`: at most one call per message


def plan_output(req: protocol.ChatCompletionRequest) -> OutputPlan:
    """The plan for `req`, or a 400 when its schema cannot be enforced."""
    choice = req.effective_tool_choice()
    if req.tools and choice != "none":
        names = tuple(tool.function.name for tool in req.tools)
        if choice == "auto":
            return OutputPlan("tool_auto", tool_names=names, max_calls=None if req.parallel_tool_calls else 1)
        candidates = req.tools
        if isinstance(choice, protocol.NamedToolChoice):
            candidates = [tool for tool in req.tools if tool.function.name == choice.function.name]
        return OutputPlan("tool_forced", _grammar(_call_schema(candidates), "tools"), names)
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return OutputPlan("text")
    if fmt.type == "json_object":
        return OutputPlan("json", _grammar(None, "response_format"))
    return OutputPlan("json", _grammar(fmt.json_schema.json_schema or {"type": "object"}, "response_format"))


def _grammar(schema: dict[str, Any] | None, param: str) -> Grammar:
    try:
        return Grammar(schema)
    except (SchemaError, TypeError, ValueError) as exc:
        raise errors.invalid_request(
            f"cannot constrain the output to this schema: {exc}", param=param
        ) from exc


def _call_schema(tools: list[protocol.ChatCompletionTool]) -> dict[str, Any]:
    names = [tool.function.name for tool in tools]
    if len(tools) == 1:
        parameters = tools[0].function.parameters or {"type": "object", "properties": {}}
    else:
        parameters = {"type": "object"}
    schema = {"type": "object", "properties": {"name": {"enum": names}, "arguments": parameters}}
    # `#/$defs/X` refs inside the parameters resolve against the root schema: lift its $defs
    for key in ("$defs", "definitions"):
        if isinstance(parameters, dict) and key in parameters:
            schema[key] = parameters[key]
    return schema


def forced_calls(text: str) -> list[protocol.ToolCall]:
    """The constrained JSON object as one tool call (empty when generation was cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return []
    arguments = json.dumps(value.get("arguments", {}), ensure_ascii=False)
    return [protocol.ToolCall(function=protocol.FunctionCall(name=value["name"], arguments=arguments))]


def auto_calls(
    text: str, names: tuple[str, ...], max_calls: int | None = None
) -> tuple[str | None, list[protocol.ToolCall]]:
    """``(content, tool calls)`` read from free text in the ``<tool_call>`` format; past
    `max_calls` calls the rest of the text stays content."""
    calls: list[protocol.ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in TOOL_CALL_RE.finditer(text):
        if max_calls is not None and len(calls) >= max_calls:
            break
        found = forced_calls(match.group(1))
        if found and found[0].function.name in names:
            calls.extend(found)
            kept.append(text[last : match.start()])
            last = match.end()
    if not calls:
        return text, []
    kept.append(text[last:])
    content = "".join(kept).strip()
    return content or None, calls

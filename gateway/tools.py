"""What the model must write for a request (`response_format`, vLLM's structured outputs, `tools`),
and reading tool calls back out of the text.

Structured outputs
------------------
One of these per request (two are a 400): ``response_format`` (``json_object``, ``json_schema``),
vLLM's ``structured_outputs`` (``{"json": schema}``, ``{"json_object": true}``, ``{"regex": ...}``,
``{"choice": [...]}``, ``{"grammar": ...}``) or its older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar``. The output is constrained to it (`gateway.constrained`) and
returned as ``content``; chat and text completions both take the vLLM fields. A schema, regex or
grammar that cannot be enforced is a 400 naming the field.

Tool calls
----------
* ``tool_choice`` "required" or a named function: the output is constrained to the calls as JSON.
  One call is ``{"name": ..., "arguments": {...}}``, an ``anyOf`` with one branch per candidate
  tool, so the name picks the branch and ``arguments`` follows THAT tool's ``parameters``.
  "required" with ``parallel_tool_calls`` (the default) is a list of one or more such calls; with
  ``parallel_tool_calls: false``, and a named function, exactly one. They come back as
  ``message.tool_calls`` with ``finish_reason: "tool_calls"``. A call cut off by ``max_tokens`` is
  ``finish_reason: "length"`` with neither content nor calls: the half-written JSON is never
  shown as text.
* ``tool_choice`` "auto": the model is free; a tool call is text in the format its chat template
  documents to the model (`gateway.tool_formats`: Hermes / Qwen, Llama 3.1 JSON, Mistral), for
  instance::

      <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

  Every call whose JSON parses and names a given tool becomes a tool call; the rest of the text
  stays ``content`` (null when only whitespace is left). A stream with tools in "auto" mode
  is therefore sent when the choice ends (the text cannot be shown before it is known not to be a
  call), as one content delta or one tool-call delta per call. A structured output given with
  tools in "auto" mode wins: the answer follows it (the model cannot call a tool then).
* "none": tools are rendered in the prompt but the output is plain text.
* The deprecated ``functions`` / ``function_call`` are tools / tool_choice (`protocol`), at most
  one call, answered as ``message.function_call`` with ``finish_reason: "function_call"``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway import constrained, errors, protocol, tool_formats
from gateway.constrained import Grammar, SchemaError


@dataclass
class OutputPlan:
    """How one chat request's output is produced and read back."""

    mode: str  # "text", "structured" (content under a grammar), "tool_forced", "tool_auto"
    grammar: Grammar | None = None
    tool_names: tuple[str, ...] = ()
    max_calls: int | None = None  # at most this many calls per message (`parallel_tool_calls: false`)
    legacy: bool = False  # the request used `functions`: answer with `function_call`
    tool_format: str = "hermes"  # how the model writes a call in "auto" mode (`gateway.tool_formats`)


def plan_output(req: protocol.ChatCompletionRequest) -> OutputPlan:
    """The plan for `req`, or a 400 when what it asks cannot be enforced. Compiling a schema can
    take milliseconds: call it off the event loop."""
    structured = structured_grammar(req)
    choice = req.effective_tool_choice()
    max_calls = 1 if req.legacy_functions or not req.parallel_tool_calls else None
    if req.tools and choice not in ("none", "auto"):
        if structured is not None:
            raise errors.invalid_request(
                "a forced tool call and a structured output cannot both constrain the answer",
                param="tool_choice",
            )
        candidates = req.tools
        if isinstance(choice, protocol.NamedToolChoice):
            candidates = [tool for tool in req.tools if tool.function.name == choice.function.name]
        names = tuple(tool.function.name for tool in req.tools)
        parallel = choice == "required" and max_calls is None
        grammar = _compile(
            lambda: constrained.json_schema_grammar(calls_schema(candidates, parallel)), "tools"
        )
        return OutputPlan("tool_forced", grammar, names, 1 if not parallel else None, req.legacy_functions)
    if structured is not None:
        return OutputPlan("structured", structured)
    if req.tools and choice == "auto":
        names = tuple(tool.function.name for tool in req.tools)
        return OutputPlan("tool_auto", tool_names=names, max_calls=max_calls, legacy=req.legacy_functions)
    return OutputPlan("text")


def structured_grammar(req: protocol.SamplingRequest) -> Grammar | None:
    """The grammar of the one structured output `req` asks for (chat's ``response_format`` or
    vLLM's fields), None when it asks for none; a 400 for two, or for one that cannot be enforced."""
    asked: list[tuple[str, Any, str]] = []  # (kind, value, param)
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        asked.append(("json_object", True, "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        asked.append(("json", fmt.json_schema.json_schema or {"type": "object"}, "response_format"))
    outputs = req.structured_outputs
    if outputs is not None:
        for kind in ("json_schema", "json_object", "regex", "choice", "grammar"):
            value = getattr(outputs, kind)
            if value is not None and value is not False:
                name = "json" if kind == "json_schema" else kind
                asked.append((name, value, f"structured_outputs.{name}"))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            asked.append((kind, value, f"guided_{kind}"))
    if not asked:
        return None
    if len(asked) > 1:
        given = ", ".join(param for _, _, param in asked)
        raise errors.invalid_request(f"give one structured output, not several ({given})", param=asked[1][2])
    kind, value, param = asked[0]
    if kind == "json_object":
        return _compile(lambda: constrained.json_schema_grammar(None), param)
    if kind == "json":
        return _compile(lambda: constrained.json_schema_grammar(_schema_value(value)), param)
    if kind == "regex":
        return _compile(lambda: constrained.regex_grammar(value), param)
    if kind == "choice":
        return _compile(lambda: constrained.choice_grammar(value), param)
    return _compile(lambda: constrained.lark_grammar(value), param)


def _schema_value(value: Any) -> Any:
    """A schema given as an object, or as its JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise SchemaError(f"the schema is not valid JSON: {exc}") from exc
    return value


def _compile(build: Callable[[], Grammar], param: str) -> Grammar:
    try:
        return build()
    except SchemaError as exc:
        raise errors.invalid_request(f"cannot constrain the output to this: {exc}", param=param) from exc


# -- forced tool calls ------------------------------------------------------------------------------
def calls_schema(tools: list[protocol.ChatCompletionTool], parallel: bool) -> dict[str, Any]:
    """The JSON Schema of a forced answer: one call (``{"name", "arguments"}``, a branch per tool),
    or with `parallel` a list of one or more."""
    branches, defs = [], {}
    for i, tool in enumerate(tools):
        parameters = tool.function.parameters
        if parameters is None:  # a function without parameters takes none
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        arguments, own_defs = _relocate(parameters, f"tool{i}")
        defs.update(own_defs)
        branches.append({
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })  # fmt: skip
    call = branches[0] if len(branches) == 1 else {"anyOf": branches}
    schema = {"type": "array", "items": call, "minItems": 1} if parallel else dict(call)
    if defs:
        schema["$defs"] = defs
    return schema


def _relocate(schema: Any, prefix: str) -> tuple[Any, dict[str, Any]]:
    """`schema` moved under the root of a bigger one: its ``$defs`` / ``definitions`` become root
    ``$defs`` named ``<prefix>.<keyword>.<name>`` and every local ``$ref`` is rewritten to match
    (a ref to the schema itself, ``#``, to the copy of it kept as ``$defs/<prefix>``), so several
    tools' definitions never collide."""
    if not isinstance(schema, dict):
        return schema, {}
    kept = {"$defs", "definitions"}
    own = [
        (key, name, sub)
        for key in kept
        if isinstance(schema.get(key), dict)
        for name, sub in schema[key].items()
    ]
    needs_root = False

    def target(ref: str) -> str:
        nonlocal needs_root
        path = ref[1:]
        for key in kept:
            head = f"/{key}/"
            if path.startswith(head):
                name, _, rest = path[len(head) :].partition("/")
                new = _pointer_escape(f"{prefix}.{key}.{_pointer_unescape(name)}")
                return f"#/$defs/{new}" + (f"/{rest}" if rest else "")
        needs_root = True
        return f"#/$defs/{prefix}{path}"

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        if not isinstance(node, dict):
            return node
        return {
            key: target(value)
            if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else rewrite(value)
            for key, value in node.items()
        }

    defs = {f"{prefix}.{key}.{name}": rewrite(sub) for key, name, sub in own}
    body = rewrite({key: value for key, value in schema.items() if key not in kept})
    if needs_root:
        defs[prefix] = body
    return body, defs


def _pointer_escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _pointer_unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def forced_calls(text: str) -> list[protocol.ToolCall]:
    """The constrained JSON (one call, or a list of calls) as tool calls; empty when generation
    was cut short."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    calls = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = json.dumps(item.get("arguments", {}), ensure_ascii=False)
        calls.append(
            protocol.ToolCall(function=protocol.FunctionCall(name=item["name"], arguments=arguments))
        )
    return calls


def auto_calls(
    text: str, names: tuple[str, ...], max_calls: int | None = None, fmt: str = "hermes"
) -> tuple[str | None, list[protocol.ToolCall]]:
    """``(content, tool calls)`` read from free text in the model's tool-call format
    (`gateway.tool_formats`: Hermes ``<tool_call>``, Llama 3.1 JSON, Mistral ``[TOOL_CALLS]``)."""
    return tool_formats.parse(fmt, text, names, max_calls)

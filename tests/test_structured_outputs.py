"""Structured outputs and forced tool calls through the real gateway app in process (the `peers` /
`gateway` fixtures of tests/test_gateway_handlers.py: two real peers serving the random-weight demo
model). Only the constraints make the outputs valid: that is the point."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema

from tests.schema_corpus import corpus
from tests.test_gateway_handlers import MODEL, gateway, peers, sse_data  # noqa: F401 - fixtures

CORPUS = corpus()
THROUGH_GATEWAY = [
    "pydantic_nested_optional", "pydantic_discriminated_union", "pydantic_plain_union", "pydantic_recursive",
    "pydantic_enum_literal", "pydantic_constrained", "pydantic_dict_tuple", "pydantic_formats",
    "pydantic_optional_model", "pydantic_openai_guide", "instructor_nested_optional", "instructor_union",
    "pydantic_ai_nested_optional", "pydantic_ai_recursive", "any_of", "one_of", "array_bounds", "recursive_root",
    "formats", "pattern",
]  # fmt: skip
MESSAGES = [{"role": "user", "content": "Fill in the form."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit", "days"], "additionalProperties": False,
        },
    },
}  # fmt: skip
ORDER = {
    "type": "function",
    "function": {
        "name": "place_order",
        "parameters": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                           "gift": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}},
            "required": ["sku", "quantity", "gift"], "additionalProperties": False,
        },
    },
}  # fmt: skip
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, ORDER)}


async def _chat(client, **body):
    response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body})
    assert response.status_code == 200, response.text
    return response.json()


async def test_the_schema_corpus_through_the_gateway(gateway):  # noqa: F811
    client, _, _ = gateway
    checker = jsonschema.FormatChecker()

    async def one(i: int, name: str) -> None:
        schema = CORPUS[name]
        fmt = {"type": "json_schema", "json_schema": {"name": name[:64], "schema": schema, "strict": True}}
        data = await _chat(client, response_format=fmt, max_tokens=80, seed=i, temperature=1.0)
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop", (name, choice)
        jsonschema.validate(json.loads(choice["message"]["content"]), schema, format_checker=checker)

    await asyncio.gather(*(one(i, name) for i, name in enumerate(THROUGH_GATEWAY)))


async def test_json_that_closes_on_the_last_token_says_stop(gateway):  # noqa: F811
    """A random model never ends a string by itself: the closing plan ends it on the last token
    allowed, and that is a complete answer (`parse()` raised LengthFinishReasonError before)."""
    client, _, _ = gateway
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    for max_tokens in (12, 17):
        data = await _chat(client, response_format=fmt, max_tokens=max_tokens, seed=max_tokens)
        assert data["usage"]["completion_tokens"] == max_tokens
        assert data["choices"][0]["finish_reason"] == "stop"
        assert isinstance(json.loads(data["choices"][0]["message"]["content"])["answer"], str)
    stream = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "seed": 12,
                               "max_tokens": 12, "response_format": fmt, "stream": True})  # fmt: skip
    chunks = sse_data(stream.text)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


async def test_structured_outputs_and_guided_fields(gateway):  # noqa: F811
    client, _, _ = gateway
    point = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
             "required": ["x", "y"], "additionalProperties": False}  # fmt: skip
    cases = [
        ({"structured_outputs": {"json": point}}, lambda t: jsonschema.validate(json.loads(t), point)),
        (
            {"structured_outputs": {"json": json.dumps(point)}},
            lambda t: jsonschema.validate(json.loads(t), point),
        ),
        ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict)),
        (
            {"structured_outputs": {"regex": r"[a-c]{3}-[0-9]{2}"}},
            lambda t: re.fullmatch(r"[a-c]{3}-[0-9]{2}", t),
        ),
        ({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, lambda t: t in ("yes", "no", "maybe")),
        ({"structured_outputs": {"grammar": 'root ::= "up" | "down"'}}, lambda t: t in ("up", "down")),
        ({"guided_json": point}, lambda t: jsonschema.validate(json.loads(t), point)),
        ({"guided_regex": r"\d{4}"}, lambda t: re.fullmatch(r"\d{4}", t)),
        ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
        ({"guided_grammar": 'start: "a" "b"+'}, lambda t: re.fullmatch("ab+", t)),
    ]

    async def one(i: int, extra: dict, check) -> None:
        chat = await _chat(client, max_tokens=24, seed=i, **extra)
        assert chat["choices"][0]["finish_reason"] == "stop", (extra, chat)
        text = chat["choices"][0]["message"]["content"]
        assert check(text) is not False, (extra, text)
        response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Answer:", "max_tokens": 24,
                                                              "seed": i, **extra})  # fmt: skip
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and check(choice["text"]) is not False, (extra, choice)

    await asyncio.gather(*(one(i, extra, check) for i, (extra, check) in enumerate(cases)))


async def test_structured_output_errors_are_400s_naming_the_field(gateway):  # noqa: F811
    client, _, _ = gateway
    cases = [
        ({"guided_regex": "(", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
         "response_format"),
        ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, "guided_json"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_choice": ["a"]}, "tool_choice"),
        ({"functions": [WEATHER["function"]], "tools": [WEATHER]}, None),
    ]  # fmt: skip
    for extra, param in cases:
        response = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **extra}
        )
        assert response.status_code == 400, (extra, response.text)
        if param is not None:
            assert response.json()["error"]["param"] == param, (extra, response.text)


async def test_required_tool_choice_over_two_tools_constrains_the_chosen_tools_arguments(gateway):  # noqa: F811
    client, _, _ = gateway

    async def one(seed: int, parallel: bool) -> list[str]:
        data = await _chat(client, tools=[WEATHER, ORDER], tool_choice="required", parallel_tool_calls=parallel,
                           max_tokens=120, seed=seed, temperature=1.0)  # fmt: skip
        choice = data["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] is None
        calls = choice["message"]["tool_calls"]
        assert len(calls) == 1 or (parallel and len(calls) > 1)
        for call in calls:
            jsonschema.validate(
                json.loads(call["function"]["arguments"]), PARAMETERS[call["function"]["name"]]
            )
        return [call["function"]["name"] for call in calls]

    names = await asyncio.gather(*(one(seed, parallel) for seed in range(1, 9) for parallel in (False, True)))
    assert {name for called in names for name in called} == {"get_weather", "place_order"}


async def test_a_forced_call_cut_off_by_max_tokens_is_length_without_content(gateway):  # noqa: F811
    client, _, _ = gateway
    body = {"tools": [WEATHER, ORDER], "tool_choice": {"type": "function", "function": {"name": "place_order"}},
            "max_tokens": 5, "seed": 3}  # fmt: skip
    data = await _chat(client, **body)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None and "tool_calls" not in choice["message"]
    stream = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body,
                                                             "stream": True})  # fmt: skip
    chunks = [c for c in sse_data(stream.text) if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ""
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_legacy_functions_are_tools(gateway):  # noqa: F811
    client, _, _ = gateway
    body = {"functions": [WEATHER["function"], ORDER["function"]], "function_call": {"name": "get_weather"},
            "max_tokens": 60, "seed": 5}  # fmt: skip
    data = await _chat(client, **body)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert "tool_calls" not in choice["message"] and choice["message"]["content"] is None
    call = choice["message"]["function_call"]
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), PARAMETERS["get_weather"])
    stream = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body,
                                                             "stream": True})  # fmt: skip
    chunks = [c for c in sse_data(stream.text) if c["choices"]]
    deltas = [
        c["choices"][0]["delta"]["function_call"]
        for c in chunks
        if "function_call" in c["choices"][0]["delta"]
    ]
    assert deltas == [call]
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"
    auto = await _chat(client, functions=[WEATHER["function"]], function_call="auto", max_tokens=4, seed=1)
    assert auto["choices"][0]["finish_reason"] in ("stop", "length", "function_call")

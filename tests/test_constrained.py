"""Constrained decoding (gateway/constrained.py) and tool-call parsing (gateway/tools.py), without a
swarm: random walks over the allowed tokens of the demo tokenizer always end in valid JSON."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from gateway.constrained import Grammar, JsonConstraint, SchemaError, TokenTable
from gateway.text import TokenPieces, _special_ids
from gateway.tools import auto_calls, forced_calls

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "nested": {"$ref": "#/$defs/point"},
    },
    "required": ["name", "age", "ok"],
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "note": {"type": "null"}}}},
}


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture(scope="module")
def table(tokenizer):
    return TokenTable(TokenPieces(tokenizer), len(tokenizer), _special_ids(tokenizer))


def _walk(grammar, table, tokenizer, seed: int, budget: int) -> tuple[str, bool]:
    eos = tokenizer.eos_token_id
    rng = random.Random(seed)
    constraint = JsonConstraint(grammar, table, [eos], budget)
    out = []
    for _ in range(budget):
        allowed = constraint.allowed()
        assert allowed and len(set(allowed)) == len(allowed)
        token = rng.choice(allowed)
        constraint.advance(token)
        if token == eos:
            return tokenizer.decode(out), True
        out.append(token)
    return tokenizer.decode(out), False


@pytest.mark.parametrize("seed", range(6))
def test_random_walk_is_schema_valid_json(table, tokenizer, seed):
    text, ended = _walk(Grammar(SCHEMA), table, tokenizer, seed, budget=80)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert list(json.loads(text)) == list(SCHEMA["properties"])


@pytest.mark.parametrize("seed", range(6))
def test_json_object_mode_closes_within_budget(table, tokenizer, seed):
    text, _ = _walk(Grammar(None), table, tokenizer, seed, budget=24)
    assert isinstance(json.loads(text), dict)


def test_complete_value_allows_only_eos(table, tokenizer):
    constraint = JsonConstraint(Grammar({"type": "boolean"}), table, [tokenizer.eos_token_id], 10)
    for token in tokenizer("true", add_special_tokens=False)["input_ids"]:
        assert token in constraint.allowed()
        constraint.advance(token)
    assert constraint.allowed() == [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "schema", [{"anyOf": [{"type": "string"}]}, {"type": ["string", "null"]}, {"$ref": "http://x/y"},
               {"type": "string", "pattern": "a+"}, {"enum": [1, 12]}, {"type": "tuple"},
               {"type": "array", "maxItems": "3"}, {"type": "string", "minLength": 5, "maxLength": 2}],
)  # fmt: skip
def test_unsupported_schemas_are_refused(schema):
    with pytest.raises(SchemaError):
        Grammar(schema)


def test_tool_call_parsing():
    calls = forced_calls('{"name":"get_weather","arguments":{"city":"Paris"}}')
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert forced_calls('{"name":"get_wea') == []
    content, calls = auto_calls(
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
        ("get_weather",),
    )
    assert [c.function.name for c in calls] == ["get_weather"]
    assert content == 'Let me check. <tool_call>{"name": "unknown", "arguments": {}}</tool_call>'
    assert auto_calls("plain text", ("get_weather",)) == ("plain text", [])

"""Constrained decoding (gateway/constrained.py) and tool-call plans and parsing (gateway/tools.py),
without a swarm: random walks over the allowed tokens (what a random-weight model does) always end
in output the schema, regex or grammar accepts, within the token budget."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from gateway import protocol
from gateway.constrained import (
    Constraint,
    SchemaError,
    Vocabulary,
    choice_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)
from gateway.tools import auto_calls, calls_schema, forced_calls
from tests.schema_corpus import corpus

CORPUS = corpus()
FORMATS = jsonschema.FormatChecker()
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
# a second tool whose $defs name collides with nothing in the first, and one that recurses to its root
ORDER = {
    "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
                                                        "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["sku", "qty"], "additionalProperties": False}},
    "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1,
                                               "maxItems": 2}},
    "required": ["items"], "additionalProperties": False,
}  # fmt: skip
CHAIN = {
    "type": "object",
    "properties": {"v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
    "required": ["v", "next"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return Vocabulary(tokenizer, [tokenizer.eos_token_id])


def walk(grammar, vocab, tokenizer, seed: int, budget: int) -> tuple[str, int, Constraint]:
    """Sample uniformly among the allowed tokens, as a random-weight model roughly does."""
    eos = tokenizer.eos_token_id
    rng = random.Random(seed)
    constraint = Constraint(grammar, vocab, budget)
    out: list[int] = []
    for _ in range(budget):
        allowed = constraint.allowed()
        assert allowed and len(set(allowed)) == len(allowed)
        token = rng.choice(allowed)
        constraint.advance(token)
        if token == eos:
            break
        out.append(token)
        if constraint.finished:
            break
    return tokenizer.decode(out), len(out), constraint


def test_the_corpus_is_big_enough():
    assert len(CORPUS) >= 30
    assert sum(name.startswith(("pydantic", "instructor")) for name in CORPUS) >= 12


@pytest.mark.parametrize("name", list(CORPUS))
def test_random_walks_validate_against_every_schema(name, vocab, tokenizer):
    schema = CORPUS[name]
    grammar = json_schema_grammar(schema)
    for seed in range(4):
        text, _, constraint = walk(grammar, vocab, tokenizer, seed, budget=96)
        assert constraint.complete, (name, seed, text)
        jsonschema.validate(json.loads(text), schema if schema is not None else {"type": "object"},
                            format_checker=FORMATS)  # fmt: skip


@pytest.mark.parametrize("budget", [10, 13, 24])
def test_a_free_string_closes_on_the_last_token(vocab, tokenizer, budget):
    """A random model never closes a string by itself: the plan closes it exactly on the last token."""
    grammar = json_schema_grammar({"type": "object", "properties": {"note": {"type": "string"}},
                                   "required": ["note"], "additionalProperties": False})  # fmt: skip
    for seed in range(3):
        text, used, constraint = walk(grammar, vocab, tokenizer, seed, budget)
        assert constraint.finished and used == budget, (text, used)
        assert isinstance(json.loads(text)["note"], str)


def test_complete_value_allows_only_eos_and_finishes(vocab, tokenizer):
    constraint = Constraint(json_schema_grammar({"type": "boolean"}), vocab, 10)
    for token in tokenizer("true", add_special_tokens=False)["input_ids"]:
        assert token in constraint.allowed()
        constraint.advance(token)
    assert constraint.complete and constraint.finished
    assert constraint.allowed() == [tokenizer.eos_token_id]
    number = Constraint(json_schema_grammar({"type": "integer"}), vocab, 10)
    number.advance(tokenizer("7", add_special_tokens=False)["input_ids"][0])
    assert number.complete and not number.finished  # "7" may go on: "71"
    assert tokenizer.eos_token_id in number.allowed()


@pytest.mark.parametrize(
    ("grammar", "check"),
    [
        (regex_grammar(r"[a-c]{2,5}-[0-9]+"), lambda text: re.fullmatch(r"[a-c]{2,5}-[0-9]+", text)),
        (choice_grammar(["positive", "negative", "neutral"]), lambda text: text in ("positive", "negative", "neutral")),
        (lark_grammar('start: "SELECT " COL " FROM t"\nCOL: /[a-z]+/'), lambda text: re.fullmatch("SELECT [a-z]+ FROM t", text)),
        (lark_grammar('root ::= "yes" | "no" | "maybe"'), lambda text: text in ("yes", "no", "maybe")),  # GBNF
    ],
)  # fmt: skip
def test_regex_choice_and_grammar_outputs_match(vocab, tokenizer, grammar, check):
    for seed in range(6):
        text, _, constraint = walk(grammar, vocab, tokenizer, seed, budget=40)
        assert constraint.complete and check(text), text


@pytest.mark.parametrize(
    "schema",
    [{"not": {"type": "string"}}, {"type": "array", "uniqueItems": True}, {"if": {}, "then": {}},
     {"$ref": "http://example.com/schema"}, {"type": "string", "pattern": "a("}, {"type": "tuple"},
     {"type": "string", "minLength": 5, "maxLength": 2}, {"type": "array", "maxItems": "3"}, [1, 2]],
)  # fmt: skip
def test_schemas_that_cannot_be_enforced_are_refused(schema):
    with pytest.raises(SchemaError):
        json_schema_grammar(schema)


def test_bad_regex_choice_and_grammar_are_refused():
    for build in (lambda: regex_grammar("(unclosed"), lambda: choice_grammar([]),
                  lambda: lark_grammar("start: undefined_rule")):  # fmt: skip
        with pytest.raises(SchemaError):
            build()


def _tools(*parameters) -> list[protocol.ChatCompletionTool]:
    names = ["get_weather", "place_order", "chain"]
    return [protocol.ChatCompletionTool(function=protocol.FunctionDefinition(name=names[i], parameters=p))
            for i, p in enumerate(parameters)]  # fmt: skip


@pytest.mark.parametrize("parallel", [False, True])
def test_forced_calls_follow_the_chosen_tools_parameters(vocab, tokenizer, parallel):
    tools = _tools(WEATHER, ORDER, CHAIN)
    schema = calls_schema(tools, parallel)
    grammar = json_schema_grammar(schema)
    by_name = {tool.function.name: tool.function.parameters for tool in tools}
    seen = set()
    for seed in range(10):
        text, _, constraint = walk(grammar, vocab, tokenizer, seed, budget=120)
        assert constraint.complete, text
        calls = forced_calls(text)
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])
            seen.add(call.function.name)
    assert len(seen) >= 2


def test_calls_schema_keeps_each_tools_definitions_apart():
    same_name = {"$defs": {"item": {"type": "integer"}}, "type": "object",
                 "properties": {"x": {"$ref": "#/$defs/item"}}, "required": ["x"]}  # fmt: skip
    schema = calls_schema(_tools(ORDER, same_name, CHAIN), parallel=False)
    defs = schema["$defs"]
    assert {"tool0.$defs.item", "tool1.$defs.item", "tool2"} <= set(defs)
    branches = schema["anyOf"]
    assert branches[1]["properties"]["arguments"]["properties"]["x"] == {"$ref": "#/$defs/tool1.$defs.item"}
    assert branches[2]["properties"]["arguments"]["properties"]["next"]["anyOf"][0] == {
        "$ref": "#/$defs/tool2"
    }
    no_parameters = calls_schema(
        [protocol.ChatCompletionTool(function=protocol.FunctionDefinition(name="now"))], False
    )
    assert no_parameters["properties"]["arguments"]["additionalProperties"] is False


def test_tool_call_parsing():
    calls = forced_calls('{"name":"get_weather","arguments":{"city":"Paris"}}')
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    two = forced_calls('[{"name":"a","arguments":{}},{"name":"b","arguments":{"x":1}}]')
    assert [c.function.name for c in two] == ["a", "b"] and two[0].id != two[1].id
    assert forced_calls('{"name":"get_wea') == []
    assert forced_calls('[{"name":"a","arguments":{}},{"oops":1}]') == []
    content, calls = auto_calls(
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
        ("get_weather",),
    )
    assert [c.function.name for c in calls] == ["get_weather"]
    assert content == 'Let me check. <tool_call>{"name": "unknown", "arguments": {}}</tool_call>'
    assert auto_calls("plain text", ("get_weather",)) == ("plain text", [])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_real_vocabularies(name):
    """Llama 3 (128k) and Qwen2 (152k) tokenizers from llama.cpp's GGUF files (fetched and cached
    on first use, see loadtests/vocabs.py): outputs validate. What a mask costs is measured by
    `python -m loadtests.bench_constrained`, not asserted here."""
    from loadtests.vocabs import real_tokenizer

    tokenizer = real_tokenizer(name)
    vocab = Vocabulary(tokenizer, [tokenizer.eos_token_id])
    assert len(vocab.single) >= 255  # every byte is a token: the closing plan's alphabet
    for schema_name in ("pydantic_nested_optional", "pydantic_discriminated_union", "formats", "json_object"):
        schema = CORPUS[schema_name]
        grammar = json_schema_grammar(schema)
        for seed in range(2):
            text, _, constraint = walk(grammar, vocab, tokenizer, seed, budget=64)
            assert constraint.complete, (schema_name, text)
            jsonschema.validate(json.loads(text), schema or {"type": "object"}, format_checker=FORMATS)

"""Tool calls in each family's format (`gateway.tool_formats`): which format a real tokenizer's
template speaks, and the calls read back from the text its incremental detokenizer streams (with
the special-token markers gone, as the gateway sees them)."""

from __future__ import annotations

import json

import pytest

from gateway.text import IncrementalDetokenizer
from gateway.tool_formats import detect, parse
from tests.real_tokenizers import load_tokenizer

NAMES = ("get_weather", "get_time")
WEATHER = {"city": "Zürich", "note": "雨☔"}
CASES = {  # vocabulary: (format, two calls and some text in that format, content left over)
    "llama3": (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Zürich", "note": "雨☔"}}; '
        '{"name": "get_time", "parameters": {}}',
        None,
    ),
    "qwen2": (
        "hermes",
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "note": "雨☔"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Checking.",
    ),
    "mistral": (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich", "note": "雨☔"}}, '
        '{"name": "get_time", "arguments": {}}]',
        None,
    ),
}


def streamed(tokenizer, text: str) -> str:
    """`text` as the gateway's detokenizer hands it out, token by token."""
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(token) for token in tokenizer.encode(text, add_special_tokens=False)]
    return "".join(pieces) + detok.flush()


@pytest.mark.parametrize("name", list(CASES))
def test_calls_read_from_the_detokenized_stream(name):
    fmt, text, content = CASES[name]
    tokenizer = load_tokenizer(name)
    assert detect(tokenizer) == fmt
    seen = streamed(tokenizer, text)
    got_content, calls = parse(fmt, seen, NAMES)
    assert got_content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", WEATHER),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2
    assert parse(fmt, seen, NAMES, max_calls=1)[1][0].function.name == "get_weather"
    # a call of a tool the request did not give is no call: the text stays content
    assert parse(fmt, seen, ("other",)) == (seen, [])


def test_detect_falls_back_to_hermes():
    tokenizer = load_tokenizer("phi3")  # its GGUF template has no tools
    assert detect(tokenizer) == "hermes"


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("llama3_json", 'I think {"name": "get_weather", "parameters": {}}'),  # not the whole reply
        ("llama3_json", '{"name": "get_weather", "parameters": {'),  # cut off by max_tokens
        ("llama3_json", '{"name": "get_weather", "parameters": [1]}'),
        ("mistral", '[{"name": "get_weather", "arguments": {}}, {"name": "nope", "arguments": {}}]'),
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": '),
        ("mistral", "[1, 2]"),
        ("hermes", '<tool_call>{"name": "get_weather", "arguments": {</tool_call>'),
    ],
)
def test_text_that_is_not_a_call_stays_content(fmt, text):
    assert parse(fmt, text, NAMES) == (text, [])


def test_llama3_arguments_given_as_a_json_string_and_trailing_text():
    content, calls = parse(
        "llama3_json", '{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"} done', NAMES
    )
    assert content == "done"
    assert json.loads(calls[0].function.arguments) == {"tz": "UTC"}

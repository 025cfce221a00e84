"""Real clients against a running gateway (in front of conftest's shared `demo_swarm` of real
processes): the openai Python SDK (sync and async), the official `openai` npm package, `curl -N`, an
editor-style fill-in-the-middle completion stream, LangChain's `ChatOpenAI`, and a schemathesis fuzz
run of the gateway's own OpenAPI schema that must find no 5xx."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import DEMO_MODEL_NAME

MODEL = DEMO_MODEL_NAME
API_KEY = "sk-clients-test"
MESSAGES = [{"role": "user", "content": "Tell me about the swarm."}]
NODE_DIR = Path(__file__).parent / "node"
FUZZ_HOOKS = Path(__file__).parent / "fuzz" / "schemathesis_hooks.py"


@pytest.fixture(scope="module")
def gateway(demo_gateway):
    return demo_gateway("clients", "--api-key", API_KEY)


@pytest.fixture(scope="module")
def base_url(gateway) -> str:
    return gateway.address


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)


# -- openai Python SDK ---------------------------------------------------------------------------
def test_sdk_sync_n_logprobs_stop_seed(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0.9, seed=11, n=2, logprobs=True,
                  top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len(first.choices) == 2
    for choice in first.choices:
        assert len(choice.logprobs.content) == 10
        assert all(len(item.top_logprobs) == 2 for item in choice.logprobs.content)
    assert first.usage.completion_tokens == 20
    # stop: cut at the first occurrence of a piece of the seeded text, and say "stop"
    text = first.choices[0].message.content
    stop = text[3:6]
    cut = client.chat.completions.create(**{**kwargs, "n": 1, "stop": [stop]}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == text[: text.index(stop)]


async def test_sdk_async_concurrent_streams(base_url, client):
    kwargs = dict(model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    prompts = ["Tell me about the river.", "How do I bake bread?", "Where is the station?"]
    expected = [
        client.chat.completions.create(messages=[{"role": "user", "content": p}], **kwargs)
        .choices[0]
        .message.content
        for p in prompts
    ]
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0) as aclient:

        async def one(prompt: str) -> str:
            stream = await aclient.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], stream=True, **kwargs
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        assert await asyncio.gather(*(one(p) for p in prompts)) == expected
        completion = await aclient.completions.create(
            model=MODEL, prompt="The garden", max_tokens=4, n=2, seed=5
        )
        assert len(completion.choices) == 2


# -- the official openai npm package -------------------------------------------------------------
def test_node_openai_package(base_url):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "openai").exists():
        pytest.skip("tests/node/node_modules is missing: run `npm ci --prefix tests/node` once")
    env = {**os.environ, "SWARM_BASE_URL": f"{base_url}/v1", "SWARM_API_KEY": API_KEY, "SWARM_MODEL": MODEL}
    run = subprocess.run(
        [node, "client.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["streamed"] == seen["full"]
    assert (seen["fullFinish"], seen["finish"]) == ("length", "length")
    assert seen["logprobs"] == 8
    assert seen["usage"]["completion_tokens"] == 8
    assert seen["completion"]
    assert seen["notFound"]["status"] == 404 and seen["notFound"]["isNotFound"]
    assert seen["models"] == [MODEL]


# -- curl -N, line by line ----------------------------------------------------------------------
def test_curl_stream_line_by_line(base_url):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}})  # fmt: skip
    # no content type on purpose: `curl -d` sends form encoding, and the gateway must still accept it
    run = subprocess.run(
        [curl, "-N", "-sS", "--fail-with-body", f"{base_url}/v1/chat/completions",
         "-H", f"Authorization: Bearer {API_KEY}", "-d", body],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.split("\n")
    assert lines[-1] == "" and lines[-2] == "", "the stream must end with a blank line"
    events = []
    for i, line in enumerate(lines[:-1]):
        if line == "":
            continue
        assert line.startswith("data: "), line
        assert lines[i + 1] == "", "each event is one data line and a blank line"
        events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] == "length") == 1


# -- an editor's fill-in-the-middle completion stream (Tabby / Continue style) --------------------
def test_editor_fim_completion_stream(base_url):
    body = {"model": MODEL, "prompt": "def area(radius):\n    return ", "suffix": "\n\nprint(area(2))\n",
            "max_tokens": 12, "temperature": 0.1, "stream": True, "presence_penalty": 0.1}  # fmt: skip
    text, finishes = "", []
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {API_KEY}"}) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[len("data: ") :])
            # Tabby breaks on any data line that is not this shape
            assert chunk["object"] == "text_completion"
            assert isinstance(chunk["choices"][0]["text"], str)
            text += chunk["choices"][0]["text"]
            if chunk["choices"][0]["finish_reason"]:
                finishes.append(chunk["choices"][0]["finish_reason"])
    assert finishes in (["length"], ["stop"])
    assert "<fim_" not in text


# -- LangChain --------------------------------------------------------------------------------------
def test_langchain_chat_openai_streaming(base_url):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=f"{base_url}/v1", api_key=API_KEY, max_tokens=8, temperature=0, max_retries=0,
        extra_body={"ignore_eos": True}, stream_usage=True,
    )  # fmt: skip
    chunks = list(llm.stream("Tell me about the swarm."))
    assert len(chunks) >= 2
    streamed = "".join(chunk.content for chunk in chunks)
    assert streamed == llm.invoke("Tell me about the swarm.").content
    assert sum(chunk.usage_metadata["output_tokens"] for chunk in chunks if chunk.usage_metadata) == 8


# -- property-based fuzzing of the OpenAPI schema -----------------------------------------------------
def test_schemathesis_finds_no_5xx(base_url, tmp_path):
    binary = Path(sys.executable).parent / "schemathesis"
    if not binary.exists():
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.schemathesis_hooks", "SWARM_FUZZ_MODEL": MODEL,
           "PYTHONPATH": str(Path(__file__).parents[1])}  # fmt: skip
    run = subprocess.run(
        [str(binary), "run", f"{base_url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "25", "--phases", "examples,coverage,fuzzing", "--workers", "1",
         "-H", f"Authorization: Bearer {API_KEY}", "--seed", "1", "--no-color",
         "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    match = re.search(r"Test cases:\s*(\d+) generated", output)
    assert match and int(match.group(1)) > 50, output[-3000:]
    print(f"schemathesis ran {match.group(1)} test cases")


# -- response_format and tools through the SDK (constrained decoding on a random-weight model) -----
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
        "vip": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "vip"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sdk_response_format_json_schema(client, seed):
    import jsonschema

    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )  # fmt: skip
    jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", [4, 5])
def test_sdk_response_format_json_object_stream(client, seed):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=30, temperature=1.0, seed=seed,
                  response_format={"type": "json_object"})  # fmt: skip
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
    )
    assert streamed == full
    assert isinstance(json.loads(full), dict)


def test_sdk_unsupported_schema_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}},
        )  # fmt: skip
    assert "not" in info.value.message


def test_sdk_tool_choice_required_and_named(client):
    import jsonschema

    for seed in (1, 2):
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=80, seed=seed,
        )  # fmt: skip
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call") and call.type == "function"
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    required = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Time?"}], tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=80, seed=3,
    )  # fmt: skip
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    json.loads(required.choices[0].message.tool_calls[0].function.arguments)


def test_sdk_tool_calls_streamed(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
                  tool_choice="required", max_tokens=80, seed=9)  # fmt: skip
    full = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert finishes == ["tool_calls"]
    assert calls == {0: {"name": full.function.name, "arguments": full.function.arguments}}


def test_sdk_tool_choice_auto_and_tool_history(client):
    """A random model rarely writes a call: "auto" gives plain content; a conversation that holds
    a call and its result renders through the template."""
    messages = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    ]  # fmt: skip
    response = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=6, seed=1
    )
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content is not None or choice.message.tool_calls

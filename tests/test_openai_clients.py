"""Real clients against a running gateway (module-scoped swarm of real processes): the openai
Python SDK (sync and async), the official `openai` npm package, `curl -N`, an editor-style
fill-in-the-middle completion stream, LangChain's `ChatOpenAI`, and a schemathesis fuzz run of
the gateway's own OpenAPI schema that must find no 5xx."""

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

from swarm.launcher import LocalSwarm
from tests.conftest import HEARTBEAT, TTL

MODEL = "swarm-demo"
API_KEY = "sk-clients-test"
MESSAGES = [{"role": "user", "content": "Tell me about the swarm."}]
NODE_DIR = Path(__file__).parent / "node"
FUZZ_HOOKS = Path(__file__).parent / "fuzz" / "schemathesis_hooks.py"


@pytest.fixture(scope="module")
def swarm(demo_model, tmp_path_factory):
    local = LocalSwarm(demo_model, workdir=tmp_path_factory.mktemp("clients"), heartbeat=HEARTBEAT, ttl=TTL,
                       model_name=MODEL)  # fmt: skip
    try:
        local.start_dht()
        local.start_peers([(0, 2), (2, 4)], "--threads", "1")
        local.start_gateway(None, "--api-key", API_KEY)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def base_url(swarm) -> str:
    return swarm.children[-1].address


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

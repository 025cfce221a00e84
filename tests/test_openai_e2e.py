"""The OpenAI SDK (sync and async, streaming and not), raw SSE and curl-style checks, and the
error cases, against a gateway running in its own process in front of a real 2-peer swarm."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import DEMO_MODEL_NAME

MODEL = DEMO_MODEL_NAME
MESSAGES = [{"role": "user", "content": "Tell me about the swarm."}]


@pytest.fixture(scope="module")
def gateway(demo_gateway, tiny_model):
    """A gateway in front of the shared demo swarm that also knows a model nobody serves."""
    return demo_gateway("e2e", "--model", str(tiny_model), "--model-name", "unserved-model")


@pytest.fixture(scope="module")
def base_url(gateway) -> str:
    return gateway.address


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_only_covered_models(client):
    ids = [model.id for model in client.models.list().data]
    assert ids == [MODEL]


def test_sync_chat_non_stream(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == MODEL
    choice = response.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_sync_chat_stream_equals_non_stream(client):
    kwargs = dict(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == full.choices[0].message.content
    finishes = [
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 16


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=1234,
                  extra_body={"ignore_eos": True})  # fmt: skip
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    other = client.chat.completions.create(**{**kwargs, "seed": 99}).choices[0].message.content
    assert first == second
    assert first != other


async def test_async_chat_stream_and_not(base_url):
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    kwargs = dict(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    full = await client.chat.completions.create(**kwargs)
    pieces = []
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == full.choices[0].message.content
    await client.close()


def test_completions_stream_and_not(client):
    kwargs = dict(
        model=MODEL, prompt="The swarm", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kwargs)
    assert full.object == "text_completion"
    assert full.id.startswith("cmpl-")
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs))
    assert streamed == full.choices[0].text
    assert full.choices[0].finish_reason == "length"


def test_raw_sse_format(base_url):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = list(response.iter_lines())
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: ") :]) for line in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for payload in payloads:
        assert payload["object"] == "chat.completion.chunk"
        assert payload["id"] == payloads[0]["id"]
        assert payload["model"] == MODEL
        assert isinstance(payload["created"], int)
    content = [p for p in payloads[1:] if p["choices"] and "content" in p["choices"][0]["delta"]]
    assert content, "no content chunks"
    finish = [p for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 5
    # blank line after every event, as SSE requires
    assert lines.count("") >= len(events) - 1


def test_routes_without_v1_prefix(base_url):
    response = httpx.post(
        f"{base_url}/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    )
    assert response.status_code == 200
    assert httpx.get(f"{base_url}/models").json()["data"][0]["id"] == MODEL


# -- bad input: the right status and error object, and the gateway keeps serving ----------------
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def test_malformed_json(base_url):
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert _error(response, 400)["type"] == "invalid_request_error"


def test_missing_field(base_url):
    error = _error(httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL}), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"


def test_unknown_model(base_url, client):
    error = _error(
        httpx.post(f"{base_url}/v1/chat/completions", json={"model": "nope", "messages": MESSAGES}), 404
    )
    assert error["message"] == "The model `nope` does not exist."
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)


def test_context_too_long(base_url):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100_000}
    error = _error(httpx.post(f"{base_url}/v1/chat/completions", json=body), 400)
    assert "maximum context length" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_no_route_is_503_with_retry_after(base_url):
    body = {"model": "unserved-model", "messages": MESSAGES, "max_tokens": 2}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
    error = _error(response, 503)
    assert int(response.headers["retry-after"]) >= 1
    assert error["type"]


def test_gateway_still_serves_after_errors(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert response.choices[0].message.content is not None

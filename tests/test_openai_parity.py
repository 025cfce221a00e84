"""OpenAI API parity against a live gateway (real peers, real DHT, real gRPC): the parameters real
clients send, the shapes they read back, disconnects, auth and size limits.

The shared demo swarm (conftest `demo_swarm`) serves every test through this module's gateway, which
requires an API key, as a deployment would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket

import httpx
import openai
import pytest

from common.peer_client import ChannelPool, peer_info
from tests.conftest import DEMO_MODEL_NAME, wait_until

MODEL = DEMO_MODEL_NAME
NO_FIM = "no-fim"
API_KEY = "sk-parity-test"
AUTH = {"authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "Tell me about the swarm."}]


@pytest.fixture(scope="module")
def no_fim_model(demo_model, tmp_path_factory):
    """The demo model's tokenizer and config with the fill-in-the-middle tokens renamed away."""
    folder = tmp_path_factory.mktemp("nofim") / "no-fim"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = demo_model / name
        if source.exists():
            (folder / name).write_text(source.read_text().replace("<fim_", "<nofim_"))
    if (demo_model / "generation_config.json").exists():
        shutil.copy(demo_model / "generation_config.json", folder)
    return folder


@pytest.fixture(scope="module")
def gateway(demo_gateway, no_fim_model):
    return demo_gateway("parity", "--api-key", API_KEY, "--model", str(no_fim_model), "--model-name", NO_FIM)


@pytest.fixture(scope="module")
def base_url(gateway) -> str:
    return gateway.address


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)


def _post(base_url: str, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, headers=AUTH, timeout=60, **kwargs)


def _sse(base_url: str, path: str, body: dict) -> list[dict]:
    """The JSON payloads of a stream, checking the SSE framing and the final [DONE]."""
    with httpx.stream("POST", f"{base_url}{path}", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)
    return [json.loads(line[len("data: ") :]) for line in events[:-1]]


# -- sampling semantics -------------------------------------------------------------------------
def test_penalties_count_only_generated_tokens(client):
    """OpenAI's presence/frequency penalties count completion tokens only: the first token's
    distribution (logprobs are reported after penalties) must not change with them."""
    kwargs = dict(
        model=MODEL, prompt="The swarm the swarm the swarm", max_tokens=1, temperature=0, logprobs=5
    )
    plain = client.completions.create(**kwargs).choices[0].logprobs
    penalized = (
        client.completions.create(presence_penalty=2.0, frequency_penalty=2.0, **kwargs).choices[0].logprobs
    )
    assert penalized.tokens == plain.tokens
    assert penalized.token_logprobs[0] == pytest.approx(plain.token_logprobs[0], abs=1e-5)
    assert penalized.top_logprobs[0] == pytest.approx(plain.top_logprobs[0], abs=1e-5)
    # ...while later tokens do feel them: a strong frequency penalty changes a greedy continuation
    long = dict(kwargs, max_tokens=24, extra_body={"ignore_eos": True})
    base_text = client.completions.create(**long).choices[0].text
    repeated = client.completions.create(frequency_penalty=-2.0, **long).choices[0].text
    assert repeated != base_text


def test_n_streamed_interleaved_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=7, n=3,
                  extra_body={"ignore_eos": True})  # fmt: skip
    full = client.chat.completions.create(**kwargs)
    assert [choice.index for choice in full.choices] == [0, 1, 2]
    texts = ["", "", ""]
    order = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.content:
                order.append(choice.index)
    assert texts == [choice.message.content for choice in full.choices]
    assert len(set(texts)) > 1, "choices with seeds seed+i should differ"
    assert order != sorted(order), "choices should stream interleaved, not one after another"


def test_stop_across_token_boundary(client):
    kwargs = dict(model=MODEL, prompt="The river starts", max_tokens=16, temperature=0, logprobs=0,
                  extra_body={"ignore_eos": True})  # fmt: skip
    full = client.completions.create(**kwargs).choices[0]
    tokens = full.logprobs.tokens
    assert "".join(tokens) == full.text
    # a stop made of the end of one token and the start of the next, never generated whole
    k = next(i for i in range(2, len(tokens) - 1) if tokens[i].strip() and tokens[i + 1].strip())
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    expected = full.text[: full.text.index(stop)]
    cut = client.completions.create(**{**kwargs, "stop": [stop, "\u2603never"]}).choices[0]
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    streamed = list(client.completions.create(stream=True, **{**kwargs, "stop": stop}))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == ["stop"]


def test_chat_logprobs_shapes_stream_and_not(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                  extra_body={"ignore_eos": True})  # fmt: skip
    full = client.chat.completions.create(**kwargs).choices[0]
    content = full.logprobs.content
    assert len(content) == 8
    for item in content:
        assert len(item.top_logprobs) == 3
        assert [alt.logprob for alt in item.top_logprobs] == sorted(
            (alt.logprob for alt in item.top_logprobs), reverse=True
        )
        assert item.top_logprobs[0].token == item.token  # greedy picks the best
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert bytes(item.bytes).decode("utf-8", errors="backslashreplace") == item.token
        assert item.logprob <= 0
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(i.token, round(i.logprob, 4)) for i in streamed] == [
        (i.token, round(i.logprob, 4)) for i in content
    ]


def test_completion_logprobs_and_echo(client):
    kwargs = dict(model=MODEL, prompt="Bake it in", max_tokens=6, temperature=0, logprobs=2,
                  extra_body={"ignore_eos": True})  # fmt: skip
    choice = client.completions.create(**kwargs).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    # each plain token appears in the text in order, leading space included (TokenPieces); a
    # random model also emits special tokens (not in the text) and bytes of broken characters
    position = 0
    for token in lp.tokens:
        if token.isascii() and "\\x" not in token and not (token.startswith("<") and token.endswith(">")):
            position = choice.text.index(token, position) + len(token)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(top) <= 2 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    echoed = client.completions.create(echo=True, **kwargs).choices[0]
    assert echoed.text == "Bake it in" + choice.text
    # the prompt's entries come first (see test_echo_with_max_tokens_zero_scores_the_prompt), then these
    prompt = len(echoed.logprobs.tokens) - 6
    assert "".join(echoed.logprobs.tokens[:prompt]) == "Bake it in"
    assert echoed.logprobs.tokens[prompt:] == lp.tokens
    assert echoed.logprobs.text_offset[prompt:] == [len("Bake it in") + offset for offset in lp.text_offset]
    assert echoed.logprobs.token_logprobs[prompt:] == pytest.approx(lp.token_logprobs, abs=1e-5)


def _check_prompt_entries(choice, prompt: str, top: int) -> int:
    """The echoed prompt's entries at the head of `choice.logprobs`; returns how many there are."""
    lp = choice.logprobs
    count = next(i for i in range(len(lp.tokens) + 1) if "".join(lp.tokens[:i]) == prompt)
    assert count >= 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes it
    for i in range(1, count):
        assert lp.token_logprobs[i] <= 0
        assert len(lp.top_logprobs[i]) == top
        best = max(lp.top_logprobs[i].values())
        assert lp.token_logprobs[i] <= best + 1e-6
        if lp.tokens[i] in lp.top_logprobs[i]:
            assert lp.top_logprobs[i][lp.tokens[i]] == lp.token_logprobs[i]
    for token, offset in zip(lp.tokens[:count], lp.text_offset[:count], strict=True):
        assert choice.text[offset : offset + len(token)] == token
    return count


def test_echo_with_max_tokens_zero_scores_the_prompt(client):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs 1, no generation at all."""
    prompt = "The swarm serves a model split across peers"
    reply = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0, temperature=0
    )
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason) == (prompt, "length")
    assert reply.usage.completion_tokens == 0
    assert (
        _check_prompt_entries(choice, prompt, 1) == len(choice.logprobs.tokens) == reply.usage.prompt_tokens
    )
    # the scores do not depend on what follows: generating after the same prompt gives the same
    longer = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=2, temperature=0
    )
    count = reply.usage.prompt_tokens
    assert longer.choices[0].logprobs.token_logprobs[1:count] == pytest.approx(
        choice.logprobs.token_logprobs[1:], abs=1e-5
    )
    # echo alone: the prompt back, nothing generated
    bare = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0)
    assert (bare.choices[0].text, bare.choices[0].logprobs, bare.usage.completion_tokens) == (prompt, None, 0)
    # ... and without echo there is nothing to return: a 400 naming the parameter
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=prompt, logprobs=1, max_tokens=0)
    assert refused.value.body["param"] == "max_tokens"
    assert "echo" in refused.value.body["message"]


def test_echo_with_logprobs_streams_the_prompt_entries_first(client):
    prompt = "Bake the bread in the oven"
    kwargs = dict(model=MODEL, prompt=prompt, echo=True, logprobs=3, max_tokens=6, temperature=0,
                  extra_body={"ignore_eos": True})  # fmt: skip
    full = client.completions.create(**kwargs).choices[0]
    count = _check_prompt_entries(full, prompt, 3)
    lp = full.logprobs
    assert len(lp.tokens) == count + 6
    assert lp.text_offset[count] == len(prompt)
    assert full.text.startswith(prompt)
    chunks = [chunk.choices[0] for chunk in client.completions.create(stream=True, **kwargs)]
    # the first chunk is the echoed prompt with the prompt's entries, before any generated one
    assert chunks[0].text == prompt
    assert chunks[0].logprobs.tokens == lp.tokens[:count]
    assert chunks[0].logprobs.token_logprobs[0] is None
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        if chunk.logprobs:
            for name, values in streamed.items():
                values.extend(getattr(chunk.logprobs, name))
    assert "".join(chunk.text for chunk in chunks) == full.text
    assert [chunk.finish_reason for chunk in chunks if chunk.finish_reason] == [full.finish_reason]
    assert streamed["tokens"] == lp.tokens
    assert streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert streamed["top_logprobs"][0] is None
    for got, want in zip(streamed["top_logprobs"][1:], lp.top_logprobs[1:], strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_prompt_as_list_of_strings_and_token_ids(base_url, demo_model):
    from transformers import AutoTokenizer

    body = {"model": MODEL, "prompt": ["Hello! How", "The garden"], "max_tokens": 5, "temperature": 0, "n": 2,
            "ignore_eos": True}  # fmt: skip
    reply = _post(base_url, "/v1/completions", body).json()
    texts = [c["text"] for c in reply["choices"]]
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: the n copies of a prompt agree
    assert texts[0] != texts[2]
    assert reply["usage"]["completion_tokens"] == 20
    # the same prompt as token ids (one list, and a list of lists) gives the same greedy text
    token_ids = AutoTokenizer.from_pretrained(demo_model)("Hello! How")["input_ids"]
    by_ids = _post(base_url, "/v1/completions", {**body, "prompt": token_ids, "n": 1}).json()
    assert by_ids["choices"][0]["text"] == texts[0]
    both = _post(base_url, "/v1/completions", {**body, "prompt": [token_ids, token_ids], "n": 1}).json()
    assert [c["text"] for c in both["choices"]] == [texts[0]] * 2


def test_suffix_fill_in_the_middle(base_url, client):
    stream = _sse(base_url, "/v1/completions", {"model": MODEL, "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))",
                                                "max_tokens": 6, "temperature": 0.2, "stream": True,
                                                "presence_penalty": 0.5})  # fmt: skip
    assert all(p["object"] == "text_completion" for p in stream)
    assert [p["choices"][0]["finish_reason"] for p in stream if p["choices"][0]["finish_reason"]] in (
        ["length"],
        ["stop"],
    )
    response = _post(
        base_url, "/v1/completions", {"model": NO_FIM, "prompt": "x", "suffix": "y", "max_tokens": 2}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "suffix" and "fill-in-the-middle" in error["message"]


def test_include_usage_completions_stream(base_url):
    body = {"model": MODEL, "prompt": "The lighthouse", "max_tokens": 4, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    payloads = _sse(base_url, "/v1/completions", body)
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"]["completion_tokens"] == 4
    assert all("usage" not in p or p["usage"] is None for p in payloads[:-1])


def test_unknown_fields_ignored_and_logged(base_url, gateway):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "frobnicate_level": 3}
    assert _post(base_url, "/v1/chat/completions", body).status_code == 200
    assert (
        _post(base_url, "/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}).status_code == 200
    )
    wait_until(lambda: "frobnicate_level" in gateway.log(), 5)
    assert "ignoring unknown request fields: frobnicate_level" in gateway.log()


# -- disconnects, auth, limits -------------------------------------------------------------------
def test_client_disconnect_frees_every_peer(base_url, demo_swarm):
    peers = [child.address for child in demo_swarm.children if child.name.startswith("peer")]
    assert len(peers) == 2
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    # a raw socket so that closing it really drops the TCP connection mid-stream
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received = b""
    while received.count(b"data: ") < 3:  # the role chunk and two content chunks
        data = sock.recv(65536)
        assert data, "the gateway closed the stream early"
        received += data
    assert b"200 OK" in received.split(b"\r\n", 1)[0]

    async def live_sessions() -> list[int]:
        pool = ChannelPool()
        try:
            return [(await peer_info(pool, address)).live_sessions for address in peers]
        finally:
            await pool.close()

    assert asyncio.run(live_sessions()) != [0, 0], "the stream should hold a session on the peers"
    sock.close()
    # 30 s: a bound for a loaded machine; it takes well under a second
    wait_until(lambda: asyncio.run(live_sessions()) == [0, 0], 30)
    sessions = asyncio.run(live_sessions())
    assert sessions == [0, 0]


def test_api_key_required(base_url):
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    wrong = httpx.get(f"{base_url}/v1/models", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{base_url}/health").status_code == 200  # probes need no key


def test_oversized_body_is_413(base_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    response = _post(base_url, "/v1/chat/completions", body)
    assert response.status_code == 413
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_still_serving(client):
    assert (
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        .choices[0]
        .message.content
        is not None
    )


def test_over_the_concurrency_limit_is_429_with_retry_after(demo_gateway):
    """A gateway past --max-concurrent answers 429 at once (the SDK retries it), and recovers."""
    # long enough that it cannot finish before the second request arrives (the client stops reading,
    # so the full socket buffers hold the stream back as well)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    limited = demo_gateway("limited", "--max-concurrent", "1")  # its own gateway (conftest.demo_gateway)
    with httpx.stream("POST", f"{limited.address}/v1/chat/completions", json=body, timeout=60) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped iterator would close the stream
        next(lines)  # the first generation is now in flight
        refused = httpx.post(
            f"{limited.address}/v1/chat/completions",
            json={**body, "stream": False, "max_tokens": 2},
            timeout=30,
        )
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 1
    small = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}

    def small_status() -> int:
        return httpx.post(f"{limited.address}/v1/chat/completions", json=small, timeout=30).status_code

    status = wait_until(lambda: (code := small_status()) != 429 and code, 10)
    assert status, "the slot of the finished stream was never released"
    assert status == 200

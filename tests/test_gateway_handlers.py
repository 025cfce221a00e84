"""The gateway's handlers in process: `create_app` with a fake swarm view (records handed in, no
DHT) and a fake session store (a dict), in front of two real peers serving gRPC in this process.
Exactness against `transformers` on the same weights; the multi-process tests cover the rest."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from discovery.records import PeerRecord
from gateway.app import create_app
from gateway.sessions import Pin
from gateway.settings import GatewaySettings
from gateway.swarm_view import SwarmView
from peer.server import PeerConfig, PeerServer

MODEL = "m"
SPANS = [(0, 2), (2, 4)]


class FakeSwarm(SwarmView):
    """The swarm view with its records handed in instead of looked up in a DHT."""

    def __init__(self, records: list[PeerRecord]):
        super().__init__(dht=None)
        self.records = records

    async def peers(self, model: str, fresh: bool = False, timeout: float | None = None) -> list[PeerRecord]:
        return [record for record in self.records if record.model == model]

    def known(self, model: str) -> list[PeerRecord]:
        return [record for record in self.records if record.model == model]


class FakeSessions:
    """The session store as a dict."""

    backend = "fake"
    errors = 0
    available = True

    def __init__(self):
        self.pins: dict[str, Pin] = {}

    async def get(self, key: str) -> Pin | None:
        return self.pins.get(key)

    async def put(self, key: str, pin: Pin) -> None:
        self.pins[key] = pin

    async def delete(self, key: str) -> None:
        self.pins.pop(key, None)

    async def close(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def in_process_peers(model_dir, cache_tokens: int):
    """Real peers of `SPANS` in this process (no DHT), stopped without draining."""
    servers = []
    try:
        for start, end in SPANS:
            config = PeerConfig(
                model_dir=model_dir, model_id=MODEL, start=start, end=end, port=free_port(),
                dht_bootstrap=None, cache_tokens=cache_tokens, threads=1,
            )  # fmt: skip
            server = PeerServer(config)
            await server.start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.config.drain_timeout = 0.0
            await server.stop()


@pytest_asyncio.fixture
async def peers(demo_model):
    # room for the 16 concurrent tool-call requests of test_structured_outputs (~320 tokens each)
    async with in_process_peers(demo_model, cache_tokens=16384) as servers:
        yield servers


@contextlib.asynccontextmanager
async def app_in_process(peers, demo_model, **settings):
    """(client, fake swarm, fake sessions, the app) of a gateway app in this process."""
    records = [server.record() for server in peers]
    swarm, sessions = FakeSwarm(records), FakeSessions()
    app = create_app(
        GatewaySettings(models={MODEL: str(demo_model)}, **settings), swarm=swarm, sessions=sessions
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, swarm, sessions, app


@pytest_asyncio.fixture
async def gateway(peers, demo_model):
    """(client, fake swarm, fake sessions) of an app in this process."""
    async with app_in_process(peers, demo_model) as (client, swarm, sessions, _):
        yield client, swarm, sessions


@pytest.fixture(scope="module")
def reference(demo_model):
    model = AutoModelForCausalLM.from_pretrained(demo_model, torch_dtype=torch.float32)
    model.eval()
    return model


def greedy_ids(reference, prompt_ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


def sse_data(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


async def test_completion_is_exact_streamed_and_not(gateway, reference):
    client, swarm, _ = gateway
    prompt = [5, 17, 42, 99, 7]
    expected = greedy_ids(reference, prompt, 8)
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
    }
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    served = response.headers["x-swarm-route"].split(",")
    assert served == [record.peer_id for record in swarm.records]
    tok = AutoTokenizer.from_pretrained(reference.name_or_path)
    text = data["choices"][0]["text"]
    whole = tok.decode(prompt + expected)
    assert whole == tok.decode(prompt) + text
    streamed = await client.post("/v1/completions", json={**body, "stream": True})
    assert streamed.status_code == 200
    chunks = sse_data(streamed.text)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_chat_pins_the_conversation_and_streams_the_same_text(gateway):
    client, swarm, sessions = gateway
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
        "temperature": 0.8, "seed": 3,
    }  # fmt: skip
    response = await client.post("/v1/chat/completions", json=body, headers={"x-session-id": "conv-1"})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["finish_reason"] in ("stop", "length")
    pin = sessions.pins["conv-1"]
    assert [hop.peer_id for hop in pin.route] == [record.peer_id for record in swarm.records]
    assert len(pin.tokens) >= data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"] - 1
    streamed = await client.post(
        "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    chunks = sse_data(streamed.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == data["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == data["usage"]


async def test_errors_are_openai_objects(gateway):
    client, swarm, _ = gateway
    cases = [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": MODEL, "prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 100_000}, 400, "max_tokens"),
    ]
    for body, status, param in cases:
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    # no peers: 503 with Retry-After, streamed or not
    records, swarm.records = swarm.records, []
    try:
        for stream in (False, True):
            response = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream},
            )
            assert response.status_code == 503 and response.headers["retry-after"]
            assert response.json()["error"]["type"] == "unavailable_error"
    finally:
        swarm.records = records
    assert (
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    ).status_code == 200


async def test_a_peer_failing_mid_stream_reaches_the_client_as_an_error_event(gateway, peers):
    """With no replacement, a dead hop ends the stream with an OpenAI error event and [DONE]."""
    client, swarm, _ = gateway
    await peers[1].server.stop(grace=0)
    started = time.monotonic()
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True}
    )
    events = sse_data(response.text)
    assert events[-1]["error"]["type"] == "unavailable_error"
    assert time.monotonic() - started < 30


# -- hardening: no single request or client takes the service down ---------------------------


async def test_poison_sampling_parameters_neither_fail_nor_ban(gateway):
    """A temperature that underflows is greedy (it made the last span's logits infinite and failed
    the whole batched pass); a repetition penalty below the safe floor is a 400; nobody is banned."""
    client, _, _ = gateway
    body = {"model": MODEL, "prompt": "Hello there my friend", "max_tokens": 6, "ignore_eos": True}
    greedy = (await client.post("/v1/completions", json={**body, "temperature": 0})).json()
    for temperature in (1e-45, 1e-40, 1e-7):
        response = await client.post("/v1/completions", json={**body, "temperature": temperature})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
    response = await client.post("/v1/completions", json={**body, "repetition_penalty": 1e-38})
    assert response.status_code == 400 and response.json()["error"]["param"] == "repetition_penalty"
    gw = client._transport.app.state.gateway
    assert gw.policy.excluded() == set()


async def test_a_huge_stop_string_is_refused_and_matching_memory_is_linear(gateway):
    import tracemalloc

    from gateway.text import StopMatcher

    client, _, _ = gateway
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "stop": ["x" * (1 << 20)]}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    # The matcher itself: a 20,000-character stop cost ~200 MB when every prefix was kept.
    tracemalloc.start()
    matcher = StopMatcher(["ab" * 10_000])
    text, stopped = matcher.feed("zz" + "ab" * 9_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (text, stopped) == ("zz", False) and peak < 1 << 20
    assert matcher.feed("ab" * 1_000 + "tail") == ("", True)


async def test_a_chunked_body_past_the_limit_gets_413_before_it_is_read(peers, demo_model):
    async with app_in_process(peers, demo_model, max_body_bytes=64 * 1024) as (client, *_):
        sent = 0

        async def body():
            nonlocal sent
            yield b'{"model": "m", "prompt": "'
            for _ in range(1024):  # 64 MiB if it were all read
                sent += 1
                yield b"x" * 65536

        response = await client.post(
            "/v1/completions", content=body(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
        assert sent < 16, "the body was read far past the limit"
        small = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert small.status_code == 200


async def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(gateway, monkeypatch):
    """4 MB of text cannot fit a 2048-token context whatever its tokens: 400 at once (tokenizing
    it first cost seconds and ~1 GB of gateway memory per request)."""
    import gateway.serving.chat as serving_chat
    import gateway.serving.completion as serving_completion

    client, _, _ = gateway
    calls = []

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(serving_chat, "render_chat", counted(serving_chat.render_chat))
    monkeypatch.setattr(serving_completion, "tokenize_prompts", counted(serving_completion.tokenize_prompts))
    for path, body in (
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 800_000, "max_tokens": 1}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "word " * 800_000}]},
        ),
    ):
        response = await client.post(path, json=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []
    small = await client.post("/v1/completions", json={"model": MODEL, "prompt": "word", "max_tokens": 1})
    assert small.status_code == 200 and calls == ["tokenize_prompts"]  # the counting works


async def test_big_prompt_work_leaves_a_thread_for_small_prompts():
    """At most one big prompt is worked on at a time: a small one sent after four big ones is
    done while they still wait their turn."""
    from gateway.prompt_work import LARGE_CHARS, PromptWork

    work = PromptWork()
    finished: list[str] = []

    def job(name: str, seconds: float) -> None:
        time.sleep(seconds)
        finished.append(name)

    try:
        big = [asyncio.create_task(work.run(LARGE_CHARS + 1, job, f"big{i}", 0.2)) for i in range(4)]
        await asyncio.sleep(0)
        await work.run(10, job, "small", 0.0)
        await asyncio.gather(*big)
    finally:
        work.close()
    assert finished.index("small") <= 1, finished


async def test_models_retrieve_with_the_openai_sdk(gateway):
    from openai import AsyncOpenAI, NotFoundError

    client, _, _ = gateway
    sdk = AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=client)
    card = await sdk.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(NotFoundError):
        await sdk.models.retrieve("no-such-model")
    assert (await client.get(f"/models/{MODEL}")).status_code == 200  # without /v1 too


async def test_the_api_key_guards_the_operator_pages_unless_opened(peers, demo_model):
    key = {"authorization": "Bearer sekret"}
    async with app_in_process(peers, demo_model, api_key="sekret") as (client, *_):
        for path in ("/metrics", "/swarm", "/swarm/api", "/openapi.json", "/docs", "/v1/models"):
            denied = await client.get(path)
            assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error", (
                path
            )
            assert (await client.get(path, headers=key)).status_code == 200, path
        assert (await client.get("/metrics", headers={"authorization": "Bearer wrong"})).status_code == 403
        assert (await client.get("/health")).status_code == 200
    async with app_in_process(peers, demo_model, api_key="sekret", open_ops=True) as (client, *_):
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401


async def test_a_session_id_is_scoped_by_key_and_its_capability_is_not_stored(gateway):
    client, _, sessions = gateway
    gw = client._transport.app.state.gateway
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "seed": 1}
    alice = {"x-session-id": "shared-id", "authorization": "Bearer alice"}
    mallory = {"x-session-id": "shared-id", "authorization": "Bearer mallory"}
    assert (await client.post("/v1/chat/completions", json=body, headers=alice)).status_code == 200
    [(alice_key, alice_pin)] = sessions.pins.items()
    other = {**body, "messages": [{"role": "user", "content": "something else entirely"}]}
    assert (await client.post("/v1/chat/completions", json=other, headers=mallory)).status_code == 200
    assert sessions.pins[alice_key] is alice_pin and len(sessions.pins) == 2  # untouched
    capability = gw.peer_session_id(alice_pin.session_nonce)
    assert capability not in alice_pin.to_json() and "alice" not in alice_key


async def test_a_peer_banned_after_a_stall_is_readmitted_when_it_answers(gateway, peers):
    """Never 503 while a banned peer that answers could serve the model."""
    client, swarm, _ = gateway
    gw = client._transport.app.state.gateway
    from common.peer_client import PeerError

    for record in swarm.records:  # as if each had missed a step deadline once
        gw.policy.peer_failed(record.peer_id, PeerError(record.address, None, "no answer within 10.0 s"))
    assert gw.policy.excluded() == {record.peer_id for record in swarm.records}
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert gw.policy.excluded() == set()

"""A gateway that knows its users, with real processes: two gateway replicas sharing a real
redis-server (`--redis-keys`) in front of the demo swarm, keys made with `swarm keys`, the real
OpenAI SDK as the client. Per-key RPM / TPM limits and credit across both replicas at once, the
`x-ratelimit-*` headers, usage equal to the `usage` the client got, revoked / expired keys, a key
revoked mid-stream, a model the key may not use, and the operator pages behind the admin key."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from gateway.keys import RedisKeyStore, new_key
from tests.conftest import DEMO_MODEL_NAME, RedisServer

pytestmark = pytest.mark.slow

ADMIN = "admin-secret"
PROMPT = [5, 17, 42, 99]  # token ids: exactly 4 prompt tokens
MAX_TOKENS = 16  # each request reserves 4 + 16 = 20 tokens


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("users-redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def replicas(demo_gateway, redis_url) -> list[str]:
    flags = ("--redis-url", redis_url, "--redis-keys", "--api-key", ADMIN, "--session-secret", "shared",
             "--key-check-interval", "0.1")  # fmt: skip
    return [demo_gateway(f"users-{name}", *flags).address for name in "ab"]


def swarm_keys(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarm.cli", "--log-level", "WARNING", "keys", args[0], "--redis-url", redis_url,
         *args[1:]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def make_key(redis_url: str, **limits) -> tuple[str, str]:
    """(id, secret) of a new key in the shared store (what `swarm keys create` does, in process)."""
    key, secret = new_key("test", **limits)

    async def add():
        store = RedisKeyStore(redis_url)
        try:
            await store.add(key)
        finally:
            await store.close()

    with ThreadPoolExecutor(1) as thread:  # callable from a test's running event loop too
        thread.submit(asyncio.run, add()).result()
    return key.id, secret


def sdk(base: str, secret: str, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0, **kwargs)


async def complete(base: str, secret: str, **extra):
    async with sdk(base, secret) as client:
        return await client.completions.with_raw_response.create(
            model=DEMO_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True}, **extra,
        )  # fmt: skip


async def attempt(base: str, secret: str):
    """The raw response of a completion, or the SDK's error for it."""
    try:
        return await complete(base, secret)
    except openai.APIStatusError as exc:
        return exc


def usage_of(base: str, secret: str) -> dict:
    response = httpx.get(f"{base}/v1/usage", headers={"authorization": f"Bearer {secret}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_cli_creates_lists_revokes_and_reports_usage(replicas, redis_url):
    created = swarm_keys(redis_url, "create", "--name", "cli-key", "--rpm", "7", "--model", DEMO_MODEL_NAME)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    key_id = created.stderr.split()[1]
    assert secret.startswith("sk-swarm-") and key_id.startswith("key_")
    listed = swarm_keys(redis_url, "list", "--json")
    [entry] = [item for item in json.loads(listed.stdout) if item["id"] == key_id]
    assert entry["rpm"] == 7 and entry["models"] == [DEMO_MODEL_NAME] and secret not in listed.stdout
    response = asyncio.run(complete(replicas[0], secret))
    assert response.headers["x-ratelimit-limit-requests"] == "7"
    usage = json.loads(swarm_keys(redis_url, "usage", key_id, "--json").stdout)
    [result] = usage["data"][0]["results"]
    assert result["num_model_requests"] == 1 and result["model"] == DEMO_MODEL_NAME
    assert result["input_tokens"] == len(PROMPT) and result["output_tokens"] == MAX_TOKENS
    assert swarm_keys(redis_url, "revoke", key_id).returncode == 0
    for base in replicas:  # both replicas see it at once
        with pytest.raises(openai.AuthenticationError, match="revoked"):
            asyncio.run(complete(base, secret))


async def test_requests_per_minute_across_replicas(replicas, redis_url):
    _, secret = make_key(redis_url, rpm=3)  # one request back every 20 s: none within this test
    answers = [await attempt(replicas[i % 2], secret) for i in range(4)]
    remaining = [answer.headers["x-ratelimit-remaining-requests"] for answer in answers[:3]]
    assert remaining == ["2", "1", "0"]
    assert all(answer.headers["x-ratelimit-limit-requests"] == "3" for answer in answers[:3])
    refused = answers[3]
    assert isinstance(refused, openai.RateLimitError)
    assert refused.code == "rate_limit_exceeded" and refused.type == "requests"
    headers = refused.response.headers
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s") and int(headers["retry-after"]) >= 1


async def test_tokens_per_minute_from_two_replicas_at_once_never_overspend(replicas, redis_url):
    tpm = 100  # room for 5 reservations of 20 tokens (the bucket refills 1.7 tokens a second)
    key_id, secret = make_key(redis_url, tpm=tpm)
    started = time.monotonic()
    answers = await asyncio.gather(*(attempt(replicas[i % 2], secret) for i in range(12)))
    elapsed = time.monotonic() - started
    served = [answer for answer in answers if not isinstance(answer, Exception)]
    refused = [answer for answer in answers if isinstance(answer, Exception)]
    spent = sum(answer.parse().usage.total_tokens for answer in served)
    assert spent <= tpm + tpm * elapsed / 60 + MAX_TOKENS + len(PROMPT)  # at most one request over
    assert len(served) >= 5 and refused
    for error in refused:
        assert isinstance(error, openai.RateLimitError) and error.code == "rate_limit_exceeded", error
        assert error.type == "tokens" and error.response.headers["x-ratelimit-limit-tokens"] == str(tpm)
        assert int(error.response.headers["x-ratelimit-remaining-tokens"]) < MAX_TOKENS + len(PROMPT)
    for answer in served:
        assert answer.headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert usage_of(replicas[0], secret)["key"]["usage"]["num_model_requests"] == len(served)


async def test_credit_runs_out_with_insufficient_quota_and_is_never_overspent(replicas, redis_url):
    credit = 90  # 4 requests of 20 tokens, then 10 left: not enough for a fifth
    key_id, secret = make_key(redis_url, credits=credit)
    answers = await asyncio.gather(*(attempt(replicas[i % 2], secret) for i in range(10)))
    served = [answer for answer in answers if not isinstance(answer, Exception)]
    refused = [answer for answer in answers if isinstance(answer, Exception)]
    assert len(served) == 4
    for error in refused:
        assert isinstance(error, openai.RateLimitError) and error.status_code == 429
        assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
        assert error.response.headers["x-should-retry"] == "false"
    spent = sum(answer.parse().usage.total_tokens for answer in served)
    page = usage_of(replicas[1], secret)
    assert page["key"]["credits_remaining"] == credit - spent == 10
    short = await attempt(replicas[0], secret)  # a request that fits the balance still passes
    assert isinstance(short, openai.RateLimitError)
    async with sdk(replicas[0], secret) as client:
        fits = await client.completions.create(model=DEMO_MODEL_NAME, prompt=PROMPT, max_tokens=6)
    assert usage_of(replicas[0], secret)["key"]["credits_remaining"] == 10 - fits.usage.total_tokens


async def test_usage_counts_equal_the_usage_returned(replicas, redis_url):
    _, secret = make_key(redis_url)
    returned = []
    a, b = (sdk(base, secret) for base in replicas)
    async with a, b:
        chat = await a.chat.completions.create(
            model=DEMO_MODEL_NAME, messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=8
        )
        returned.append(chat.usage)
        stream = await b.chat.completions.create(
            model=DEMO_MODEL_NAME, messages=[{"role": "user", "content": "import os"}], max_tokens=12, n=2,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        returned += [chunk.usage async for chunk in stream if chunk.usage]
        stream = await a.completions.create(
            model=DEMO_MODEL_NAME, prompt="class Stack:", max_tokens=10, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        returned += [chunk.usage async for chunk in stream if chunk.usage]
        many = await b.completions.create(model=DEMO_MODEL_NAME, prompt=["x = 1", "for i in"], max_tokens=5)
        returned.append(many.usage)
    assert len(returned) == 4
    page = usage_of(replicas[1], secret)
    [result] = page["data"][0]["results"]
    assert result["num_model_requests"] == 4
    assert result["input_tokens"] == sum(usage.prompt_tokens for usage in returned)
    assert result["output_tokens"] == sum(usage.completion_tokens for usage in returned)


async def test_revoked_expired_and_disallowed_keys(replicas, redis_url):
    _, expired = make_key(redis_url, expires_at=time.time() - 1)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        await complete(replicas[0], expired)
    _, elsewhere = make_key(redis_url, models=["another-model"])
    with pytest.raises(openai.NotFoundError) as caught:
        await complete(replicas[1], elsewhere)
    assert caught.value.code == "model_not_found"
    async with sdk(replicas[1], elsewhere) as client:
        assert [model.id async for model in client.models.list()] == []
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        await complete(replicas[0], "sk-swarm-not-a-key")


async def test_a_key_revoked_mid_stream_ends_it_with_an_error_and_done(replicas, redis_url):
    key_id, secret = make_key(redis_url)
    store = RedisKeyStore(redis_url)
    body = {
        "model": DEMO_MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    events = []
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            headers = {"authorization": f"Bearer {secret}"}
            async with client.stream(
                "POST", f"{replicas[0]}/v1/completions", json=body, headers=headers
            ) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[len("data: ") :])
                    if len(events) == 3:
                        await store.revoke(key_id)
        sent = [json.loads(event) for event in events[:-1]]
        assert events[-1] == "[DONE]"
        assert "revoked" in sent[-1]["error"]["message"] and sent[-1]["error"]["code"] == "revoked_api_key"
        assert len(sent) < 1500  # it ended early
        texts = sum(1 for event in sent if "choices" in event)
        key = await store.get(key_id)
        assert key.usage["requests"] == 1 and key.usage["completion_tokens"] >= texts - 1
    finally:
        await store.close()
    _, other = make_key(redis_url)  # the gateway goes on serving
    assert (await complete(replicas[0], other)).parse().usage.completion_tokens == MAX_TOKENS


def test_operator_pages_answer_only_the_admin_key(replicas, redis_url, capsys):
    from swarm.status import print_gateway_status

    key_id, secret = make_key(redis_url)
    for path in ("/metrics", "/swarm/api", "/openapi.json"):
        assert httpx.get(f"{replicas[0]}{path}").status_code == 401
        assert (
            httpx.get(f"{replicas[0]}{path}", headers={"authorization": f"Bearer {secret}"}).status_code
            == 403
        )
        assert (
            httpx.get(f"{replicas[0]}{path}", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
        )
    assert httpx.get(f"{replicas[0]}/health").status_code == 200
    admin_usage = httpx.get(f"{replicas[1]}/v1/usage", headers={"authorization": f"Bearer {ADMIN}"})
    assert admin_usage.status_code == 400  # the admin names the key it asks about
    named = httpx.get(
        f"{replicas[1]}/v1/usage?api_key_id={key_id}", headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert named.status_code == 200 and named.json()["key"]["id"] == key_id
    assert print_gateway_status(replicas[0]) == 1 and "--api-key" in capsys.readouterr().out  # swarm status
    assert (
        print_gateway_status(replicas[0], api_key=ADMIN) == 0 and DEMO_MODEL_NAME in capsys.readouterr().out
    )

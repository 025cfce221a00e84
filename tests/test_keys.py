"""The API-key store and its limits, on both backends (a JSON file, a real redis-server): no
gateway, no swarm. The gateway's side (headers, errors, usage = the `usage` returned, replicas)
is in tests/test_users.py."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest_asyncio

from gateway.keys import FileKeyStore, RedisKeyStore, new_key, secret_hash
from gateway.ratelimit import Bucket, format_duration, give_back, rate_limit_headers, take


@pytest_asyncio.fixture(params=["file", "redis"])
async def store(request, tmp_path):
    if request.param == "file":
        yield FileKeyStore(tmp_path / "keys.json")
        return
    server = request.getfixturevalue("redis_server")
    redis_store = RedisKeyStore(server.url)
    yield redis_store
    await redis_store.close()


def test_buckets_refill_per_second_and_refuse_without_taking():
    buckets: dict[str, Bucket] = {}
    for left in (2, 1, 0):
        refused, requests, _, _ = take(buckets, 3, 0, 0, now=100.0)
        assert refused == "" and requests.remaining == left
    refused, requests, _, wait = take(buckets, 3, 0, 0, now=100.0)
    assert refused == "requests" and math.isclose(wait, 20.0)  # 3 per minute: one every 20 s
    assert requests.remaining == 0 and math.isclose(requests.reset_s, 60.0)
    assert take(buckets, 3, 0, 0, now=120.0)[0] == ""  # 20 s later one is back
    refused, _, tokens, wait = take(buckets, 0, 600, 700, now=0.0)
    assert refused == "too_large" and wait == math.inf and tokens.remaining == 600
    assert take(buckets, 0, 600, 500, now=0.0)[0] == ""
    refused, _, tokens, wait = take(buckets, 0, 600, 200, now=0.0)
    assert refused == "tokens" and tokens.remaining == 100 and math.isclose(wait, 10.0)
    give_back(buckets, 600, 400, now=0.0)  # the request used 100 of its 500
    assert take(buckets, 0, 600, 500, now=0.0)[0] == ""


def test_headers_are_openai_s():
    _, requests, tokens, _ = take({}, 60, 1000, 100, now=0.0)
    from gateway.ratelimit import Verdict

    headers = rate_limit_headers(Verdict("", requests, tokens))
    assert headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "6s",
    }  # fmt: skip
    assert [format_duration(s) for s in (0.0123, 1.5, 360, 3723)] == ["13ms", "1.5s", "6m0s", "1h2m3s"]


async def test_keys_are_stored_hashed_found_by_secret_listed_and_revoked(store, tmp_path):
    key, secret = new_key("alice", rpm=5, credits=100, models=["m"])
    await store.add(key)
    found = await store.find(secret)
    assert found is not None and found.id == key.id and found.models == ["m"] and found.credits == 100
    assert await store.find(secret + "x") is None
    assert [k.id for k in await store.list()] == [key.id]
    if isinstance(store, FileKeyStore):
        text = (tmp_path / "keys.json").read_text()
        assert secret not in text and secret_hash(secret) in text
        assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
    assert await store.revoke(key.id) and not await store.revoke("key_nope")
    assert (await store.find(secret)).state() == "revoked"
    assert (await store.reserve(key, 1)).refused == "revoked"


async def test_an_expired_key_is_refused(store):
    key, secret = new_key("old", expires_at=time.time() - 1)
    await store.add(key)
    assert (await store.find(secret)).state() == "expired"
    assert (await store.reserve(key, 1)).refused == "expired"


async def test_reserve_and_settle_keep_credit_and_usage_exact(store):
    key, _ = new_key("bob", tpm=1000, credits=300)
    await store.add(key)
    first = await store.reserve(key, 120)  # prompt 20 + max_tokens 100
    assert first.admitted and first.credits == 180 and first.tokens.remaining == 880
    await store.settle(key.id, "m", 120, 20, 30)  # it used 50
    after = await store.get(key.id)
    assert after.credits == 250
    assert after.usage["requests"] == 1 and after.usage["prompt_tokens"] == 20
    assert after.usage["models"]["m"] == {"requests": 1, "prompt_tokens": 20, "completion_tokens": 30}
    refused = await store.reserve(key, 251)
    assert refused.refused == "quota" and (await store.get(key.id)).credits == 250  # nothing taken
    await store.settle(key.id, "m", 0, 0, 0)  # a request that used nothing is not counted
    assert (await store.get(key.id)).usage["requests"] == 1


async def test_large_credit_balances_stay_exact(store):
    key, _ = new_key("rich", credits=10**15)
    await store.add(key)
    assert (await store.reserve(key, 120)).credits == 10**15 - 120


async def test_the_lua_script_and_the_python_buckets_agree(store):
    """The same sequence refused at the same places by both backends."""
    key, _ = new_key("carol", rpm=4, tpm=100)
    await store.add(key)
    asked = [30, 30, 50, 30, 10, 10, 200]
    verdicts = [await store.reserve(key, tokens) for tokens in asked]
    assert [v.refused for v in verdicts] == ["", "", "tokens", "", "", "requests", "too_large"]
    assert [v.tokens.remaining for v in verdicts[:2]] == [70, 40]
    assert verdicts[2].retry_after_s > 0 and verdicts[5].retry_after_s > 0


async def test_two_replicas_reserving_at_once_never_overspend(redis_server):
    """Two stores on one Redis (as two gateway replicas are), 40 reservations at once."""
    replicas = [RedisKeyStore(redis_server.url) for _ in range(2)]
    try:
        key, _ = new_key("dave", tpm=1000, credits=700)
        await replicas[0].add(key)
        verdicts = await asyncio.gather(*(replicas[i % 2].reserve(key, 100) for i in range(40)))
        admitted = [v for v in verdicts if v.admitted]
        assert len(admitted) == 7  # the credit, not the bucket, is the tighter bound
        assert {v.refused for v in verdicts if not v.admitted} == {"quota"}
        assert (await replicas[1].get(key.id)).credits == 0
        await asyncio.gather(*(replicas[i % 2].settle(key.id, "m", 100, 10, 40) for i in range(7)))
        final = await replicas[0].get(key.id)
        assert final.credits == 700 - 7 * 50 and final.usage["requests"] == 7
    finally:
        for replica in replicas:
            await replica.close()


def test_the_cli_writes_and_reads_the_file_store(tmp_path, capsys):
    from swarm.cli import main

    path = str(tmp_path / "keys.json")
    assert main(["keys", "create", "--keys-file", path, "--name", "eve", "--tpm", "500", "--model", "m"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("sk-swarm-")
    key = asyncio.run(FileKeyStore(path).find(secret))
    assert key.name == "eve" and key.tpm == 500
    assert main(["keys", "list", "--keys-file", path, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [item["id"] for item in listed] == [key.id] and "hash" not in listed[0]
    assert main(["keys", "usage", "--keys-file", path, key.id, "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert page["key"]["id"] == key.id and page["key"]["rate_limits"]["tokens_per_minute"] == 500
    assert main(["keys", "revoke", "--keys-file", path, key.id]) == 0
    assert asyncio.run(FileKeyStore(path).get(key.id)).revoked
    assert main(["keys", "revoke", "--keys-file", path, "key_missing"]) == 1
    assert main(["keys", "create", "--keys-file", path, "--rpm", "-1"]) == 2


# -- the file store behind a gateway app in this process (real peers in process, see
#    tests/test_gateway_handlers.py); the Redis store behind real processes is tests/test_users.py
from tests.test_gateway_handlers import MODEL, app_in_process, peers, sse_data  # noqa: E402, F401


async def test_a_gateway_on_the_file_store_limits_meters_and_reports(peers, demo_model, tmp_path):  # noqa: F811
    path = tmp_path / "keys.json"
    store = FileKeyStore(path)
    key, secret = new_key("file-user", rpm=3, tpm=1000, credits=500)
    other, other_secret = new_key("elsewhere", models=["not-this-one"])
    await store.add(key)
    await store.add(other)
    auth = {"authorization": f"Bearer {secret}"}
    body = {
        "model": MODEL,
        "prompt": [5, 17, 42, 99, 7],
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with app_in_process(peers, demo_model, keys_file=str(path), api_key="admin") as (
        client,
        _,
        sessions,
        _,
    ):
        first = await client.post("/v1/completions", json=body, headers=auth)
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - 9)
        streamed = await client.post(
            "/v1/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
            headers=auth,
        )
        assert streamed.headers["x-ratelimit-limit-tokens"] == "1000"
        usages = [first.json()["usage"], sse_data(streamed.text)[-1]["usage"]]
        third = await client.post("/v1/completions", json={**body, "max_tokens": 2}, headers=auth)
        usages.append(third.json()["usage"])
        refused = await client.post("/v1/completions", json=body, headers=auth)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0" and "retry-after" in refused.headers
        page = (await client.get("/v1/usage", headers=auth)).json()
        spent = sum(usage["total_tokens"] for usage in usages)
        assert page["key"]["usage"] == {
            "num_model_requests": 3,
            "input_tokens": sum(usage["prompt_tokens"] for usage in usages),
            "output_tokens": sum(usage["completion_tokens"] for usage in usages),
        }
        assert page["key"]["credits_remaining"] == 500 - spent
        denied = await client.post(
            "/v1/completions", json=body, headers={"authorization": f"Bearer {other_secret}"}
        )
        assert denied.status_code == 404 and denied.json()["error"]["code"] == "model_not_found"
        assert (await client.get("/metrics", headers=auth)).status_code == 403
        metrics = await client.get("/metrics", headers={"authorization": "Bearer admin"})
        assert 'swarm_gateway_key_refusals_total{reason="requests"} 1.0' in metrics.text
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for _ in range(2):  # two keys, one session id: two pins, neither touches the other's
            third, third_secret = new_key("same-session-id")
            await store.add(third)
            headers = {"authorization": f"Bearer {third_secret}", "x-session-id": "same-id"}
            assert (await client.post("/v1/chat/completions", json=chat, headers=headers)).status_code == 200
        assert len([pin for pin in sessions.pins if pin.endswith(":same-id")]) == 2
        admin = await client.post("/v1/completions", json=body, headers={"authorization": "Bearer admin"})
        assert admin.status_code == 200 and "x-ratelimit-limit-requests" not in admin.headers
    assert (await FileKeyStore(path).get(key.id)).usage["requests"] == 3  # it is in the file


async def test_a_key_store_that_cannot_be_reached_refuses_with_503_and_the_gateway_lives_on(demo_model):
    """Redis down: never serve a key unmetered; say so with a 503 the SDKs retry."""
    from swarm.launcher import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = {"redis_url": dead, "redis_keys": True, "api_key": "admin"}
    async with app_in_process([], demo_model, **settings) as (client, *_):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        refused = await client.post(
            "/v1/completions", json=body, headers={"authorization": "Bearer sk-swarm-x"}
        )
        assert refused.status_code == 503 and "key store" in refused.json()["error"]["message"]
        assert "retry-after" in refused.headers
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics", headers={"authorization": "Bearer admin"})).status_code == 200


async def test_with_a_key_store_the_operator_pages_need_the_admin_key_unless_opened(demo_model, tmp_path):
    store = FileKeyStore(tmp_path / "keys.json")
    key, secret = new_key("user")
    await store.add(key)
    user = {"authorization": f"Bearer {secret}"}
    async with app_in_process([], demo_model, keys_file=str(store.path)) as (client, *_):  # no admin key
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/swarm/api", headers=user)).status_code == 403  # a user's key is no admin's
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/v1/models", headers=user)).status_code == 200
    async with app_in_process([], demo_model, keys_file=str(store.path), open_ops=True) as (client, *_):
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401  # the API still needs a key


async def test_a_meter_settles_what_was_sent_or_gives_back_a_stream_never_begun(tmp_path):
    from types import SimpleNamespace

    from gateway.metering import Meter

    store = FileKeyStore(tmp_path / "keys.json")
    key, _ = new_key("x", tpm=100, credits=100)
    await store.add(key)
    abandoned = Meter(store, key, "m", 60, 10, await store.reserve(key, 60), check_interval=1.0)
    await abandoned.release_if_never_started()  # the client left before the first event
    assert (await store.get(key.id)).credits == 100 and (await store.reserve(key, 100)).admitted
    await store.settle(key.id, "m", 100, 0, 0)

    async def pieces():
        for _ in range(3):
            yield SimpleNamespace(tokens=[1, 2])

    served = Meter(store, key, "m", 60, 10, await store.reserve(key, 60), check_interval=1.0)
    assert len([piece async for piece in served.wrap(pieces(), partial=True)]) == 3
    await served.release_if_never_started()  # began and settled: nothing more
    after = await store.get(key.id)
    assert after.credits == 100 - 16 and after.usage["completion_tokens"] == 6

"""DHT membership with real processes: peers that join late become routable within a heartbeat,
killed peers vanish once their record expires, and replicas of the same blocks are all visible;
session pins live in a real redis-server and make the next request reuse the route."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
import redis

from swarm.launcher import LocalSwarm
from tests.conftest import HEARTBEAT, TTL, RedisServer, wait_until

MODEL = "m"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


_wait = wait_until


def _models(gateway) -> list[str]:
    return [model["id"] for model in httpx.get(f"{gateway.address}/v1/models", timeout=10).json()["data"]]


def test_late_peer_becomes_routable_and_killed_peer_expires(demo_model, make_swarm):
    swarm = make_swarm(demo_model, model_name=MODEL)
    swarm.start_dht()
    swarm.start_peer(0, 2)
    gateway = swarm.start_gateway()
    assert _models(gateway) == []
    response = httpx.post(f"{gateway.address}/v1/chat/completions", json=BODY, timeout=30)
    assert response.status_code == 503 and "retry-after" in response.headers

    late = swarm.start_peer(2, 4)
    joined_at = time.monotonic()
    assert _wait(lambda: _models(gateway) == [MODEL], timeout=HEARTBEAT + 2.0)
    assert time.monotonic() - joined_at <= HEARTBEAT + 2.0
    assert httpx.post(f"{gateway.address}/v1/chat/completions", json=BODY, timeout=30).status_code == 200

    late.signal(signal.SIGKILL)  # no goodbye: only the record's expiry removes it
    killed_at = time.monotonic()
    assert _wait(lambda: _models(gateway) == [], timeout=TTL + 3.0)
    assert time.monotonic() - killed_at <= TTL + 3.0
    assert httpx.post(f"{gateway.address}/v1/chat/completions", json=BODY, timeout=30).status_code == 503


@pytest.fixture(scope="module")
def replicated(demo_model, tmp_path_factory):
    """Two replicas of each of two spans (4 routes), a real redis-server, one gateway on it."""
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))
    redis_server.start()
    swarm = LocalSwarm(demo_model, workdir=tmp_path_factory.mktemp("replicated"), heartbeat=HEARTBEAT, ttl=TTL,
                       model_name=MODEL)  # fmt: skip
    try:
        swarm.start_dht()
        peers = swarm.start_peers([(0, 2), (2, 4)] * 2, "--threads", "1")
        gateway = swarm.start_gateway(None, "--redis-url", redis_server.url)
        assert _wait(lambda: _models(gateway) == [MODEL], timeout=10)
        yield swarm, peers, gateway, redis_server
    finally:
        swarm.stop()
        redis_server.stop()


async def test_replicas_of_the_same_blocks_are_all_visible(replicated):
    from discovery.dht import SwarmDHT
    from discovery.records import parse_address

    swarm, peers, _, _ = replicated
    dht = SwarmDHT()
    await dht.start("127.0.0.1", 0, [parse_address(swarm.dht_address)])
    try:
        records = await dht.peers(MODEL)
    finally:
        dht.stop()
    assert sorted(record.address for record in records) == sorted(peer.address for peer in peers)
    assert sorted((record.start, record.end) for record in records) == [(0, 2), (0, 2), (2, 4), (2, 4)]


def test_session_pin_in_redis_reuses_the_route(replicated):
    swarm, _, gateway, redis_server = replicated
    headers = {"X-Session-Id": "conversation-42"}
    first = httpx.post(f"{gateway.address}/v1/chat/completions", json=BODY, headers=headers, timeout=30)
    assert first.status_code == 200
    route = first.headers["x-swarm-route"]
    stored = redis.Redis.from_url(redis_server.url).get("swarm:session:conversation-42")
    assert stored is not None, "the pin was not written to redis"
    for _ in range(5):
        again = httpx.post(f"{gateway.address}/v1/chat/completions", json=BODY, headers=headers, timeout=30)
        assert again.headers["x-swarm-route"] == route

    # a second gateway replica sharing the redis continues on the same route
    other = swarm.start_gateway(None, "--redis-url", redis_server.url, name="gateway-2")
    assert _wait(lambda: _models(other) == [MODEL], timeout=10)
    response = httpx.post(f"{other.address}/v1/chat/completions", json=BODY, headers=headers, timeout=30)
    assert response.headers["x-swarm-route"] == route


def test_conversation_key_pins_without_a_header(replicated):
    """Plain OpenAI clients send no session id: turn 2 of a chat finds turn 1's route (of 4)."""
    _, _, gateway, _ = replicated
    for attempt in range(4):
        messages = [{"role": "user", "content": f"question {attempt}"}]
        first = httpx.post(
            f"{gateway.address}/v1/chat/completions", json={**BODY, "messages": messages}, timeout=30
        )
        reply = first.json()["choices"][0]["message"]["content"]
        turn2 = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
        second = httpx.post(
            f"{gateway.address}/v1/chat/completions", json={**BODY, "messages": turn2}, timeout=30
        )
        assert second.headers["x-swarm-route"] == first.headers["x-swarm-route"]

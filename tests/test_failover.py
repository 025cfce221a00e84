"""Fault tolerance with real processes and real signals: a stream survives its peers dying.

One module-scoped swarm serves the tiny model (3 blocks) as a 3-span route with two replicas of
every span, behind a gateway with a short step deadline and failover budget and a real Redis. The
tests run in file order and share it: each one that takes a peer away starts a replacement, which
the next test waits for. The last test takes a whole span away for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
import redis as redis_lib

from common.peer_client import ChannelPool, PeerError, peer_info
from swarm.launcher import Child, LocalSwarm, free_port
from tests.conftest import HEARTBEAT, RedisServer, wait_until

MODEL = "tiny"
SPANS = [(0, 1), (1, 2), (2, 3)]
PEER_FLAGS = ("--threads", "1", "--drain-timeout", "15")
STEP_TIMEOUT = 2.0
FAILOVER_TIMEOUT = 3.0
MAX_TOKENS = 160
# Longer than conftest's TTL: after a kill, every DHT node's lookups and announces wait one RPC
# timeout (3 s) for the dead peer's DHT node, so a 3 s TTL would let live records lapse.
TTL = 10.0
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count the peers of the swarm."}],
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


_wait = wait_until


@dataclass
class StreamResult:
    text: str
    route: list[str]
    errors: list[dict] = field(default_factory=list)
    done: bool = False
    acted_at: float | None = None
    ended_at: float = 0.0


def stream_chat(address: str, body: dict, headers: dict | None = None, act=None) -> StreamResult:
    """Stream a chat completion from the gateway at `address`; call `act(route)` once the first
    text has arrived."""
    with httpx.stream("POST", f"{address}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        result = StreamResult("", r.headers["x-swarm-route"].split(","))
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                result.done = True
                break
            payload = json.loads(data)
            if "error" in payload:
                result.errors.append(payload["error"])
                continue
            for choice in payload.get("choices", []):
                result.text += choice["delta"].get("content") or ""
            if act is not None and result.acted_at is None and result.text:
                result.acted_at = time.monotonic()
                act(result.route)
    result.ended_at = time.monotonic()
    return result


@dataclass
class Swarm:
    local: LocalSwarm
    gateway: Child
    redis: RedisServer
    pending: list[Child] = field(default_factory=list)

    def peers(self) -> dict[str, Child]:
        """peer id -> process, from each peer's start-up log line."""
        found = {}
        for child in self.local.children:
            match = re.search(r"peer ([0-9a-f]{16,64}) serving", child.log())  # ids: 32 hex digits of the key
            if match:
                found[match.group(1)] = child
        return found

    def span_of(self, child: Child) -> tuple[int, int]:
        args = child.process.args
        start, end = args[args.index("--blocks") + 1].split(":")
        return int(start), int(end)

    def replace(self, child: Child) -> None:
        """Start a new peer for `child`'s span without waiting for it (see `settle`)."""
        self.pending.append(self.local.spawn_peer(*self.span_of(child), *PEER_FLAGS))

    def settle(self) -> None:
        for child in self.pending:
            child.address = child.wait_for_line("PEER_READY", 120)
        self.pending.clear()

    def health(self) -> dict:
        return httpx.get(f"{self.gateway.address}/health", timeout=10).json()

    def stream(self, act=None, body: dict | None = None, headers: dict | None = None) -> StreamResult:
        """Stream a chat completion; call `act(route)` once the first text has arrived."""
        return stream_chat(self.gateway.address, body or BODY, headers, act)


@pytest.fixture(scope="module")
def swarm(tiny_model, tmp_path_factory):
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    local = LocalSwarm(tiny_model, workdir=tmp_path_factory.mktemp("failover"), heartbeat=HEARTBEAT, ttl=TTL,
                       model_name=MODEL)  # fmt: skip
    try:
        local.start_dht()
        local.start_peers(SPANS * 2, *PEER_FLAGS)
        gateway = local.start_gateway(
            None, "--step-timeout", str(STEP_TIMEOUT), "--failover-timeout", str(FAILOVER_TIMEOUT),
            "--redis-url", redis.url, "--dht-port", str(free_port(2)),
        )  # fmt: skip
        ctx = Swarm(local, gateway, redis)
        models = lambda: httpx.get(f"{gateway.address}/v1/models", timeout=10).json()["data"]  # noqa: E731
        assert _wait(models, 10), "the gateway never saw a complete route"
        yield ctx
    finally:
        for child in local.children:  # a test may leave a peer stopped
            child.signal(signal.SIGCONT)
        local.stop()
        redis.stop()


@pytest.fixture(scope="module")
def reference(swarm) -> str:
    """The greedy output with no failure: what every interrupted stream must still produce."""
    first = swarm.stream()
    assert first.done and not first.errors and first.text
    assert swarm.stream().text == first.text  # the baseline itself is deterministic
    return first.text


def _failovers(swarm: Swarm) -> int:
    return swarm.health()["failover"]["failovers"]


def _pushes_received(swarm: Swarm, span: tuple[int, int]) -> dict[str, int]:
    """Steps pushed to each live peer of `span` by a previous hop (`Info.pushes_received`)."""

    async def ask(children: dict[str, Child]) -> dict[str, int]:
        pool = ChannelPool()
        counts = {}
        try:
            for peer, child in children.items():
                with contextlib.suppress(PeerError):  # killed
                    counts[peer] = (await peer_info(pool, child.address, timeout=2)).pushes_received
        finally:
            await pool.close()
        return counts

    live = {
        peer: child
        for peer, child in swarm.peers().items()
        if child.process.poll() is None and child.address and swarm.span_of(child) == span
    }
    return asyncio.run(ask(live))


@pytest.mark.parametrize("position", [0, 1, 2], ids=["first", "middle", "last"])
def test_sigkill_mid_stream_continues_exactly(swarm, reference, position):
    swarm.settle()
    before = _failovers(swarm)
    victims = []

    def kill(route):
        victim = swarm.peers()[route[position]]
        victim.signal(signal.SIGKILL)
        victims.append(victim)

    received_before = _pushes_received(swarm, SPANS[1])
    session = f"killed-{position}"
    result = swarm.stream(kill, headers={"X-Session-Id": session, "X-Request-Id": session})
    swarm.replace(victims[0])
    assert result.errors == [] and result.done
    assert result.text == reference
    assert _failovers(swarm) > before, "the peer died after the stream ended: no failover happened"
    if position == 1:  # push (the gateway's default): after the failover the first hop pushes to
        # the replacement, which the middle span's other peers received nothing from before
        received = _pushes_received(swarm, SPANS[1])
        assert sum(count - received_before.get(peer, 0) for peer, count in received.items()) > 0
    health = swarm.health()["failover"]
    assert health["pause_ms_max"] is not None and health["pause_ms_max"] > 0
    # the pin follows the failover: the next turn goes to the replacement, not the dead peer
    pin = json.loads(redis_lib.Redis.from_url(swarm.redis.url).get(f"swarm:session:{session}"))
    pinned = [hop["peer_id"] for hop in pin["route"]]
    dead = result.route[position]
    assert dead not in pinned and pinned[:position] == result.route[:position]
    # the swarm map records the route that served the request, not the one first planned
    routes = httpx.get(f"{swarm.gateway.address}/swarm/api", timeout=10).json()["models"][0]["routes"]
    (served,) = [route for route in routes["recent"] if route["request_id"] == session]
    assert [hop["peer_id"] for hop in served["hops"]] == pinned


def test_hung_peer_is_detected_by_the_step_deadline(swarm, reference):
    swarm.settle()
    before = _failovers(swarm)
    hung = []

    def freeze(route):
        victim = swarm.peers()[route[1]]
        victim.signal(signal.SIGSTOP)
        hung.append(victim)

    try:
        result = swarm.stream(freeze)
    finally:
        for victim in hung:
            victim.signal(signal.SIGCONT)
    assert result.errors == [] and result.done
    assert result.text == reference
    assert _failovers(swarm) > before
    assert max(swarm.health()["failover"]["pauses_ms"]) >= STEP_TIMEOUT * 1000  # waited for the deadline


def test_sigterm_drains_without_a_visible_error(swarm, reference):
    swarm.settle()
    before = swarm.health()["failover"]["migrations"]
    drained = []

    def terminate(route):
        victim = swarm.peers()[route[2]]
        victim.signal(signal.SIGTERM)
        drained.append(victim)

    result = swarm.stream(terminate)
    swarm.replace(drained[0])
    assert result.errors == [] and result.done
    assert result.text == reference
    assert swarm.health()["failover"]["migrations"] > before, "the gateway did not move off the draining peer"
    drained[0].process.wait(30)  # exits once its sessions moved, well before the drain timeout
    assert drained[0].process.returncode == 0


def test_redis_outage_mid_load_fails_no_request(swarm, reference):
    import concurrent.futures

    swarm.settle()
    url = f"{swarm.gateway.address}/v1/chat/completions"
    body = {**BODY, "stream": False, "max_tokens": 4}
    stop = threading.Event()
    answered = [0, 0, 0]  # requests answered so far, per worker

    def client(worker: int) -> list[int]:
        statuses = []
        turn = 0
        while not stop.is_set():
            headers = {"X-Session-Id": f"load-{worker}"}
            messages = [{"role": "user", "content": f"turn {turn} of {worker}"}]
            response = httpx.post(url, json={**body, "messages": messages}, headers=headers, timeout=30)
            statuses.append(response.status_code)
            answered[worker] += 1
            turn += 1
        return statuses

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client, worker) for worker in range(3)]
        try:
            # the load is on: every worker has had a reply, and keeps sending
            assert _wait(lambda: min(answered) >= 1, 30), "the load never got going"
            swarm.redis.process.kill()  # no goodbye
            swarm.redis.process.wait(5)
            assert _wait(lambda: swarm.health()["session_store_errors"] > 0, 30), "no request met the outage"
            swarm.redis.start()  # same port
            assert _wait(lambda: swarm.health()["session_store_available"], 30), "pins did not resume"
        finally:
            stop.set()
        statuses = [status for future in futures for status in future.result()]
    assert statuses and set(statuses) == {200}
    health = swarm.health()
    assert health["session_store_errors"] > 0
    # pins resume once redis answers again
    response = httpx.post(url, json=body, headers={"X-Session-Id": "after-outage"}, timeout=30)
    assert response.status_code == 200
    stored = redis_lib.Redis.from_url(swarm.redis.url).get("swarm:session:after-outage")
    assert stored is not None and swarm.health()["session_store_available"] is True


def test_a_dead_known_peer_is_skipped_before_any_dht_lookup(swarm):
    """Regression from the chaos run (loadtests/chaos.py): when a hop failed, the runner tried the
    peers it knew, met one that had died earlier (its record outlives it), and then waited for a
    fresh DHT lookup, which stalls a DHT timeout per dead node (pauses of 2.5-4.9 s), although a
    live replica was known all along. The replacement must come from the known live replica.

    The runner gets no DHT here (a fresh lookup finds nothing), so only the known records can
    save the stream: a dead route peer, a dead peer that looks fastest (unexpired), another one
    past its expiry, and the live peers of the swarm.
    """
    import asyncio
    import dataclasses

    from common.peer_client import ChannelPool
    from discovery.records import PeerRecord
    from gateway.failure_policy import FailurePolicy
    from gateway.generation import RouteRunner
    from gateway.routing import Hop
    from gateway.swarm_view import SwarmView
    from protos import swarm_pb2

    swarm.settle()
    api = httpx.get(f"{swarm.gateway.address}/swarm/api", timeout=10).json()["models"][0]["peers"]
    live = [
        PeerRecord.from_dict(view)
        for view in api
        if view["state"] == "online" and view["reachable"] and not view["banned"]
    ]
    first = next(record for record in live if (record.start, record.end) == (0, 1))
    now = time.time()

    def dead(name: str, **changes) -> PeerRecord:
        return dataclasses.replace(first, peer_id=name, address=f"127.0.0.1:{free_port()}", **changes)

    on_route = dead("dead-on-route", expires_at=now + 60)
    fastest = dead("dead-fastest", throughput=1e9, expires_at=now + 60)
    expired = dead("dead-expired", throughput=1e9, expires_at=now - 5)
    route = (
        Hop(on_route.peer_id, on_route.address, 0, 1),
        *(Hop(r.peer_id, r.address, r.start, r.end) for r in
          (next(r for r in live if r.start == start) for start in (1, 2))),
    )  # fmt: skip

    async def run():
        pool = ChannelPool()
        view = SwarmView(None)
        view._seen[MODEL] = {r.peer_id: r for r in (on_route, fastest, expired, *live)}
        policy = FailurePolicy(replace_timeout=FAILOVER_TIMEOUT)
        runner = RouteRunner(pool, route, STEP_TIMEOUT, failover=policy.bind(view, MODEL, 3))
        try:
            await runner.open(64, swarm_pb2.SamplingParams(), "regression-known-peers")
            result = await runner.step([1, 2, 3])
        finally:
            await runner.close()
            await pool.close()
        return runner, policy, result

    runner, policy, result = asyncio.run(run())
    assert runner.route[0].peer_id in {r.peer_id for r in live if (r.start, r.end) == (0, 1)}
    assert result.token_id >= 0
    assert policy.stats.failovers == 1 and policy.stats.exhausted == 0


def test_no_replacement_ends_the_stream_within_the_bound(swarm, reference):
    swarm.settle()

    def kill_span(route):
        victim = swarm.peers()[route[1]]
        span = swarm.span_of(victim)
        for child in swarm.peers().values():
            if swarm.span_of(child) == span:
                child.signal(signal.SIGKILL)

    result = swarm.stream(kill_span)
    assert result.done, "the stream did not end with [DONE]"
    assert result.errors, "the stream ended without an error chunk"
    error = result.errors[0]
    assert set(error) >= {"message", "type", "param", "code"}
    # bounded: the failover budget (plus a generous margin for a loaded machine), never a hang
    assert result.ended_at - result.acted_at < STEP_TIMEOUT + FAILOVER_TIMEOUT + 10
    response = httpx.post(
        f"{swarm.gateway.address}/v1/chat/completions", json={**BODY, "stream": False}, timeout=30
    )
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"]["type"] == "unavailable_error"
    assert swarm.health()["failover"]["exhausted"] >= 1

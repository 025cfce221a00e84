"""Routes follow measured latency: two replicas of a span behind WAN links (loadtests/wan.py) of 5
and 25 ms one way; the gateway measures its round trip to each and routes through the near one."""

from __future__ import annotations

import httpx
import pytest

from loadtests.wan import LinkShape, WanLink
from swarm.launcher import free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

MODEL = "m"
REQUESTS = 8  # by chance alone, 7 of 8 on one replica: 3.5 %


def test_the_planner_prefers_the_lower_latency_replica(demo_model, make_swarm):
    swarm = make_swarm(demo_model, model_name=MODEL)
    swarm.start_dht()
    swarm.start_peer(0, 2, "--threads", "1")
    links, ports = [], {}
    try:
        for name, delay in (("near", 5.0), ("far", 25.0)):
            port, proxy = free_port(), free_port()
            links.append(WanLink(proxy, ("127.0.0.1", port), LinkShape(delay_ms=delay)).start())
            ports[name] = (port, proxy)
        peers = {
            name: swarm.spawn_peer(2, 4, "--threads", "1", "--port", str(port), "--announce-port", str(proxy))
            for name, (port, proxy) in ports.items()
        }
        for child in peers.values():
            child.address = child.wait_for_line("PEER_READY", 120)
        assert {name: child.address.rsplit(":", 1)[1] for name, child in peers.items()} == {
            name: str(proxy) for name, (_, proxy) in ports.items()
        }, "peers announce the proxy's port"
        gateway = swarm.start_gateway()

        def measured() -> bool:
            models = httpx.get(f"{gateway.address}/swarm/api", timeout=10).json()["models"]
            peers_seen = [peer for peer in models[0]["peers"] if peer["start"] == 2] if models else []
            return len(peers_seen) == 2

        assert wait_until(measured, timeout=20)
        wait_until(lambda: False, timeout=5)  # a few rounds of pings (every 2 s)
        routes = []
        for i in range(REQUESTS):
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"near or far {i}"}],
                "max_tokens": 2,
            }
            response = httpx.post(f"{gateway.address}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200
            routes.append(response.headers["x-swarm-route"].split(",")[1])
        near_id = _peer_id(peers["near"])
        assert sum(hop == near_id for hop in routes) >= REQUESTS - 1, (routes, near_id)
    finally:
        for link in links:
            link.stop()


def _peer_id(child) -> str:
    import re

    return re.search(r"peer ([0-9a-f]+) serving", child.log()).group(1)

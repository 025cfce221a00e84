"""DHT churn with real processes: the bootstrap node dies and comes back on the same port.

A running swarm must keep serving without it (every node already knows the others), and once a
DHT node listens on the bootstrap address again, a peer that joins through it must become visible
to the gateway: the old nodes re-ping their bootstrap addresses and rejoin through a node that
answers with an id they do not know (`SwarmDHT._bootstrap_is_new`).
"""

from __future__ import annotations

import functools
import re
import signal
import socket
import time

import httpx

from swarm.launcher import Child, free_port
from tests.conftest import wait_until

PEER_FLAGS = ("--threads", "1")
BODY = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Is the swarm still there?"}],
    "max_tokens": 4,
    "temperature": 0,
}


def _peer_id(child: Child) -> str:
    match = re.search(r"peer ([0-9a-f]+) serving", child.log())
    assert match, child.log()[-2000:]
    return match.group(1)


def _chat(gateway: Child) -> httpx.Response:
    return httpx.post(f"{gateway.address}/v1/chat/completions", json=BODY, timeout=60)


def _visible_peers(gateway: Child) -> set[str]:
    models = httpx.get(f"{gateway.address}/swarm/api", timeout=10).json()["models"]
    return {peer["peer_id"] for model in models for peer in model["peers"]}


_wait = functools.partial(wait_until, interval=0.25)


def test_bootstrap_node_restart_keeps_serving_and_rejoins(make_swarm, tiny_model):
    swarm = make_swarm(tiny_model, model_name="tiny")
    port = free_port(socket.SOCK_DGRAM)
    swarm.start_dht(port=port)
    [first] = swarm.start_peers([(0, 3)], *PEER_FLAGS)
    gateway = swarm.start_gateway(None, "--dht-port", str(free_port(socket.SOCK_DGRAM)))
    assert _wait(lambda: _chat(gateway).status_code == 200, 30), "the swarm never served"

    dht = next(child for child in swarm.children if child.name == "dht")
    dht.signal(signal.SIGKILL)
    dht.process.wait(10)
    for _ in range(3):  # no bootstrap node: the gateway and the peer still know each other
        response = _chat(gateway)
        assert response.status_code == 200, response.text
        # on purpose, not a wait for an event: the gateway's snapshot must age past its 1 s refresh
        # for the next request to start a lookup that meets the dead node
        time.sleep(1.0)

    swarm.start_dht(port=port)  # a new node (new id, empty storage) on the same address
    second = swarm.start_peer(0, 3, *PEER_FLAGS)  # joins through the restarted node only
    new_id = _peer_id(second)
    seen = _wait(lambda: new_id in _visible_peers(gateway), 45, interval=0.5)
    assert seen, f"the gateway never saw the peer that joined after the restart: {_visible_peers(gateway)}"

    # and it serves: with the first peer gone, requests go through the new one
    first.stop()
    response = _wait(lambda: (r := _chat(gateway)).status_code == 200 and r, 30, interval=0.5)
    assert response, "no request succeeded through the peer that joined after the restart"
    assert response.headers["x-swarm-route"] == new_id

"""A peer on its own (virtual) host: a network namespace joined to this one by a veth pair.

The DHT node, the gateway and a replica peer listen on the host end of the veth (10.77.N.1); the
peer in the namespace listens on 10.77.N.2 and reaches the DHT through the link. A stream runs
through the namespaced peer, then the link is cut mid-stream (`ip link set ... down`): no error,
no reset, packets just vanish, so only the gateway's step deadline can notice. The stream must
still complete via the replica, equal to the uninterrupted greedy output.

Needs root (or CAP_NET_ADMIN) for `ip netns add`; skipped with the reason otherwise. Namespaces
and veths are removed in a finalizer whatever happens.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess

import httpx
import pytest

from swarm.launcher import Child, free_port
from tests.conftest import wait_until
from tests.test_failover import StreamResult, stream_chat

STEP_TIMEOUT = 2.0
BODY = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Which host answers, the near or the far one?"}],
    "max_tokens": 96,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}
SESSION = {"X-Session-Id": "netns-conversation"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@pytest.fixture
def far_host():
    """A namespace with a veth to this one; yields (namespace, host-side veth, host ip, far ip)."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = os.getpid() % 200 + 20  # distinct per test process: other runs may hold 10.77.x too
    namespace, near, far = f"swarmns{tag}", f"vsw{tag}h", f"vsw{tag}p"
    host_ip, far_ip = f"10.77.{tag}.1", f"10.77.{tag}.2"
    _ip("netns", "del", namespace, check=False)  # left over by a killed run
    _ip("link", "del", near, check=False)
    made = _ip("netns", "add", namespace, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root or CAP_NET_ADMIN): {made.stderr.strip()}")
    try:
        _ip("link", "add", near, "type", "veth", "peer", "name", far)
        _ip("link", "set", far, "netns", namespace)
        _ip("addr", "add", f"{host_ip}/24", "dev", near)
        _ip("link", "set", near, "up")
        _ip("-n", namespace, "addr", "add", f"{far_ip}/24", "dev", far)
        _ip("-n", namespace, "link", "set", far, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield namespace, near, host_ip, far_ip
    finally:
        _ip("netns", "del", namespace, check=False)  # takes the veth pair with it
        _ip("link", "del", near, check=False)


def _stream(gateway: Child, act=None) -> StreamResult:
    """Stream BODY in the pinned conversation; `act(route)` once the first text has arrived."""
    return stream_chat(gateway.address, BODY, SESSION, act)


def _peer_id(child: Child) -> str:
    match = re.search(r"peer ([0-9a-f]{16,64}) serving", child.log())
    assert match, child.log()[-2000:]
    return match.group(1)


_wait = functools.partial(wait_until, interval=0.25)


def test_cut_link_mid_stream_fails_over_to_a_replica(far_host, make_swarm, tiny_model):
    namespace, near, host_ip, far_ip = far_host
    swarm = make_swarm(tiny_model, model_name="tiny")
    swarm.start_dht(host=host_ip)
    flags = ("--threads", "1")
    far_peer = swarm.spawn_peer(0, 3, *flags, "--host", far_ip, wrap=("ip", "netns", "exec", namespace))
    far_peer.address = far_peer.wait_for_line("PEER_READY", 120)
    assert far_peer.address.startswith(far_ip)
    far_id = _peer_id(far_peer)
    gateway = swarm.start_gateway(None, "--step-timeout", str(STEP_TIMEOUT), "--dht-port",
                                  str(free_port(socket.SOCK_DGRAM)))  # fmt: skip
    models = lambda: httpx.get(f"{gateway.address}/v1/models", timeout=10).json()["data"]  # noqa: E731
    assert _wait(models, 30), "the gateway never saw the peer in the namespace"

    # The uninterrupted output, through the far peer (the only one): it also pins the
    # conversation's route there, so the next turn starts on the far host for sure.
    reference = _stream(gateway)
    assert reference.done and not reference.errors and reference.text
    assert reference.route == [far_id]

    near_peer = swarm.start_peer(0, 3, *flags, "--host", host_ip)
    near_id = _peer_id(near_peer)

    def visible() -> set[str]:
        api = httpx.get(f"{gateway.address}/swarm/api", timeout=10).json()
        return {peer["peer_id"] for model in api["models"] for peer in model["peers"]}

    assert _wait(lambda: near_id in visible(), 30), "the gateway never saw the replica"
    before = httpx.get(f"{gateway.address}/health", timeout=10).json()["failover"]["failovers"]

    def cut(route):
        assert route == [far_id]
        _ip("link", "set", near, "down")

    result = _stream(gateway, cut)
    assert result.acted_at is not None, "the stream ended before the link was cut"
    assert result.errors == [] and result.done
    assert result.text == reference.text
    health = httpx.get(f"{gateway.address}/health", timeout=10).json()["failover"]
    assert health["failovers"] > before
    # the failed step waited for the deadline: nothing else tells a silent link from a slow peer
    assert max(health["pauses_ms"]) >= STEP_TIMEOUT * 1000
    assert far_peer.alive(), "the far peer should be cut off, not dead"
    far_peer.process.kill()  # cut off: its goodbye could never arrive, so don't wait for a drain

"""What an independent tester did to a swarm started from the CLI, as regression tests against real
processes: stalled peers, a chunked body past the limit, a megabyte stop string.
(`loadtests/abuse.py` runs the same cases as a benchmark and reports latencies and memory.)"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.slow

MODEL = "m"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def complete(
    address: str, prompt: str = "Hello there", headers: dict | None = None, **extra
) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra}
    return httpx.post(f"{address}/v1/completions", json=body, headers=headers, timeout=60)


def banned(address: str) -> set[str]:
    peers = httpx.get(f"{address}/swarm/api", timeout=10).json()["models"][0]["peers"]
    return {peer["peer_id"] for peer in peers if peer["banned"]}


def test_stalled_peers_cost_no_503_while_a_replica_answers(make_swarm, demo_model):
    """SIGSTOP the serving replica until it is banned, SIGCONT it, then SIGSTOP the other: every
    request is served (a 30 s ban of the first left no peer: 503 for ~17 s)."""
    swarm = make_swarm(demo_model, model_name=MODEL)
    swarm.start_dht()
    # records outlive the stall (as with the default ttl of 15 s and a 10 s stall)
    replicas = swarm.start_peers([(0, 4), (0, 4)], "--threads", "1", "--ttl", "60")
    gateway = swarm.start_gateway(None, "--step-timeout", "2", "--failover-timeout", "3")
    assert wait_until(lambda: complete(gateway.address).status_code == 200, 30)
    # one conversation, pinned to its route: its next request goes to the stalled peer, whatever
    # the gateway's round-trip probes have learnt about that peer meanwhile (new routes avoid it)
    pinned = {"X-Session-Id": "stalled-peer-conversation"}
    first_response = complete(gateway.address, headers=pinned)
    serving = first_response.headers["x-swarm-route"]
    statuses = [first_response.status_code]
    stalled = next(child for child in replicas if f"peer {serving} serving" in child.log())
    other = next(child for child in replicas if child is not stalled)
    stalled.signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while serving not in banned(gateway.address) and time.monotonic() < deadline:
            statuses.append(complete(gateway.address, headers=pinned).status_code)
        assert serving in banned(gateway.address), "the stalled peer was never banned"
    finally:
        stalled.signal(signal.SIGCONT)
    other.signal(signal.SIGSTOP)
    try:
        for _ in range(5):
            statuses.append(complete(gateway.address).status_code)
        # it answers again: readmitted by the probe, long before its 30 s ban runs out
        assert wait_until(lambda: serving not in banned(gateway.address), 10), "the peer was not readmitted"
    finally:
        other.signal(signal.SIGCONT)
    assert set(statuses) == {200}, statuses


def test_a_chunked_body_past_the_limit_is_refused_before_it_is_read(demo_gateway):
    gateway = demo_gateway("abuse")
    host, port = gateway.address.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * (1 << 20)
        framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        sock.settimeout(0.05)
        answer = b""
        try:
            while sent < 50 and not answer:  # 50 MiB if it were all read
                sock.sendall(framed)
                sent += 1
                with contextlib.suppress(TimeoutError):
                    answer = sock.recv(4096)
        except (BrokenPipeError, ConnectionResetError):  # the server closed after its 413
            pass
        sock.settimeout(10)
        if not answer:
            answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 16, f"{sent} MiB were sent before the 413"
    assert complete(gateway.address, model="swarm-demo").status_code == 200


def test_a_megabyte_stop_string_leaves_the_gateway_as_it_was(demo_gateway):
    gateway = demo_gateway("abuse")
    before = rss_kib(gateway.process.pid)
    for _ in range(3):
        response = complete(gateway.address, model="swarm-demo", stop=["x" * (1 << 20)])
        assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    assert rss_kib(gateway.process.pid) - before < 64 * 1024  # KiB: it grew 22 GB and died
    assert complete(gateway.address, model="swarm-demo").status_code == 200

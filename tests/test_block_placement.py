"""Peers started without --blocks choose their spans, and move when the swarm loses a span.

Four peers with room for four blocks each join an 8-block model one after another: the model is
covered twice. Then both peers of [0, 4) are SIGKILLed while a stream runs through one of them:
a peer of [4, 8) moves there within two balance intervals (drain, load, announce) and the stream
completes with the text it has without any failure.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.slow

MODEL = "m8"
BALANCE_INTERVAL = 4.0
PEER_FLAGS = ("--threads", "1", "--num-blocks", "4", "--balance-interval", str(BALANCE_INTERVAL),
              "--drain-timeout", "10", "--metrics-port", "0")  # fmt: skip
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Move the blocks."}],
    "max_tokens": 200,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


@pytest.fixture(scope="module")
def model8(tmp_path_factory):
    from peer.demo_model import create_demo_model

    return create_demo_model(tmp_path_factory.mktemp("models") / "m8", preset="tiny", num_hidden_layers=8)


def _span(child) -> tuple[int, int]:
    found = re.findall(r"(?:chose|now serving) blocks \[(\d+), (\d+)\)", child.log())
    return (int(found[-1][0]), int(found[-1][1])) if found else (-1, -1)


def _stream(address: str, out: dict, on_text=None) -> None:
    text = ""
    with httpx.stream("POST", f"{address}/v1/chat/completions", json=BODY, timeout=120) as response:
        out["route"] = response.headers.get("x-swarm-route", "")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[len("data: ") :])
            out.setdefault("errors", []).extend([payload["error"]] if "error" in payload else [])
            for choice in payload.get("choices", []):
                text += choice["delta"].get("content") or ""
            if on_text is not None and text:
                on_text()
                on_text = None
    out["text"] = text


def test_chosen_spans_cover_the_model_and_a_peer_moves_to_a_lost_span(model8, make_swarm):
    swarm = make_swarm(model8, model_name=MODEL)
    swarm.start_dht()
    peers = [swarm.start_peer(None, None, *PEER_FLAGS) for _ in range(4)]  # one after another
    assert sorted(_span(peer) for peer in peers) == [(0, 4), (0, 4), (4, 8), (4, 8)]
    gateway = swarm.start_gateway(None, "--failover-timeout", "40", "--step-timeout", "5")

    reference: dict = {}
    _stream(gateway.address, reference)
    assert reference.get("text") and not reference.get("errors")

    front = [peer for peer in peers if _span(peer) == (0, 4)]
    back = [peer for peer in peers if _span(peer) == (4, 8)]
    killed_at: list[float] = []

    def kill_front() -> None:
        for peer in front:
            peer.signal(signal.SIGKILL)
        killed_at.append(time.monotonic())

    result: dict = {}
    worker = threading.Thread(target=_stream, args=(gateway.address, result, kill_front))
    worker.start()
    moved = wait_until(lambda: [p for p in back if _span(p) == (0, 4)], timeout=4 * BALANCE_INTERVAL + 30)
    worker.join(120)
    assert moved, [p.log()[-2000:] for p in back]
    # within two balance intervals (x1.5 jitter) of the loss, plus the record's ttl to notice it
    # and the drain and load of the move
    moved_at = time.monotonic()
    assert moved_at - killed_at[0] <= 2 * 1.5 * BALANCE_INTERVAL + 20
    assert not result.get("errors"), result.get("errors")
    assert result.get("text") == reference["text"]

    # What operators see: every peer chose its span; the gateway saw the move announced (with its
    # target) and counts it; the peer that moved counts its own move.
    peers_now = httpx.get(f"{gateway.address}/swarm/api", timeout=10).json()["models"][0]["peers"]
    live = [peer for peer in peers_now if peer["reachable"]]
    assert live and all(peer["auto_span"] for peer in live), peers_now
    gateway_metrics = httpx.get(f"{gateway.address}/metrics", timeout=10).text
    seen = float(re.search(r"^swarm_gateway_peer_moves_seen_total (\S+)$", gateway_metrics, re.M).group(1))
    assert seen >= 1, "the gateway's lookups saw the move's draining record with its target"
    mover = next(peer for peer in live if peer["start"] == 0)
    host = mover["address"].rsplit(":", 1)[0]
    peer_metrics = httpx.get(f"http://{host}:{mover['metrics_port']}/metrics", timeout=10).text
    assert re.search(r"^swarm_peer_moves_total 1\.0$", peer_metrics, re.M), peer_metrics[-2000:]

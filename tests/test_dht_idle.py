"""A request never waits on the DHT: after a peer is SIGKILLed and replaced, a request that follows
an idle period longer than the records' ttl starts as fast as one without the pause.

Before, the gateway refreshed its snapshot only when requests came: after the pause every record
in it had expired, so the request looked the model up in the DHT, and the lookup waited a whole
RPC timeout (2 s) on the killed peer's DHT node, still in the routing tables (~2.05 s instead of
~0.04 s to the first token).
"""

from __future__ import annotations

import signal
import time

import openai
import pytest

from tests.conftest import TTL

pytestmark = pytest.mark.slow

MODEL = "m"
BOUND_S = 1.0  # well under the 2 s DHT RPC timeout a lookup waits on a dead node


def _time_to_first_token(client: openai.OpenAI, content: str) -> float:
    begin = time.monotonic()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0, stream=True
    )
    first = None
    for chunk in stream:
        if first is None and any(choice.delta.content for choice in chunk.choices):
            first = time.monotonic() - begin
    assert first is not None
    return first


def test_first_token_after_churn_and_an_idle_period_longer_than_the_ttl(demo_model, make_swarm):
    swarm = make_swarm(demo_model, model_name=MODEL)
    swarm.start_dht()
    swarm.start_peer(0, 2, "--threads", "1")
    doomed = swarm.start_peer(2, 4, "--threads", "1")
    gateway = swarm.start_gateway()
    client = openai.OpenAI(base_url=f"{gateway.address}/v1", api_key="unused", max_retries=0)
    _time_to_first_token(client, "warm up")

    doomed.signal(signal.SIGKILL)  # no goodbye: its DHT node stays in everyone's routing tables
    swarm.start_peer(2, 4, "--threads", "1")
    time.sleep(TTL + 1.0)  # the killed peer's record is gone; the replacement's is in the view
    without_pause = [_time_to_first_token(client, f"no pause {i}") for i in range(2)]

    time.sleep(TTL + 2.0)  # every record the gateway held at the last request has expired
    after_pause = _time_to_first_token(client, "after a pause")
    assert max(without_pause) < BOUND_S, without_pause
    assert after_pause < BOUND_S, (after_pause, without_pause)

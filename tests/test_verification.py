"""Checks on what peers answer: malformed answers and lies are caught, their peers convicted, and the
client's stream is what a clean swarm gives.

Fast tests drive `gateway.answer_checks` on real `StepResult`s made by the peer's own tensor codec.
The slow ones share one swarm of the demo model (4 blocks): honest peers ([0, 2) twice, [2, 4)
once) and, once the clean outputs are recorded, peers that announce a high throughput (so routes
prefer them, as an attacker's would) and answer badly (`tests/lying_peer.py`): NaN hidden states,
a row short, a token id past the vocabulary, and one that perturbs its hidden states on half of
its steps. The gateway re-executes every step (`--verify-fraction 1`).
"""

from __future__ import annotations

import json
import math
import statistics
import sys

import httpx
import numpy as np
import pytest

from gateway.answer_checks import hidden_distance, malformed, rows_as_float32, tokens_agree
from protos import swarm_pb2
from swarm.launcher import LocalSwarm
from tests.conftest import HEARTBEAT, TTL, wait_until

MODEL = "swarm-demo"


def tensor(values: np.ndarray, dtype: str = "float32") -> swarm_pb2.Tensor:
    if dtype == "bfloat16":
        raw = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    else:
        raw = values.astype(dtype)
    return swarm_pb2.Tensor(data=raw.tobytes(), dtype=dtype, shape=list(values.shape))


def hidden_result(values: np.ndarray, dtype: str = "float32") -> swarm_pb2.StepResult:
    return swarm_pb2.StepResult(hidden=tensor(values, dtype))


def test_malformed_hidden_states_are_named():
    good = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    kwargs = {"rows": 3, "hidden_size": 8, "vocab_size": 100, "last": False, "sampled": False}
    assert malformed(hidden_result(good), **kwargs) is None
    assert malformed(hidden_result(good, "bfloat16"), **kwargs) is None
    assert "shape" in malformed(hidden_result(good[:2]), **kwargs)
    assert "shape" in malformed(hidden_result(good[:, :7]), **kwargs)
    assert "shape" in malformed(hidden_result(good.reshape(-1)), **{**kwargs, "rows": 24})
    bad = good.copy()
    bad[1, 2] = np.nan
    assert "NaN" in malformed(hidden_result(bad), **kwargs)
    bad[1, 2] = np.inf
    assert "NaN or infinity" in malformed(hidden_result(bad), **kwargs)
    short = hidden_result(good)
    short.hidden.data = short.hidden.data[:-4]
    assert "decode" in malformed(short, **kwargs)
    assert "asked for" in malformed(hidden_result(good), **kwargs, wire_dtype="bfloat16")
    assert "no hidden" in malformed(swarm_pb2.StepResult(), **kwargs)


def test_malformed_tokens_are_named():
    kwargs = {"rows": 1, "hidden_size": 8, "vocab_size": 100, "last": True, "sampled": True}
    ok = swarm_pb2.StepResult(token_id=99, logprob=-0.5)
    assert malformed(ok, **kwargs) is None
    assert malformed(swarm_pb2.StepResult(token_id=100), **kwargs).startswith("token id 100 outside")
    assert malformed(swarm_pb2.StepResult(token_id=-1), **kwargs).startswith("token id -1 outside")
    assert "log-probability" in malformed(swarm_pb2.StepResult(token_id=3, logprob=0.5), **kwargs)
    assert "log-probability" in malformed(swarm_pb2.StepResult(token_id=3, logprob=math.nan), **kwargs)
    alt = swarm_pb2.StepResult(token_id=3, top_logprobs=[swarm_pb2.TopLogprob(token_id=1000, logprob=-1)])
    assert "top_logprobs" in malformed(alt, **kwargs)
    mask = bytearray(13)
    mask[0] = 0b1000  # only token 3
    assert malformed(swarm_pb2.StepResult(token_id=3), **kwargs, allowed_mask=bytes(mask)) is None
    assert "not allowed" in malformed(swarm_pb2.StepResult(token_id=4), **kwargs, allowed_mask=bytes(mask))
    assert malformed(swarm_pb2.StepResult(token_id=100), **{**kwargs, "sampled": False}) is None


def test_hidden_distance_is_scale_free_and_reads_bfloat16():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((5, 16)).astype(np.float32) * 40
    assert hidden_distance(tensor(base), tensor(base), 5) == 0.0
    # bfloat16 keeps 8 bits of mantissa: the round trip is within 2^-8 of the scale
    assert rows_as_float32(tensor(base, "bfloat16")).shape == (5, 16)
    assert hidden_distance(tensor(base, "bfloat16"), tensor(base), 5) < 2**-7
    noisy = base + 0.1 * base.std() * rng.standard_normal(base.shape).astype(np.float32)
    assert hidden_distance(tensor(noisy), tensor(base), 5) > 0.01
    # only the last `rows` rows count: the check replays the history, the route ran the step alone
    longer = np.concatenate([rng.standard_normal((7, 16)).astype(np.float32), base])
    assert hidden_distance(tensor(base[-2:]), tensor(longer), 2) == 0.0
    assert hidden_distance(tensor(base[:, :8]), tensor(base), 5) == math.inf


def test_tokens_agree_on_the_same_token_or_a_near_tie():
    reference = swarm_pb2.StepResult(
        token_id=5, logprob=-0.6931, top_logprobs=[swarm_pb2.TopLogprob(token_id=5, logprob=-0.6931),
                                                   swarm_pb2.TopLogprob(token_id=9, logprob=-0.6932)]
    )  # fmt: skip
    assert tokens_agree(swarm_pb2.StepResult(token_id=5), reference, 1e-3)
    assert tokens_agree(swarm_pb2.StepResult(token_id=9), reference, 1e-3)
    assert not tokens_agree(swarm_pb2.StepResult(token_id=9), reference, 1e-5)
    assert not tokens_agree(swarm_pb2.StepResult(token_id=7), reference, 1.0)


def test_a_decode_loops_length_is_drawn_as_a_pick_per_step_would_be():
    """A decode loop runs until the verifier's next checked step (`Verifier.unpicked_run`): the
    number of steps passed over must be distributed as `pick` per step gives it (geometric), or the
    loop would change how often steps are checked."""
    import random

    from gateway.verification import Verifier

    assert Verifier(0.0).unpicked_run(500) == 500
    assert Verifier(1.0).unpicked_run(500) == 0
    fraction, draws = 0.05, 20000
    verifier = Verifier(fraction, random.Random(7))
    runs = [verifier.unpicked_run(10**9) for _ in range(draws)]
    assert abs(statistics.mean(runs) - (1 - fraction) / fraction) < 0.05 * (1 - fraction) / fraction
    for k in (1, 10, 40):
        share = sum(run >= k for run in runs) / draws
        assert abs(share - (1 - fraction) ** k) < 0.02, (k, share)
    capped = Verifier(fraction, random.Random(8))
    assert max(capped.unpicked_run(30) for _ in range(1000)) == 30  # (0.95 ** 30: a fifth reach it)


def test_a_sampled_token_is_checked_only_on_a_peer_of_the_same_version():
    """The same seed draws the same token only with the same sampler: a replica or referee for a
    draw (a sampled step at a temperature) announces the route's peer's version; for hidden states
    and greedy tokens any version will do."""
    import random
    from types import SimpleNamespace

    from discovery.records import PeerRecord
    from gateway.routing import Hop
    from gateway.verification import Verifier, _draws

    def record(peer_id: str, version: str) -> PeerRecord:
        return PeerRecord(peer_id, f"127.0.0.1:{len(peer_id) + 5000}", MODEL, 2, 4, 4, version=version,
                          free_cache_tokens=1000)  # fmt: skip

    records = [record("own", "0.2.0"), record("older", "0.1.0"), record("same", "0.2.0")]
    failover = SimpleNamespace(known=lambda: records, excluded=set)
    hop = Hop("own", records[0].address, 2, 4)
    verifier = Verifier(1.0, random.Random(0))
    picked = {verifier._other_peer(failover, hop, {"own"}, 10, draws=True).peer_id for _ in range(20)}
    assert picked == {"same"}
    picked = {verifier._other_peer(failover, hop, {"own"}, 10, draws=False).peer_id for _ in range(40)}
    assert picked == {"same", "older"}

    def runner(temperature: float):
        return SimpleNamespace(
            route=[Hop("a", "x:1", 0, 2), hop], sampling=swarm_pb2.SamplingParams(temperature=temperature)
        )

    assert _draws(runner(0.8), hop, sample=True)
    assert not _draws(runner(0.0), hop, sample=True)  # greedy: any version takes the argmax
    assert not _draws(runner(0.8), hop, sample=False)
    assert not _draws(runner(0.8), Hop("a", "x:1", 0, 2), sample=True)  # hidden states


# -- real processes ----------------------------------------------------------------------------------

BODIES = [
    {"model": MODEL, "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0, "ignore_eos": True},
    {"model": MODEL, "prompt": "The swarm answers", "max_tokens": 16, "temperature": 0.9, "seed": 11,
     "ignore_eos": True},
]  # fmt: skip


def liar(mode: str, fraction: float = 1.0, throughput: float = 1e6) -> tuple[str, ...]:
    env = (
        "env",
        f"LIE_MODE={mode}",
        f"LIE_FRACTION={fraction}",
        f"LIE_THROUGHPUT={throughput}",
        "LIE_SEED=3",
    )
    return (*env, sys.executable, "-m", "tests.lying_peer")


def stream_text(address: str, body: dict) -> tuple[str, list[str]]:
    """The streamed completion's text and its route; fails on an error event."""
    text = ""
    with httpx.stream("POST", f"{address}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        route = r.headers["x-swarm-route"].split(",")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[len("data: ") :])
            assert "error" not in payload, payload
            text += "".join(choice["text"] for choice in payload["choices"])
    return text, route


@pytest.fixture(scope="module")
def swarm(demo_model, tmp_path_factory):
    local = LocalSwarm(demo_model, workdir=tmp_path_factory.mktemp("verify-swarm"), heartbeat=HEARTBEAT, ttl=TTL,
                       model_name=MODEL)  # fmt: skip
    try:
        local.start_dht()
        local.start_peers([(0, 2), (0, 2), (2, 4)], "--threads", "1")
        local.gateway = local.start_gateway(None, "--verify-fraction", "1", "--failover-timeout", "5")
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def clean(swarm) -> list[str]:
    """What each body gives on the honest swarm, before any bad peer joins."""
    return [stream_text(swarm.gateway.address, body)[0] for body in BODIES]


def peers_by_address(address: str) -> dict[str, dict]:
    snapshot = httpx.get(f"{address}/swarm/api", timeout=10).json()
    return {peer["address"]: peer for peer in snapshot["models"][0]["peers"]}


def start_bad_peers(swarm: LocalSwarm, spans_and_wraps) -> list[str]:
    children = [
        swarm.spawn_peer(start, end, "--threads", "1", wrap=wrap) for start, end, wrap in spans_and_wraps
    ]
    for child in children:
        child.address = child.wait_for_line("PEER_READY", 120)
    addresses = [child.address.split()[0] for child in children]
    # the gateway must see them (and their high throughput) before the streams start
    assert wait_until(lambda: set(addresses) <= set(peers_by_address(swarm.gateway.address)), 20), addresses
    return addresses


def metric(address: str, name: str) -> dict[str, float]:
    text = httpx.get(f"{address}/metrics", timeout=10).text
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    }


@pytest.mark.slow
def test_malformed_answers_convict_their_peers_and_the_stream_fails_over(swarm, clean):
    bad = start_bad_peers(swarm, [(0, 2, liar("nan")), (0, 2, liar("shape")), (2, 4, liar("token"))])
    for body, expected in zip(BODIES, clean, strict=True):
        text, _ = stream_text(swarm.gateway.address, body)
        assert text == expected
    peers = peers_by_address(swarm.gateway.address)
    assert [peers[a]["convicted"] for a in bad] == ["malformed"] * 3
    assert all(peers[a]["health"] == "convicted" for a in bad)
    convicted = metric(swarm.gateway.address, "swarm_gateway_convicted_peers")
    for address in bad:
        assert (
            convicted[
                f'swarm_gateway_convicted_peers{{peer_id="{peers[address]["peer_id"]}",reason="malformed"}}'
            ]
            == 1
        )
    # and they stay out: the next stream runs on honest peers only
    text, route = stream_text(swarm.gateway.address, BODIES[0])
    assert text == clean[0] and not {peers[a]["peer_id"] for a in bad} & set(route)


@pytest.mark.slow
def test_a_lying_peer_is_convicted_and_the_stream_matches_a_clean_run(swarm, clean):
    (address,) = start_bad_peers(swarm, [(0, 2, liar("perturb", fraction=0.5))])
    for body, expected in zip(BODIES, clean, strict=True):
        text, route = stream_text(swarm.gateway.address, body)
        assert text == expected
    peers = peers_by_address(swarm.gateway.address)
    assert peers[address]["convicted"] == "disagreed" and peers[address]["health"] == "convicted"
    honest = [p for a, p in peers.items() if not p["convicted"]]
    assert len(honest) == 3  # a referee sided with the honest replica; nobody honest was banned
    checks = metric(swarm.gateway.address, "swarm_gateway_answer_checks_total")
    assert checks['swarm_gateway_answer_checks_total{outcome="convicted"}'] >= 1
    assert checks['swarm_gateway_answer_checks_total{outcome="agreed"}'] >= 10
    assert (
        metric(swarm.gateway.address, "swarm_gateway_peers_convicted_total")[
            'swarm_gateway_peers_convicted_total{reason="disagreed"}'
        ]
        == 1
    )

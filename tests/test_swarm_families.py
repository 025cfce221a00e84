"""Families through real peer processes: greedy decoding of a prompt longer than the sliding
window, found via the DHT and driven by the gateway's route runner, gives `transformers`'
tokens, and the last span's log-probabilities agree to 1e-4 (fp32).

Four families that exercise the most switches at once: Gemma 2 (alternating window layers,
soft-capping, sandwich norms, embedding scale), Qwen3-MoE (experts, q/k norms, a dense first
layer, tied embeddings) and BLOOM (ALiBi, LayerNorm, fused per-head qkv, `transformer.h.N`
names), and gpt-oss (attention sinks, alternating windows, clamped SwiGLU experts with biases,
top-k-then-softmax routing, YaRN) over three uneven peers. The rest of the table is exact in-process (tests/test_families.py) through the same code.

DeepSeek-V3 (latent attention caches, grouped routing, shared experts) shares one swarm of four
peers between its tests: a 2-peer route, a 3-peer uneven route, and a failover whose replacement
rebuilds the latent caches by replaying the history.
"""

from __future__ import annotations

import signal

import pytest
import torch

from peer.demo_families import WINDOW, create_family_model
from swarm.launcher import LocalSwarm
from tests.conftest import HEARTBEAT, TTL
from tests.test_swarm_exactness import NEW_TOKENS, assert_exact, reference, through_swarm

pytestmark = pytest.mark.slow

CASES = [
    ("gemma2", [(0, 1), (1, 3), (3, 4)]),
    ("qwen3_moe", [(0, 2), (2, 4)]),
    ("bloom", [(0, 3), (3, 4)]),
    ("gpt_oss", [(0, 1), (1, 3), (3, 4)]),
]


@pytest.mark.parametrize(("arch", "spans"), CASES, ids=[arch for arch, _ in CASES])
async def test_family_through_peers_matches_transformers(arch, spans, tmp_path):
    model_dir = create_family_model(tmp_path / arch, arch)
    prompt = torch.randint(9, 320, (3 * WINDOW,), generator=torch.Generator().manual_seed(3)).tolist()
    with LocalSwarm(model_dir, workdir=tmp_path, heartbeat=HEARTBEAT, ttl=TTL, model_name="m") as local:
        local.start_dht()
        local.start_peers(spans, "--threads", "1")
        run = await through_swarm(local, "m", spans[-1][1], prompt)

    assert [(hop.start, hop.end) for hop in run.route] == spans
    assert len(run.events) == NEW_TOKENS
    assert_exact(run.events, reference(model_dir, prompt))


# ---- DeepSeek-V3 (MLA latent caches, grouped routing): one swarm, three routes -----------------
DEEPSEEK_PEERS = [(0, 2), (2, 4), (0, 1), (1, 2)]  # the [0, 2) peer is killed by the last test
DEEPSEEK_TOKENS = 48


@pytest.fixture(scope="module")
def deepseek_swarm(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("deepseek_v3")
    model_dir = create_family_model(root / "model", "deepseek_v3")
    prompt = torch.randint(9, 320, (3 * WINDOW,), generator=torch.Generator().manual_seed(3)).tolist()
    with LocalSwarm(model_dir, workdir=root, heartbeat=HEARTBEAT, ttl=TTL, model_name="m") as local:
        local.start_dht()
        children = [local.spawn_peer(start, end, "--threads", "1") for start, end in DEEPSEEK_PEERS]
        expected = reference(model_dir, prompt, DEEPSEEK_TOKENS)  # while the peers start
        for child in children:
            child.address = child.wait_for_line("PEER_READY", 120.0)
        yield local, children, prompt, expected


async def _deepseek_run(local: LocalSwarm, spans, prompt, kill=None):
    """Over exactly `spans`, failover on; `kill(events, route)` after every token."""
    return await through_swarm(
        local, "m", 4, prompt, new_tokens=DEEPSEEK_TOKENS, spans=spans, failover_timeout=20.0,
        after_event=kill,
    )  # fmt: skip


@pytest.mark.parametrize(
    "spans", [[(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 4)]], ids=["2-peers", "3-peers-uneven"]
)
async def test_deepseek_through_peers_matches_transformers(deepseek_swarm, spans):
    local, _, prompt, expected = deepseek_swarm
    run = await _deepseek_run(local, spans, prompt)
    assert [(hop.start, hop.end) for hop in run.route] == spans
    assert_exact(run.events, expected)


async def test_deepseek_failover_replays_latent_caches_exactly(deepseek_swarm):
    """The [0, 2) peer is SIGKILLed after 20 tokens: its blocks move to [0, 1) + [1, 2), which
    rebuild their latent caches by replaying the history, and the stream stays transformers'."""
    local, children, prompt, expected = deepseek_swarm

    def kill(events, _route):
        if len(events) == 20:
            children[0].signal(signal.SIGKILL)

    run = await _deepseek_run(local, [(0, 2), (2, 4)], prompt, kill)
    assert [(hop.start, hop.end) for hop in run.route] == [(0, 2), (2, 4)]
    assert [(hop.start, hop.end) for hop in run.runner.route] == [(0, 1), (1, 2), (2, 4)]
    assert_exact(run.events, expected)

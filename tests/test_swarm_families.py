"""Families through real peer processes: greedy decoding of a prompt longer than the sliding
window, found via the DHT and driven by the gateway's route runner, gives `transformers`'
tokens, and the last span's log-probabilities agree to 1e-4 (fp32).

Four families that exercise the most switches at once: Gemma 2 (alternating window layers,
soft-capping, sandwich norms, embedding scale), Qwen3-MoE (experts, q/k norms, a dense first
layer, tied embeddings) and BLOOM (ALiBi, LayerNorm, fused per-head qkv, `transformer.h.N`
names), and gpt-oss (attention sinks, alternating windows, clamped SwiGLU experts with biases,
top-k-then-softmax routing, YaRN) over three uneven peers. The rest of the table is exact in-process (tests/test_families.py) through the same code.
"""

from __future__ import annotations

import pytest
import torch

from peer.demo_families import WINDOW, create_family_model
from swarm.launcher import LocalSwarm
from tests.conftest import HEARTBEAT, TTL
from tests.test_swarm_exactness import NEW_TOKENS, reference, through_swarm

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
        route, events, _ = await through_swarm(local, "m", spans[-1][1], prompt)

    assert [(hop.start, hop.end) for hop in route] == spans
    expected_tokens, expected_logprobs = reference(model_dir, prompt)
    assert [event.token_id for event in events] == expected_tokens
    assert len(events) == NEW_TOKENS
    for position, event in enumerate(events):
        top_ids = [token for token, _ in event.top_logprobs]
        got = torch.tensor([logprob for _, logprob in event.top_logprobs])
        torch.testing.assert_close(got, expected_logprobs[position, top_ids], atol=1e-4, rtol=0)

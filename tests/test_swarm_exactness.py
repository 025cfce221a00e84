"""The distributed model is the model: greedy decoding through real peer processes, found via the
DHT and driven by the gateway's own route runner, gives exactly `transformers` `generate()`'s
tokens, and the last span's log-probabilities agree with the reference logits to 1e-4 (fp32)."""

from __future__ import annotations

import pytest
import torch

from gateway.generation import GenerationParams, RouteRunner, Swarm, generate
from peer.client import ChannelPool
from protos import swarm_pb2
from swarm.dht import SwarmDHT, parse_address
from swarm.launcher import LocalSwarm
from tests.conftest import HEARTBEAT, TTL

NEW_TOKENS = 64
TOP = 5


def reference(model_dir, prompt: list[int], new_tokens: int = NEW_TOKENS) -> tuple[list[int], torch.Tensor]:
    """`transformers` greedy `generate()` on `prompt`, EOS ignored: the tokens and their log-probabilities."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # no EOS: the swarm run ignores it too, and a min_new_tokens processor would mask it instead
    model.generation_config.eos_token_id = None
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
    return tokens, logprobs


async def through_swarm(local: LocalSwarm, model_id: str, num_blocks: int, prompt: list[int]):
    dht = SwarmDHT()
    await dht.start("127.0.0.1", 0, [parse_address(local.dht_address)])
    pool = ChannelPool()
    try:
        swarm = Swarm(dht, pool)
        route = await swarm.plan(model_id, num_blocks)
        sampling = swarm_pb2.SamplingParams(temperature=0.0, logprobs=True, top_logprobs=TOP)
        params = GenerationParams(prompt_ids=prompt, max_new_tokens=NEW_TOKENS, sampling=sampling, ignore_eos=True)
        events = [event async for event in generate(RouteRunner(pool, route, 30.0), params, len(prompt) + NEW_TOKENS)]
        return route, events
    finally:
        await pool.close()
        dht.stop()


@pytest.mark.parametrize(
    ("model_fixture", "spans", "flags"),
    [
        ("demo_model", [(0, 2), (2, 4)], ()),
        ("demo_model", [(0, 1), (1, 3), (3, 4)], ("--prepack",)),  # oneDNN-packed weights (peer.gemm)
        ("tiny_model", [(0, 1), (1, 3)], ()),
    ],
    ids=["demo-2-peers", "demo-3-peers-uneven-prepacked", "tiny-gqa-2-peers-uneven"],
)
async def test_greedy_tokens_and_logprobs_match_transformers(model_fixture, spans, flags, request, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    num_blocks = spans[-1][1]
    vocab = int(__import__("json").loads((model_dir / "config.json").read_text())["vocab_size"])
    prompt = torch.randint(10, vocab, (12,), generator=torch.Generator().manual_seed(3)).tolist()

    with LocalSwarm(model_dir, workdir=tmp_path, heartbeat=HEARTBEAT, ttl=TTL, model_name="m") as local:
        local.start_dht()
        local.start_peers(spans, "--threads", "1", *flags)
        route, events = await through_swarm(local, "m", num_blocks, prompt)

    assert [(hop.start, hop.end) for hop in route] == spans
    expected_tokens, expected_logprobs = reference(model_dir, prompt)
    assert [event.token_id for event in events] == expected_tokens
    for step, event in enumerate(events):
        top_ids = [token for token, _ in event.top_logprobs]
        got = torch.tensor([logprob for _, logprob in event.top_logprobs])
        want = expected_logprobs[step, top_ids]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert top_ids == expected_logprobs[step].topk(TOP).indices.tolist()
        assert abs(event.logprob - expected_logprobs[step, event.token_id].item()) < 1e-4

"""The distributed model is the model: greedy decoding through real peer processes, found via the
DHT and driven by the gateway's own route runner, gives exactly `transformers` `generate()`'s
tokens, and the last span's log-probabilities agree with the reference logits to 1e-4 (fp32).
Hidden states travel peer to peer (push, the default) or through the gateway (relay); both are
exact, and the push runs are checked to have pushed every step."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch

from common.peer_client import ChannelPool
from discovery.dht import SwarmDHT
from discovery.records import parse_address
from gateway.failure_policy import FailurePolicy
from gateway.generation import GenerationParams, RouteRunner, generate
from gateway.routing import Route
from gateway.swarm_view import SwarmView
from protos import swarm_pb2
from swarm.launcher import LocalSwarm
from tests.conftest import HEARTBEAT, TTL, wait_until_async

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


@dataclass
class SwarmRun:
    route: Route  # as first planned; `runner.route` is the route after any failover
    events: list
    runner: RouteRunner


async def through_swarm(
    local: LocalSwarm,
    model_id: str,
    num_blocks: int,
    prompt: list[int],
    push: bool = True,
    *,
    new_tokens: int = NEW_TOKENS,
    spans: list[tuple[int, int]] | None = None,
    failover_timeout: float | None = None,
    step_timeout: float = 30.0,
    live_only: bool = False,
    planned=None,
    after_event=None,
) -> SwarmRun:
    """Greedy decoding of `prompt` through the swarm's peers, found via its DHT and driven by the
    gateway's own route runner, with logprobs and the top `TOP` alternatives.

    `spans`: plan only over peers whose span is one of these. `failover_timeout`: failover on,
    replacing a lost hop within that many seconds. `live_only`: first wait until the DHT lists
    only peers that are alive (one an earlier test killed stays listed until its record expires,
    and a route through it would fail over on its own). `planned()` runs once the route is planned,
    `after_event(events, route)` after every token; both in a thread, as they may start or kill
    processes."""
    dht = SwarmDHT()
    await dht.start("127.0.0.1", 0, [parse_address(local.dht_address)])
    pool = ChannelPool()
    try:
        view = SwarmView(dht)
        if live_only:
            live = {child.address for child in local.children if child.process.poll() is None}

            async def only_live_listed() -> bool:
                return all(record.address in live for record in await dht.peers(model_id))

            await wait_until_async(only_live_listed, 4 * TTL, interval=0.5)
        accept = None if spans is None else (lambda record: (record.start, record.end) in set(spans))
        route = await view.plan(model_id, num_blocks, accept=accept)
        if planned is not None:
            await asyncio.to_thread(planned)
        failover = None
        if failover_timeout is not None:
            failover = FailurePolicy(replace_timeout=failover_timeout).bind(view, model_id, num_blocks)
        sampling = swarm_pb2.SamplingParams(temperature=0.0, logprobs=True, top_logprobs=TOP)
        params = GenerationParams(
            prompt_ids=prompt, max_new_tokens=new_tokens, sampling=sampling, ignore_eos=True
        )
        runner = RouteRunner(pool, route, step_timeout, failover=failover, push=push)
        events = []
        async for event in generate(runner, params):
            events.append(event)
            if after_event is not None:
                await asyncio.to_thread(after_event, events, route)
        return SwarmRun(route, events, runner)
    finally:
        await pool.close()
        dht.stop()


def assert_exact(events, expected: tuple[list[int], torch.Tensor]) -> None:
    """`events` are `reference`'s tokens, and each one's logprob and top alternatives (ids and
    values) agree with its log-probabilities to 1e-4."""
    expected_tokens, expected_logprobs = expected
    assert [event.token_id for event in events] == expected_tokens
    for step, event in enumerate(events):
        top_ids = [token for token, _ in event.top_logprobs]
        got = torch.tensor([logprob for _, logprob in event.top_logprobs])
        torch.testing.assert_close(got, expected_logprobs[step, top_ids], atol=1e-4, rtol=0)
        assert top_ids == expected_logprobs[step].topk(TOP).indices.tolist()
        assert abs(event.logprob - expected_logprobs[step, event.token_id].item()) < 1e-4


@pytest.mark.parametrize(
    ("model_fixture", "spans", "flags", "push"),
    [
        ("demo_model", [(0, 2), (2, 4)], (), True),
        ("demo_model", [(0, 1), (1, 3), (3, 4)], ("--prepack",), True),  # oneDNN-packed weights (peer.gemm)
        ("tiny_model", [(0, 1), (1, 3)], (), False),
    ],
    ids=["demo-2-peers-push", "demo-3-peers-uneven-prepacked-push", "tiny-gqa-2-peers-uneven-relay"],
)
async def test_greedy_tokens_and_logprobs_match_transformers(
    model_fixture, spans, flags, push, request, tmp_path
):
    model_dir = request.getfixturevalue(model_fixture)
    num_blocks = spans[-1][1]
    vocab = int(__import__("json").loads((model_dir / "config.json").read_text())["vocab_size"])
    prompt = torch.randint(10, vocab, (12,), generator=torch.Generator().manual_seed(3)).tolist()

    with LocalSwarm(model_dir, workdir=tmp_path, heartbeat=HEARTBEAT, ttl=TTL, model_name="m") as local:
        local.start_dht()
        local.start_peers(spans, "--threads", "1", *flags)
        run = await through_swarm(local, "m", num_blocks, prompt, push)

    assert [(hop.start, hop.end) for hop in run.route] == spans
    # every step (the prefill, then one per sampled token but the last) went peer to peer, or none
    assert run.runner.pushed_steps == (NEW_TOKENS if push else 0)
    assert_exact(run.events, reference(model_dir, prompt))


# -- prompt logprobs (completions' echo + logprobs) ------------------------------------------------
CHUNK = 8  # --max-batch-tokens of the scoring swarm: longer prompts are prefilled in chunks


@pytest.fixture(scope="module")
def scoring_swarm(demo_model, tmp_path_factory):
    """Two peers that prefill in chunks of CHUNK tokens, and a gateway."""
    local = LocalSwarm(demo_model, workdir=tmp_path_factory.mktemp("scoring"), heartbeat=HEARTBEAT, ttl=TTL,
                       model_name="m")  # fmt: skip
    try:
        local.start_dht()
        local.start_peers([(0, 2), (2, 4)], "--threads", "1", "--max-batch-tokens", str(CHUNK))
        local.start_gateway(None)
        yield local
    finally:
        local.stop()


def test_echoed_prompt_logprobs_match_transformers(scoring_swarm, demo_model):
    """lm-evaluation-harness's scoring request (echo, logprobs 1, max_tokens 0) through the OpenAI
    SDK: every prompt token's logprob is transformers' log_softmax of the same weights, and the
    top-1 entry is its argmax, also for a prompt prefilled in several chunks."""
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gateway.text import TokenPieces

    vocab = int(__import__("json").loads((demo_model / "config.json").read_text())["vocab_size"])
    ids = torch.randint(10, vocab, (45,), generator=torch.Generator().manual_seed(5)).tolist()
    prompts = [ids[:6], ids]  # one prefill within a chunk, one over 6 chunks (packed with the other)
    client = openai.OpenAI(
        base_url=f"{scoring_swarm.children[-1].address}/v1", api_key="unused", max_retries=0
    )
    reply = client.completions.create(
        model="m", prompt=prompts, echo=True, logprobs=1, max_tokens=0, temperature=0
    )

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    pieces = TokenPieces(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    assert reply.usage.completion_tokens == 0
    assert reply.usage.prompt_tokens == sum(len(p) for p in prompts)
    for choice, prompt in zip(reply.choices, prompts, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0]
        expected = torch.log_softmax(logits.float(), dim=-1)  # row i predicts token i + 1
        lp = choice.logprobs
        assert (choice.text, choice.finish_reason) == (tokenizer.decode(prompt), "length")
        assert lp.tokens == [pieces.text(token) for token in prompt]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = torch.tensor(lp.token_logprobs[1:])
        want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        for i in range(1, len(prompt)):
            (best, best_logprob), *rest = lp.top_logprobs[i].items()
            assert not rest
            assert best == pieces.text(int(expected[i - 1].argmax()))
            assert abs(best_logprob - expected[i - 1].max().item()) < 1e-4
            # exactly the top-1 value when the prompt's token is the argmax (how lm-eval tests greedy)
            assert (lp.token_logprobs[i] == best_logprob) == (prompt[i] == int(expected[i - 1].argmax()))


def test_prompt_logprobs_only_on_the_last_span(scoring_swarm):
    """Step.prompt_logprobs: INVALID_ARGUMENT on a span that is not last or past 20 alternatives;
    the peer keeps serving; on the last span a step of n tokens scores its n - 1 later tokens."""
    import grpc

    from common.peer_client import PeerError, PeerSession

    first, last = (child.address for child in scoring_swarm.children if child.name.startswith("peer"))
    tokens = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # longer than a chunk

    async def refused(
        pool, address: str, start: int, end: int, step: swarm_pb2.Step
    ) -> grpc.StatusCode | None:
        session = PeerSession(pool, address)
        await session.open(swarm_pb2.OpenSession(start_block=start, end_block=end, max_length=32))
        try:
            await session.step(step)
        except PeerError as exc:  # the peer ended the stream
            return exc.code
        await session.close()
        return None

    async def scenario():
        pool = ChannelPool()
        try:
            return await steps(pool)
        finally:
            await pool.close()

    async def steps(pool):
        codes = [
            await refused(pool, first, 0, 2, swarm_pb2.Step(token_ids=tokens, position=0, prompt_logprobs=1)),
            await refused(pool, first, 0, 2, swarm_pb2.Step(token_ids=tokens, position=0, prompt_logprobs=0)),
        ]
        one = PeerSession(pool, first)
        await one.open(swarm_pb2.OpenSession(start_block=0, end_block=2, max_length=32))
        hidden = (await one.step(swarm_pb2.Step(token_ids=tokens, position=0))).hidden  # still serving
        await one.close()
        codes.append(
            await refused(
                pool,
                last,
                2,
                4,
                swarm_pb2.Step(token_ids=tokens, position=0, hidden=hidden, prompt_logprobs=21),
            )
        )
        two = PeerSession(pool, last)
        await two.open(swarm_pb2.OpenSession(start_block=2, end_block=4, max_length=32))
        scored = await two.step(
            swarm_pb2.Step(token_ids=tokens, position=0, hidden=hidden, prompt_logprobs=2)
        )
        await two.close()
        return codes, scored

    codes, scored = asyncio.run(scenario())
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert [entry.token_id for entry in scored.prompt_logprobs] == tokens[1:]
    assert all(len(entry.top_logprobs) == 2 for entry in scored.prompt_logprobs)
    assert scored.cache_length == len(tokens)

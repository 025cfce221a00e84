"""Sub-spans: a route may use part of a peer's span, and the peer runs only those blocks.

Planner tests are pure functions. The rest share one swarm of real processes on the 4-block demo
model: peers [0, 3) and [2, 4), which no chain of whole spans covers (the route must cut one of
them). They run in file order: the last one SIGKILLs the [2, 4) peer.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import grpc
import pytest
import torch

from common.peer_client import ChannelPool, PeerError, PeerSession, peer_info
from discovery.records import PeerRecord
from gateway.routing import plan_route
from protos import swarm_pb2
from swarm.launcher import LocalSwarm
from tests.conftest import HEARTBEAT, TTL, wait_until_async
from tests.test_swarm_exactness import assert_exact, reference, through_swarm

NEW_TOKENS = 24


# -- the planner ------------------------------------------------------------------------------------
def record(peer_id: str, start: int, end: int, **fields) -> PeerRecord:
    defaults = dict(
        address=f"10.0.0.{len(peer_id)}{start}{end}:1", model="m", num_blocks=4, throughput=100.0,
        free_cache_tokens=10_000, expires_at=time.time() + 60,
    )  # fmt: skip
    return PeerRecord(peer_id=peer_id, start=start, end=end, **{**defaults, **fields})


def hops(route) -> list[tuple[str, int, int]]:
    return [(hop.peer_id, hop.start, hop.end) for hop in route]


@pytest.mark.parametrize("push", [False, True], ids=["relay", "push"])
def test_overlapping_spans_are_cut_to_a_prefix_or_a_suffix(push):
    """[0, 3) and [2, 4): the faster peer keeps its whole span, the slower one gives a part."""
    for seed in range(5):
        rng = random.Random(seed)
        fast_tail = [record("a", 0, 3, throughput=50.0), record("b", 2, 4, throughput=500.0)]
        assert hops(plan_route(fast_tail, 4, rng=rng, push=push)) == [("a", 0, 2), ("b", 2, 4)]  # prefix
        fast_head = [record("a", 0, 3, throughput=500.0), record("b", 2, 4, throughput=50.0)]
        assert hops(plan_route(fast_head, 4, rng=rng, push=push)) == [("a", 0, 3), ("b", 3, 4)]  # suffix


@pytest.mark.parametrize("push", [False, True], ids=["relay", "push"])
def test_a_whole_span_is_preferred_when_it_is_cheaper(push):
    """Cutting costs a hop: at about the same speed per block (2.5 ms; 2.8 ms for the [2, 4)
    peers, more than the jitter) one peer beats two, whether its span is whole or cut from."""
    for seed in range(5):
        rng = random.Random(seed)
        records = [
            record("whole", 0, 4),
            record("a", 0, 3, throughput=133.0),
            record("b", 2, 4, throughput=180.0),
        ]
        assert hops(plan_route(records, 4, rng=rng, push=push)) == [("whole", 0, 4)]
        records = [record("long", 0, 4), record("tail", 2, 4, throughput=180.0)]
        assert hops(plan_route(records, 4, rng=rng, push=push)) == [("long", 0, 4)]


def test_a_sub_span_costs_its_share_of_the_peer_s_time():
    """A slow [0, 4) peer (10 ms a token, 2.5 ms a block) and a fast [2, 4) one (1 ms): its prefix
    [0, 2) plus the fast peer (5 + 1 ms and a hop) beats its whole span (10 ms); were a cut charged
    the whole span's time (10 + 1 ms) it would not."""
    records = [record("slow", 0, 4, throughput=100.0), record("fast", 2, 4, throughput=1000.0)]
    for push in (False, True):
        assert hops(plan_route(records, 4, rng=random.Random(0), push=push)) == [
            ("slow", 0, 2),
            ("fast", 2, 4),
        ]
    records = [record("slow", 0, 4, throughput=100.0), record("fast", 2, 4, throughput=150.0)]
    assert hops(plan_route(records, 4, rng=random.Random(0))) == [("slow", 0, 4)]


def test_a_replacement_may_be_cut_from_a_longer_span():
    """Failover plans a replacement for exactly the lost hop's blocks: a peer whose span reaches
    past them serves the part inside."""
    records = [record("a", 0, 1), record("long", 0, 4)]
    for push in (False, True):
        route = plan_route(records, 4, start=1, end=3, exclude={"b"}, rng=random.Random(0), push=push)
        assert hops(route) == [("long", 1, 3)]
    assert plan_route([record("a", 0, 2)], 4, start=1, end=3) is None


def test_peer_boundaries_are_the_only_cuts():
    """Cuts fall where another peer's span starts or ends, not at every block (planning stays
    fast): a [0, 8) peer, a [5, 8) one and a [2, 3) one give edges between blocks 0, 2, 3, 5 and
    8 only, and the route cuts the big peer at 5."""
    from gateway import routing

    records = [
        record("big", 0, 8, num_blocks=8, throughput=50.0),
        record("tail", 5, 8, num_blocks=8, throughput=1000.0),
        record("mid", 2, 3, num_blocks=8, throughput=10.0),
    ]
    snapshot = routing.snapshot_index(records)
    peers = routing._usable_peers(snapshot, 0, 8, set(), 0, None, None, {}, random.Random(0))
    edges = routing._sub_span_edges(peers, 0, 8)
    blocks = {block for start, ends in edges.items() for block in (start, *(end for end, _ in ends))}
    assert blocks == {0, 2, 3, 5, 8}
    assert ("big", 0, 5) in {
        (peers.record(i).peer_id, start, end) for start, ends in edges.items() for end, i in ends
    }
    assert hops(plan_route(records, 8, rng=random.Random(0))) == [("big", 0, 5), ("tail", 5, 8)]


# -- the peer's side, in process ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "bloom"])
def test_narrowed_parts_of_a_span_compose_to_it_exactly(arch, tmp_path):
    """`BlockSpan.narrow` parts [0, 1), [1, 3), [3, 4) of a loaded [0, 4) span, each with a cache of
    its own layers only, give bit for bit the whole span's output: a prefill past the sliding
    window (Gemma 3: windowed layers with their own RoPE table, sandwich norms; BLOOM: ALiBi),
    then decode steps. The parts own the embedding / the final norm only at the model's ends."""
    from peer.demo_families import WINDOW, create_family_model
    from peer.model import BlockSpan

    whole = BlockSpan.load(create_family_model(tmp_path / arch, arch), 0, 4)
    parts = [whole.narrow(0, 1), whole.narrow(1, 3), whole.narrow(3, 4)]
    assert [(p.is_first, p.is_last) for p in parts] == [(True, False), (False, False), (False, True)]
    assert whole.narrow(0, 4) is whole
    with pytest.raises(ValueError):
        whole.narrow(2, 2)
    whole_cache = whole.new_cache()
    caches = [part.new_cache(unit_layers=4) for part in parts]
    assert [cache.num_layers for cache in caches] == [1, 2, 1]
    tokens = torch.randint(9, 300, (3 * WINDOW + 1,), generator=torch.Generator().manual_seed(2))
    for step in [tokens, *tokens[:4].split(1)]:
        expected = whole(step, [whole_cache], [len(step)])
        hidden = step
        for part, cache in zip(parts, caches, strict=True):
            hidden = part(hidden, [cache], [len(step)])
        assert torch.equal(hidden, expected)
    assert whole_cache.length == caches[1].length == len(tokens) + 4


# -- a swarm that needs a sub-span ------------------------------------------------------------------
SPANS = [(0, 3), (2, 4)]


@pytest.fixture(scope="module")
def swarm(demo_model, tmp_path_factory):
    local = LocalSwarm(demo_model, workdir=tmp_path_factory.mktemp("sub-spans"), heartbeat=HEARTBEAT, ttl=TTL,
                       model_name="m")  # fmt: skip
    try:
        local.start_dht()
        local.start_peers(SPANS, "--threads", "1")
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def prompt(demo_model) -> list[int]:
    vocab = int(__import__("json").loads((demo_model / "config.json").read_text())["vocab_size"])
    return torch.randint(10, vocab, (12,), generator=torch.Generator().manual_seed(11)).tolist()


@pytest.fixture(scope="module")
def expected(demo_model, prompt):
    return reference(demo_model, prompt, NEW_TOKENS)


async def run_route(local: LocalSwarm, prompt: list[int], push: bool, act=None, planned=None):
    """NEW_TOKENS greedily over live peers, failover on; `act(route)` after the fourth token."""

    def after_event(events, route):
        if len(events) == 4 and act is not None:
            act(route)

    return await through_swarm(
        local, "m", 4, prompt, push, new_tokens=NEW_TOKENS, failover_timeout=10.0, step_timeout=5.0,
        live_only=True, planned=planned, after_event=after_event,
    )  # fmt: skip


@pytest.mark.parametrize("push", [True, False], ids=["push", "relay"])
def test_a_route_through_a_sub_span_is_exact(swarm, prompt, expected, push):
    run = asyncio.run(run_route(swarm, prompt, push))
    assert [(hop.start, hop.end) for hop in run.route] in ([(0, 2), (2, 4)], [(0, 3), (3, 4)])
    assert run.runner.pushed_steps == (NEW_TOKENS if push else 0)  # the next hop's session is a sub-span
    assert_exact(run.events, expected)


def test_a_sub_span_session_reserves_its_share_and_bad_spans_are_refused(swarm):
    """A session of 1 of the [0, 3) peer's 3 blocks reserves a third of a whole-span session's
    cache; an empty span, or one reaching past the peer's blocks, is INVALID_ARGUMENT on that
    stream, and the peer goes on serving."""
    first = next(child.address for child in swarm.children if child.name.startswith("peer-0-3"))
    length = 30

    async def scenario():
        pool = ChannelPool()

        async def free_tokens() -> int:
            return (await peer_info(pool, first)).free_cache_tokens

        async def all_free() -> bool:
            return await free_tokens() == free

        try:
            free = await free_tokens()
            reserved = {}
            for blocks in ((0, 3), (0, 1), (2, 3)):
                assert await wait_until_async(all_free, 5)  # the session before closes asynchronously
                session = PeerSession(pool, first)
                await session.open(
                    swarm_pb2.OpenSession(start_block=blocks[0], end_block=blocks[1], max_length=length)
                )
                reserved[blocks] = free - await free_tokens()
                await session.close()
            refused = []
            for blocks in ((1, 1), (2, 1), (2, 4), (3, 4), (0, 5)):
                session = PeerSession(pool, first)
                try:
                    await session.open(
                        swarm_pb2.OpenSession(start_block=blocks[0], end_block=blocks[1], max_length=8)
                    )
                    refused.append(None)
                except PeerError as exc:
                    refused.append((exc.code, exc.message))
            # still serving: a [0, 1) session takes token ids and answers hidden states of its block
            session = PeerSession(pool, first)
            await session.open(swarm_pb2.OpenSession(start_block=0, end_block=1, max_length=8))
            result = await session.step(swarm_pb2.Step(token_ids=[5, 6, 7], position=0))
            await session.close()
            return reserved, refused, result
        finally:
            await pool.close()

    reserved, refused, result = asyncio.run(scenario())
    assert reserved == {(0, 3): length, (0, 1): length // 3, (2, 3): length // 3}
    for outcome in refused:
        assert outcome is not None and outcome[0] == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert "serves blocks [0, 3)" in outcome[1]
    assert list(result.hidden.shape) == [3, 256] and result.cache_length == 3


def test_a_kept_cache_resumes_only_on_the_same_blocks(swarm):
    """A session's cache kept idle after its stream ends is reattached by a resume of the same
    blocks (it holds their layers), not by one of other blocks of the same peer: that one starts
    empty (cache_length 0, the caller replays) and computes its own blocks."""
    first = next(child.address for child in swarm.children if child.name.startswith("peer-0-3"))
    session_id = "sub-span-resume-" + "0" * 16
    tokens = [5, 6, 7, 8]

    async def opened(pool, blocks, resume: bool):
        session = PeerSession(pool, first)
        message = swarm_pb2.OpenSession(
            session_id=session_id, start_block=blocks[0], end_block=blocks[1], max_length=16
        )
        if resume:
            message.resume = True
            message.resume_tokens.extend(tokens)
        return session, (await session.open(message)).cache_length

    async def scenario():
        pool = ChannelPool()
        try:
            session, _ = await opened(pool, (0, 3), resume=False)
            await session.step(swarm_pb2.Step(token_ids=tokens, position=0))
            await session.close()
            lengths = []
            for _ in range(2):  # the first finds the [0, 3) cache, the second the first's [0, 1) one
                # no wait for the stream before to end: a resume waits for a live session of its id
                session, length = await opened(pool, (0, 1), resume=True)
                lengths.append(length)
                if length == 0:
                    result = await session.step(swarm_pb2.Step(token_ids=tokens, position=0))
                    assert result.cache_length == len(tokens)
                await session.close()
            return lengths
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == [0, len(tokens)]


@pytest.mark.parametrize(
    ("push", "replacement_span"), [(True, (1, 4)), (False, (0, 4))], ids=["push", "relay"]
)
def test_failover_onto_another_sub_span_is_exact(swarm, prompt, expected, push, replacement_span):
    """The peer of the route's last hop is SIGKILLed mid-stream; a peer started after the route
    was planned replaces it on that hop's blocks, a part of its own span, and replays: the same
    tokens. Push: a [1, 4) peer for the [2, 4) one's [2, 4) or [3, 4); then relay: a [0, 4) peer
    for the [1, 4) one's part (the route starts with the [0, 3) peer's [0, x))."""
    started, killed = [], []

    def start_replacement():
        started.append(swarm.start_peer(*replacement_span, "--threads", "1"))

    def kill(route):
        victim = next(child for child in swarm.children if child.address == route[-1].address)
        victim.signal(signal.SIGKILL)
        killed.append(victim)

    run = asyncio.run(run_route(swarm, prompt, push, act=kill, planned=start_replacement))
    route = run.route
    assert killed and killed[0].process.poll() is not None, "the victim outlived the stream"
    last = run.runner.route[-1]
    assert last.address == started[0].address and last.end == 4
    # on the lost hop's blocks (or the end of them, if the planner split them), a part of its span
    assert route[-1].start <= last.start and replacement_span[0] < last.start
    assert_exact(run.events, expected)

"""Route planning over DHT records (pure functions, no network)."""

from __future__ import annotations

import random
import time
from collections import Counter

from discovery.records import PeerRecord
from gateway.routing import plan_route


def record(peer_id: str, start: int, end: int, **fields) -> PeerRecord:
    defaults = dict(
        address=f"127.0.0.1:{1000 + len(peer_id)}", model="m", num_blocks=4, throughput=100.0,
        free_cache_tokens=10_000, expires_at=time.time() + 60,
    )  # fmt: skip
    return PeerRecord(peer_id=peer_id, start=start, end=end, **{**defaults, **fields})


def spans(route) -> list[tuple[int, int]]:
    return [(hop.start, hop.end) for hop in route]


def test_covers_every_block_or_says_none():
    records = [record("a", 0, 2), record("b", 2, 4)]
    assert spans(plan_route(records, 4)) == [(0, 2), (2, 4)]
    assert plan_route([record("a", 0, 2)], 4) is None


def test_prefers_fewer_faster_hops_and_skips_the_unusable():
    records = [
        record("one", 0, 4, throughput=50.0),
        record("a", 0, 2),
        record("b", 2, 4),
        record("draining", 0, 4, throughput=1000.0, state="draining"),
        record("full", 0, 4, throughput=1000.0, free_cache_tokens=10),
    ]
    route = plan_route(records, 4, min_free_tokens=100, rng=random.Random(0))
    assert [hop.peer_id for hop in route] in (["one"], ["a", "b"])
    assert plan_route(records, 4, exclude={"one", "a"}, min_free_tokens=100) is None


def test_plans_a_sub_range_for_a_replacement():
    records = [record("a", 0, 1), record("b", 1, 3), record("c", 3, 4), record("d", 1, 2), record("e", 2, 3)]
    route = plan_route(records, 4, start=1, end=3, exclude={"b"})
    assert [hop.peer_id for hop in route] == ["d", "e"]


def test_local_load_spreads_a_burst_over_replicas():
    """Announced loads lag a heartbeat; the gateway's own count spreads new streams at once."""
    records = [record("r1", 0, 4, throughput=110.0), record("r2", 0, 4)]  # r1 a little faster
    rng = random.Random(1)
    alone = Counter(plan_route(records, 4, rng=rng)[0].peer_id for _ in range(16))
    assert alone == {"r1": 16}  # without the local count, a burst all lands on one replica
    load: Counter[str] = Counter()
    for _ in range(16):
        (hop,) = plan_route(records, 4, rng=rng, local_load=load)
        load[hop.peer_id] += 1
    assert load["r2"] >= 6, load


def test_push_plans_by_the_legs_a_pushed_token_travels():
    """Push: half the gateway's round trip to the first and from the last hop, half the announced
    peer-to-peer round trips in between. Relay charges each hop the gateway's round trip."""
    near_gw = record("a1", 0, 2, address="10.0.0.1:1", next_rtt={"10.0.0.9:1": 100.0})
    near_next = record("a2", 0, 2, address="10.0.0.2:1", next_rtt={"10.0.0.9:1": 1.0})
    tail = record("b", 2, 4, address="10.0.0.9:1")
    rtt = {"10.0.0.1:1": 0.010, "10.0.0.2:1": 0.030, "10.0.0.9:1": 0.020}
    records = [near_gw, near_next, tail]
    for seed in range(5):
        relay = plan_route(records, 4, rtt=rtt, rng=random.Random(seed))
        push = plan_route(records, 4, rtt=rtt, rng=random.Random(seed), push=True)
        assert [hop.peer_id for hop in relay] == ["a1", "b"]
        assert [hop.peer_id for hop in push] == ["a2", "b"]  # 15 + 0.5 ms beats 5 + 50 ms
    # a pair nobody measured costs the gateway's round trip to the later peer; spans still chain
    unmeasured = [record("a", 0, 1), record("b", 1, 3), record("c", 3, 4), record("bc", 1, 4)]
    assert spans(plan_route(unmeasured, 4, push=True)) == [(0, 1), (1, 4)]
    assert plan_route([record("a", 0, 2)], 4, push=True) is None
    route = plan_route(records, 4, start=2, end=4, push=True)
    assert [hop.peer_id for hop in route] == ["b"]


def test_a_plan_from_the_cached_snapshot_index_equals_an_uncached_one():
    """The index of a snapshot is built once and reused by every plan from the same records; a
    plan from it is the plan from a fresh index (copies of the records, a cleared cache)."""
    import dataclasses

    from gateway import routing
    from loadtests.bench_routing import swarm

    records, rtt = swarm(200, 32, seed=3)
    assert routing.snapshot_index(records) is routing.snapshot_index(list(records))
    for seed in range(20):
        for push in (False, True):
            exclude = {f"peer{seed}", f"peer{seed + 50}"}
            cached = plan_route(records, 32, rng=random.Random(seed), rtt=rtt, push=push, exclude=exclude,
                                local_load={f"peer{seed + 1}": 2}, start=seed % 4)  # fmt: skip
            routing._indexes.clear()
            copies = [dataclasses.replace(r) for r in records]
            fresh = plan_route(copies, 32, rng=random.Random(seed), rtt=rtt, push=push, exclude=exclude,
                               local_load={f"peer{seed + 1}": 2}, start=seed % 4)  # fmt: skip
            assert cached == fresh and cached, (seed, push)
            assert not {hop.peer_id for hop in cached} & exclude


def test_push_chooses_a_sub_span_by_its_announced_round_trip():
    """Two equal [0, 3) peers, the nearer to the gateway (10 ms) measured nothing, the other
    (12 ms) announced 1 ms to the fast [2, 4) peer, 50 ms from the gateway. Push cuts [0, 2) from
    the announcer (6 + 6.7 + 0.5 + 1 + 25 ms), a part that pruning by the gateway's round trip
    alone would give to the nearer peer (and then route through the announcer's whole span)."""
    near = record("near", 0, 3, address="10.0.0.1:1")
    announcer = record("announcer", 0, 3, address="10.0.0.2:1", next_rtt={"10.0.0.9:1": 1.0})
    fast = record("fast", 2, 4, address="10.0.0.9:1", throughput=1000.0)
    rtt = {"10.0.0.1:1": 0.010, "10.0.0.2:1": 0.012, "10.0.0.9:1": 0.050}
    for seed in range(5):
        push = plan_route([near, announcer, fast], 4, rtt=rtt, rng=random.Random(seed), push=True)
        assert [(hop.peer_id, hop.start, hop.end) for hop in push] == [("announcer", 0, 2), ("fast", 2, 4)]
        relay = plan_route([near, announcer, fast], 4, rtt=rtt, rng=random.Random(seed))
        assert [(hop.peer_id, hop.start, hop.end) for hop in relay] == [("near", 0, 2), ("fast", 2, 4)]

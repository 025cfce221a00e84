"""Route planning: a chain of peers that covers every block of a model, from DHT records.

A route is planned as a shortest path over block boundaries 0..num_blocks: a peer serving
`[start, end)` is an edge from `start` to `end`. An edge costs the network hop (the gateway's
measured round trip to the peer, `gateway.rtt`) plus the peer's time per token (1 / announced
throughput), inflated by its load, so the planner prefers fewer,
faster, idler peers. A little random jitter spreads sessions over equal replicas instead of piling
them on the first one. Peers that are draining, banned after a failure, or short of cache for the
session are not used.

In push mode (`push=True`, the gateway's default) a token does not return to the gateway between
hops: it costs half the gateway's round trip to the first hop, half of each hop's round trip to the
next, and half the last hop's round trip back to the gateway. The round trip between two peers is
what the earlier one measured and announced (`PeerRecord.next_rtt`); a pair never measured costs
the gateway's round trip to the later peer, the best guess there is. An edge's cost then depends on
the hop before it, so the shortest path runs over peers (the last peer of a partial route), not
over block boundaries.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from discovery.records import PeerRecord, PeerState

log = logging.getLogger("gateway.routing")

HOP_COST_S = 0.0005  # one gRPC hop on a LAN, measured ~350 µs on loopback (DESIGN.md)
LOAD_PENALTY = 0.25  # each live session slows a peer's steps by about this fraction
JITTER = 0.05


@dataclass(frozen=True)
class Hop:
    peer_id: str
    address: str
    start: int
    end: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Hop:
        return cls(str(data["peer_id"]), str(data["address"]), int(data["start"]), int(data["end"]))


Route = tuple[Hop, ...]


class NoRouteError(Exception):
    """No chain of live peers covers the model's blocks right now."""


def edge_cost(
    record: PeerRecord, rng: random.Random, local_sessions: int = 0, rtt: float | None = None
) -> float:
    """Network time plus compute time of one token through `record`'s peer.

    `local_sessions`: this gateway's own live sessions on the peer, known at once, whereas the
    announced `live_sessions` lags by a heartbeat (without it, a burst of new streams piles onto
    whichever replica looked idlest at the last announcement). `rtt`: the gateway's measured round
    trip to the peer (`gateway.rtt`), `HOP_COST_S` when not measured yet."""
    per_token = 1.0 / max(record.throughput, 1e-3)
    load = 1.0 + LOAD_PENALTY * max(record.live_sessions, local_sessions)
    network = HOP_COST_S if rtt is None else rtt
    return (network + per_token * load) * (1.0 + JITTER * rng.random())


def plan_route(
    records: list[PeerRecord],
    num_blocks: int,
    *,
    start: int = 0,
    end: int | None = None,
    exclude: set[str] = frozenset(),
    min_free_tokens: int = 0,
    rng: random.Random | None = None,
    accept: Callable[[PeerRecord], bool] | None = None,
    local_load: Mapping[str, int] | None = None,
    rtt: Mapping[str, float] | None = None,
    push: bool = False,
) -> Route | None:
    """Cheapest chain of peers covering blocks [start, end), or None when there is none.

    ``accept`` (optional) keeps only the peers it returns True for, e.g. one precision
    (``gateway.precision.accepts``). ``rtt``: measured round trips by peer address (seconds).
    ``push``: cost the network as push mode does (`plan_push_route`), else as relay does.
    """
    if push:
        return plan_push_route(
            records, num_blocks, start=start, end=end, exclude=exclude, min_free_tokens=min_free_tokens,
            rng=rng, accept=accept, local_load=local_load, rtt=rtt,
        )  # fmt: skip
    end = num_blocks if end is None else end
    rng = rng or random.Random()
    edges: dict[int, list[tuple[float, PeerRecord]]] = {}
    for record in records:
        if record.state != PeerState.ONLINE or record.peer_id in exclude:
            continue
        if record.free_cache_tokens < min_free_tokens:
            continue
        if accept is not None and not accept(record):
            continue
        if start <= record.start < record.end <= end:
            local = local_load.get(record.peer_id, 0) if local_load else 0
            hop_rtt = rtt.get(record.address) if rtt else None
            edges.setdefault(record.start, []).append((edge_cost(record, rng, local, hop_rtt), record))

    best: dict[int, float] = {start: 0.0}
    previous: dict[int, PeerRecord] = {}
    queue = [(0.0, start)]
    while queue:
        cost, block = heapq.heappop(queue)
        if block == end:
            break
        if cost > best.get(block, float("inf")):
            continue
        for edge, record in edges.get(block, ()):
            total = cost + edge
            if total < best.get(record.end, float("inf")):
                best[record.end] = total
                previous[record.end] = record
                heapq.heappush(queue, (total, record.end))
    if end not in previous and start != end:
        return None
    hops: list[Hop] = []
    block = end
    while block != start:
        record = previous[block]
        hops.append(Hop(record.peer_id, record.address, record.start, record.end))
        block = record.start
    return tuple(reversed(hops))


def plan_push_route(
    records: list[PeerRecord],
    num_blocks: int,
    *,
    start: int = 0,
    end: int | None = None,
    exclude: set[str] = frozenset(),
    min_free_tokens: int = 0,
    rng: random.Random | None = None,
    accept: Callable[[PeerRecord], bool] | None = None,
    local_load: Mapping[str, int] | None = None,
    rtt: Mapping[str, float] | None = None,
) -> Route | None:
    """`plan_route` for push mode (see the module docstring): the same peers and compute costs,
    network time by the legs a pushed token travels."""
    end = num_blocks if end is None else end
    rng = rng or random.Random()
    rtt = rtt or {}
    by_start: dict[int, list[tuple[float, PeerRecord]]] = {}
    for record in records:
        if record.state != PeerState.ONLINE or record.peer_id in exclude:
            continue
        if record.free_cache_tokens < min_free_tokens or (accept is not None and not accept(record)):
            continue
        if start <= record.start < record.end <= end:
            local = local_load.get(record.peer_id, 0) if local_load else 0
            compute = edge_cost(record, rng, local, 0.0)  # network time is added per leg below
            by_start.setdefault(record.start, []).append((compute, record))

    def gateway_leg(record: PeerRecord) -> float:
        return rtt.get(record.address, HOP_COST_S) / 2

    def peer_leg(before: PeerRecord, after: PeerRecord) -> float:
        announced = before.next_rtt.get(after.address)
        return announced / 2000.0 if announced is not None else gateway_leg(after)

    # Dijkstra over peers: a node is the peer whose span ends a partial route (entering a peer
    # costs the leg from the one before it plus its compute); -1 is the gateway
    nodes = [record for entries in by_start.values() for _, record in entries]
    compute_of = {id(record): compute for entries in by_start.values() for compute, record in entries}
    successors: dict[int, list[int]] = {}
    for index, record in enumerate(nodes):
        successors.setdefault(record.start, []).append(index)
    best: dict[int, float] = {}
    previous: dict[int, int] = {}
    queue: list[tuple[float, int, int]] = []  # (cost, node, 0 = partial, 1 = complete)
    for index in successors.get(start, ()):
        best[index] = gateway_leg(nodes[index]) + compute_of[id(nodes[index])]
        previous[index] = -1
        heapq.heappush(queue, (best[index], index, 0))
    done = None
    while queue:
        cost, index, complete = heapq.heappop(queue)
        if complete:
            done = index
            break
        if cost > best[index]:
            continue
        record = nodes[index]
        if record.end == end:
            heapq.heappush(queue, (cost + gateway_leg(record), index, 1))
            continue
        for nxt in successors.get(record.end, ()):
            after = nodes[nxt]
            total = cost + peer_leg(record, after) + compute_of[id(after)]
            if total < best.get(nxt, float("inf")):
                best[nxt] = total
                previous[nxt] = index
                heapq.heappush(queue, (total, nxt, 0))
    if done is None:
        return None if start != end else ()
    hops: list[Hop] = []
    index = done
    while index != -1:
        record = nodes[index]
        hops.append(Hop(record.peer_id, record.address, record.start, record.end))
        index = previous[index]
    return tuple(reversed(hops))


def covered(records: list[PeerRecord], num_blocks: int) -> bool:
    return plan_route(records, num_blocks, rng=random.Random(0)) is not None

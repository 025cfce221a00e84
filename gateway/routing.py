"""Route planning: a chain of peers that covers every block of a model, from DHT records.

A route is planned as a shortest path over block boundaries 0..num_blocks: a peer serving
`[start, end)` is an edge from `start` to `end`. An edge costs the network hop (the gateway's
measured round trip to the peer, `gateway.rtt`) plus the peer's time per token (1 / announced
throughput), inflated by its load, so the planner prefers fewer,
faster, idler peers. A little random jitter spreads sessions over equal replicas instead of piling
them on the first one. Peers that are draining, banned after a failure, or short of cache for the
session are not used.

Sub-spans: a route may use part of a peer's span (the peer runs only those blocks for that session,
`peer.servicer`). Each peer also gives edges for its prefixes `[start, b)` and suffixes `[b, end)`,
cut at the blocks `b` where another usable peer's span starts or ends (`_sub_span_edges`); the
compute part of such an edge is the peer's time per token times the fraction of its blocks used.
Cutting anywhere else, or taking a middle piece, would only add hops. A planned range narrower than
a peer's span (a failover's replacement for one hop) clips the peer to it.

In push mode (`push=True`, the gateway's default) a token does not return to the gateway between
hops: it costs half the gateway's round trip to the first hop, half of each hop's round trip to the
next, and half the last hop's round trip back to the gateway. The round trip between two peers is
what the earlier one measured and announced (`PeerRecord.next_rtt`); a pair never measured costs
the gateway's round trip to the later peer, the best guess there is. An edge's cost then depends on
the hop before it, so the shortest path runs over edges (a peer on some blocks), not over block
boundaries.

Every edge goes to a later block, so both searches are one sweep over the blocks in order (a
shortest path in a DAG), no priority queue: 1000 peers on 64 blocks plan in a few milliseconds
(`python -m loadtests.bench_routing`).
"""

from __future__ import annotations

import bisect
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
    record: PeerRecord, local_sessions: int = 0, rtt: float | None = None, jitter: float = 1.0
) -> float:
    """Network time plus compute time of one token through `record`'s whole span.

    `local_sessions`: this gateway's own live sessions on the peer, known at once, whereas the
    announced `live_sessions` lags by a heartbeat (without it, a burst of new streams piles onto
    whichever replica looked idlest at the last announcement). `rtt`: the gateway's measured round
    trip to the peer (`gateway.rtt`), `HOP_COST_S` when not measured yet. `jitter`: a factor a
    little above 1 that spreads sessions over equal replicas."""
    per_token = 1.0 / max(record.throughput, 1e-3)
    load = 1.0 + LOAD_PENALTY * max(record.live_sessions, local_sessions)
    network = HOP_COST_S if rtt is None else rtt
    return (network + per_token * load) * jitter


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
    ``push``: cost the network as push mode does, else as relay does (see the module docstring).
    """
    end = num_blocks if end is None else end
    if start >= end:
        return ()
    rng = rng or random.Random()
    peers = _usable_peers(records, start, end, exclude, min_free_tokens, accept, local_load, rtt or {}, rng)
    edges = _sub_span_edges(peers, start, end)
    if push:
        return _cheapest_push(peers, edges, start, end)
    return _cheapest_relay(peers, edges, start, end)


@dataclass
class _Peer:
    """A usable record and its costs, drawn once per plan (every sub-span of it shares its jitter)."""

    record: PeerRecord
    network: float  # the gateway's round trip to it: relay's cost of a hop, push's legs
    per_block: float  # compute seconds per token per block (1 / throughput over its blocks), load and jitter included
    jitter: float
    start: int  # its span clipped to the planned range
    end: int

    def compute(self, start: int, end: int) -> float:
        return self.per_block * (end - start)

    def hop(self, start: int, end: int) -> Hop:
        return Hop(self.record.peer_id, self.record.address, start, end)


def _usable_peers(
    records: list[PeerRecord],
    start: int,
    end: int,
    exclude: set[str],
    min_free_tokens: int,
    accept: Callable[[PeerRecord], bool] | None,
    local_load: Mapping[str, int] | None,
    rtt: Mapping[str, float],
    rng: random.Random,
) -> list[_Peer]:
    """The records a route may use (online, not excluded, room for the session, accepted, some
    block in [start, end)), with their costs (`edge_cost` spread over their blocks)."""
    peers = []
    for record in records:
        if record.state != PeerState.ONLINE or record.peer_id in exclude:
            continue
        if record.free_cache_tokens < min_free_tokens or (accept is not None and not accept(record)):
            continue
        if record.end <= start or record.start >= end or record.start >= record.end:
            continue
        local = local_load.get(record.peer_id, 0) if local_load else 0
        jitter = 1.0 + JITTER * rng.random()
        network = rtt.get(record.address, HOP_COST_S)
        per_token = edge_cost(record, local, rtt=0.0, jitter=jitter)  # network time is added per hop
        blocks = record.end - record.start
        peers.append(
            _Peer(record, network, per_token / blocks, jitter, max(record.start, start), min(record.end, end))
        )
    return peers


def _sub_span_edges(peers: list[_Peer], start: int, end: int) -> dict[int, list[tuple[int, int]]]:
    """Edges by the block they start at: (end block, peer index). Each peer gives its whole
    (clipped) span, and its prefixes and suffixes cut at the blocks where another usable peer's
    span starts or ends: a cut anywhere else could only be joined by another sub-span, and a
    route of three pieces where two would do costs a hop more. Middle pieces are not offered."""
    cuts = sorted({start, end, *(p.start for p in peers), *(p.end for p in peers)})
    edges: dict[int, list[tuple[int, int]]] = {}
    for index, peer in enumerate(peers):
        edges.setdefault(peer.start, []).append((peer.end, index))
        inside = cuts[bisect.bisect_right(cuts, peer.start) : bisect.bisect_left(cuts, peer.end)]
        for cut in inside:
            edges[peer.start].append((cut, index))  # prefix [start, cut)
            edges.setdefault(cut, []).append((peer.end, index))  # suffix [cut, end)
    return edges


def _cheapest_relay(
    peers: list[_Peer], edges: dict[int, list[tuple[int, int]]], start: int, end: int
) -> Route | None:
    """Relay: a hop costs the gateway's round trip to its peer plus the peer's compute. Every
    edge goes to a later block, so the blocks in order are a topological order: one sweep."""
    best: dict[int, float] = {start: 0.0}
    previous: dict[int, tuple[int, int]] = {}  # block -> (block before, peer index)
    for block in sorted(edges):
        if block not in best or block >= end:
            continue
        base = best[block]
        for to, index in edges[block]:
            peer = peers[index]
            cost = base + peer.network * peer.jitter + peer.compute(block, to)
            if cost < best.get(to, float("inf")):
                best[to] = cost
                previous[to] = (block, index)
    if end not in previous:
        return None
    hops: list[Hop] = []
    block = end
    while block != start:
        before, index = previous[block]
        hops.append(peers[index].hop(before, block))
        block = before
    return tuple(reversed(hops))


def _cheapest_push(
    peers: list[_Peer], edges: dict[int, list[tuple[int, int]]], start: int, end: int
) -> Route | None:
    """Push: entering a hop costs the leg from the hop before it (half the round trip its peer
    announced to this one, else half the gateway's round trip to this one), the last hop adds
    half the gateway's round trip back. A node is an edge (a peer on some blocks); edges that end
    at a block are final before any edge leaves it, so the blocks in order are one sweep."""

    def gateway_leg(peer: _Peer) -> float:
        return peer.network / 2

    # node: (peer index, start block, end block, node before or -1);
    # arrivals: block -> (cost, node, peer index) of the partial routes that end there
    nodes: list[tuple[int, int, int, int]] = []
    arrivals: dict[int, list[tuple[float, int, int]]] = {}
    for block in sorted(edges):
        if block >= end:
            continue
        if block == start:
            came = None
        else:
            came = arrivals.get(block)
            if not came:
                continue
            came.sort()
        entered: dict[int, tuple[float, int]] = {}  # peer index -> (cost to enter it here, node before)
        for to, index in edges[block]:
            if index not in entered:
                entered[index] = _enter(peers, index, came, gateway_leg)
            cost, before = entered[index]
            nodes.append((index, block, to, before))
            arrivals.setdefault(to, []).append(
                (cost + peers[index].compute(block, to), len(nodes) - 1, index)
            )
    done = min(
        ((cost + gateway_leg(peers[index]), node) for cost, node, index in arrivals.get(end, ())),
        default=None,
    )
    if done is None:
        return None
    hops: list[Hop] = []
    node = done[1]
    while node != -1:
        index, begin, finish, node = nodes[node]
        hops.append(peers[index].hop(begin, finish))
    return tuple(reversed(hops))


def _enter(
    peers: list[_Peer],
    index: int,
    came: list[tuple[float, int, int]] | None,
    gateway_leg: Callable[[_Peer], float],
) -> tuple[float, int]:
    """The cheapest way into peer `index` from `came` (the partial routes ending where it starts,
    cheapest first; None: from the gateway), and the node it comes from (-1: the gateway)."""
    peer = peers[index]
    if came is None:
        return gateway_leg(peer), -1
    best, before = float("inf"), -1
    for cost, node, came_from in came:
        if cost >= best:  # sorted, and a leg is never negative: no later arrival can do better
            break
        announced = peers[came_from].record.next_rtt.get(peer.record.address)
        leg = announced / 2000.0 if announced is not None else gateway_leg(peer)
        if cost + leg < best:
            best, before = cost + leg, node
    return best, before


def covered(records: list[PeerRecord], num_blocks: int) -> bool:
    return plan_route(records, num_blocks, rng=random.Random(0)) is not None

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

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

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
    """Edges by the block they start at: (end block, peer index).

    Every peer gives its whole (clipped) span. Sub-spans: a peer's prefixes `[start, b)` and
    suffixes `[b, end)`, cut at the blocks `b` where another usable peer's span starts or ends (a
    cut anywhere else could only be joined by another cut piece; a middle piece would only add a
    hop where a prefix or suffix does). In a big swarm that is ~2 edges per block of every peer
    (20,000 for 1000 peers of ~10 blocks), too many to search in milliseconds, so for each pair of
    blocks only the cheapest sub-span is kept, by relay cost (the gateway's round trip plus
    compute): exact for relay, where a hop's cost does not depend on its neighbours; in push mode
    a sub-span's peer is thus chosen without its announced next-hop round trips (whole spans keep
    them all). The candidates are enumerated with numpy, not a Python loop."""
    edges: dict[int, list[tuple[int, int]]] = {}
    for index, peer in enumerate(peers):
        edges.setdefault(peer.start, []).append((peer.end, index))
    if not peers:
        return edges
    cuts = np.array(sorted({start, end, *(p.start for p in peers), *(p.end for p in peers)}))
    starts = np.array([p.start for p in peers])
    ends = np.array([p.end for p in peers])
    network = np.array([p.network * p.jitter for p in peers])
    per_block = np.array([p.per_block for p in peers])
    owner, at = np.nonzero((cuts[None, :] > starts[:, None]) & (cuts[None, :] < ends[:, None]))
    if owner.size == 0:
        return edges
    cut = cuts[at]
    owner = np.concatenate([owner, owner])
    froms = np.concatenate([starts[owner[: cut.size]], cut])  # prefixes, then suffixes
    tos = np.concatenate([cut, ends[owner[: cut.size]]])
    cost = network[owner] + per_block[owner] * (tos - froms)
    pair = froms * (end + 1) + tos
    cheapest = np.full((end + 1) * (end + 1), np.inf)
    np.minimum.at(cheapest, pair, cost)
    winners = np.flatnonzero(cost == cheapest[pair])
    _, first = np.unique(pair[winners], return_index=True)  # one per pair when costs tie
    kept = winners[first]
    for begin, finish, index in zip(
        froms[kept].tolist(), tos[kept].tolist(), owner[kept].tolist(), strict=True
    ):
        edges.setdefault(begin, []).append((finish, index))
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
    # who announced a round trip to whom: address -> [(peer index, leg seconds)]
    announcers: dict[str, list[tuple[int, float]]] = {}
    for index, peer in enumerate(peers):
        for address, ms in peer.record.next_rtt.items():
            announcers.setdefault(address, []).append((index, ms / 2000.0))
    # node: (peer index, start block, end block, node before or -1);
    # arrivals: block -> (cost, node, peer index) of the partial routes that end there
    nodes: list[tuple[int, int, int, int]] = []
    arrivals: dict[int, list[tuple[float, int, int]]] = {}
    for block in sorted(edges):
        if block >= end:
            continue
        came = None
        if block != start:
            came = arrivals.get(block)
            if not came:
                continue
            came.sort()
            cheapest_of: dict[int, tuple[float, int]] = {}  # peer index -> its cheapest arrival here
            for cost, node, index in reversed(came):
                cheapest_of[index] = (cost, node)
        entered: dict[int, tuple[float, int]] = {}  # peer index -> (cost to enter it here, node before)
        for to, index in edges[block]:
            if index not in entered:
                peer = peers[index]
                if came is None:
                    entered[index] = (peer.network / 2, -1)
                else:
                    entered[index] = _enter(
                        peers, peer, came, cheapest_of, announcers.get(peer.record.address, ())
                    )
            cost, before = entered[index]
            nodes.append((index, block, to, before))
            arrivals.setdefault(to, []).append(
                (cost + peers[index].compute(block, to), len(nodes) - 1, index)
            )
    done = min(
        ((cost + peers[index].network / 2, node) for cost, node, index in arrivals.get(end, ())),
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
    peer: _Peer,
    came: list[tuple[float, int, int]],
    cheapest_of: dict[int, tuple[float, int]],
    announcers,
) -> tuple[float, int]:
    """The cheapest way into `peer` from `came` (the partial routes ending where it starts,
    cheapest first; `cheapest_of`: the cheapest of each peer among them), and the node it comes
    from. From a peer that announced no round trip to it the leg is half the gateway's round trip,
    the same for all: the cheapest such arrival is the first in `came` that did not announce one.
    The peers that did (`announcers`, a few) are looked up one by one."""
    address = peer.record.address
    best, before = float("inf"), -1
    for cost, node, came_from in came:
        if address not in peers[came_from].record.next_rtt:
            best, before = cost + peer.network / 2, node
            break
    for came_from, leg in announcers:
        arrival = cheapest_of.get(came_from)
        if arrival is not None and arrival[0] + leg < best:
            best, before = arrival[0] + leg, arrival[1]
    return best, before


def covered(records: list[PeerRecord], num_blocks: int) -> bool:
    return plan_route(records, num_blocks, rng=random.Random(0)) is not None

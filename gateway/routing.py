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
shortest path in a DAG), no priority queue. What does not change between plans from one snapshot
of records (their fields as arrays, who announced a round trip to whom) is indexed once per
snapshot (`snapshot_index`): 1000 peers on 64 blocks plan in ~2 ms relay, ~5 ms push (CPU;
`python -m loadtests.bench_routing`, docs/self-organizing.md).
"""

from __future__ import annotations

import collections
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
    snapshot = snapshot_index(records)
    peers = _usable_peers(snapshot, start, end, exclude, min_free_tokens, accept, local_load, rtt or {}, rng)
    edges = _sub_span_edges(peers, start, end, push)
    if push:
        return _cheapest_push(peers, edges, start, end)
    return _cheapest_relay(peers, edges, start, end)


class SnapshotIndex:
    """What planning needs from one snapshot of records that does not change from plan to plan:
    their fields as numpy arrays, and for push who announced a round trip to whom.

    The gateway plans every route of a refresh period from one snapshot (`gateway.swarm_view`),
    so this is built once per snapshot (`snapshot_index`) rather than on every plan: indexing the
    8 announced round trips of 1000 peers alone took ~2 ms a plan. Records are frozen and their
    `next_rtt` is never changed after decoding, so an index stays valid as long as its records."""

    def __init__(self, records: list[PeerRecord]):
        self.records = tuple(records)
        self.start = np.array([r.start for r in records], dtype=np.int64)
        self.end = np.array([r.end for r in records], dtype=np.int64)
        self.free = np.array([r.free_cache_tokens for r in records], dtype=np.int64)
        self.per_token = np.array([1.0 / max(r.throughput, 1e-3) for r in records])
        self.live = np.array([r.live_sessions for r in records], dtype=np.int64)
        self.online = np.array([r.state == PeerState.ONLINE and r.start < r.end for r in records], dtype=bool)
        self.addresses = [r.address for r in records]
        self.by_id: dict[str, list[int]] = {}
        by_address: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            self.by_id.setdefault(r.peer_id, []).append(i)
            by_address.setdefault(r.address, []).append(i)
        # into[i]: (record that announced a round trip to record i's address, its leg in seconds)
        self.into: list[list[tuple[int, float]]] = [[] for _ in records]
        self.announced: list[dict[str, float]] = [r.next_rtt for r in records]
        for i, r in enumerate(records):
            for address, ms in r.next_rtt.items():
                for target in by_address.get(address, ()):
                    self.into[target].append((i, ms / 2000.0))
        self._announced_pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def announced_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(announcer, target, leg seconds) of every announced round trip, as arrays."""
        if self._announced_pairs is None:
            pairs = [(source, target, leg) for target, legs in enumerate(self.into) for source, leg in legs]
            source, target, leg = zip(*pairs, strict=True) if pairs else ((), (), ())
            self._announced_pairs = (
                np.array(source, dtype=np.int64),
                np.array(target, dtype=np.int64),
                np.array(leg, dtype=float),
            )
        return self._announced_pairs


_INDEX_CACHE_SIZE = 8  # snapshots kept: a few models, and failover's filtered lists
_indexes: collections.OrderedDict[tuple[int, ...], SnapshotIndex] = collections.OrderedDict()


def snapshot_index(records: list[PeerRecord]) -> SnapshotIndex:
    """The index of `records`, built once per snapshot. A snapshot is known by the identity of its
    record objects (the gateway hands out filtered copies of its list, but the same records): the
    index holds them, so their ids cannot be reused while it is cached."""
    key = tuple(map(id, records))
    index = _indexes.get(key)
    if index is None:
        index = _indexes[key] = SnapshotIndex(records)
        while len(_indexes) > _INDEX_CACHE_SIZE:
            _indexes.popitem(last=False)
    else:
        _indexes.move_to_end(key)
    return index


class _Peers:
    """The usable records of one plan and their costs, as parallel lists (no object per peer):
    peer `i` is record `rec[i]` of the snapshot; every sub-span of it shares its jitter."""

    def __init__(self, snapshot: SnapshotIndex, rec: np.ndarray, network, per_block, jitter, start, end):
        self.snapshot = snapshot
        self.rec = rec.tolist()
        self.network = network.tolist()  # the gateway's round trip to it: relay's cost of a hop, push's legs
        self.per_block = per_block.tolist()  # compute s/token/block, load and jitter included
        self.jitter = jitter.tolist()
        self.start = start.tolist()  # its span clipped to the planned range
        self.end = end.tolist()
        self.arrays = (rec, network, per_block, jitter, start, end)

    def __len__(self) -> int:
        return len(self.rec)

    def record(self, i: int) -> PeerRecord:
        return self.snapshot.records[self.rec[i]]

    def hop(self, i: int, start: int, end: int) -> Hop:
        record = self.record(i)
        return Hop(record.peer_id, record.address, start, end)


def _usable_peers(
    snapshot: SnapshotIndex,
    start: int,
    end: int,
    exclude: set[str],
    min_free_tokens: int,
    accept: Callable[[PeerRecord], bool] | None,
    local_load: Mapping[str, int] | None,
    rtt: Mapping[str, float],
    rng: random.Random,
) -> _Peers:
    """The records a route may use (online, not excluded, room for the session, accepted, some
    block in [start, end)), with their costs (`edge_cost` spread over their blocks, the same
    arithmetic on arrays). Jitter is drawn per usable peer in record order."""
    usable = (
        snapshot.online & (snapshot.free >= min_free_tokens) & (snapshot.end > start) & (snapshot.start < end)
    )
    for peer_id in exclude:
        for i in snapshot.by_id.get(peer_id, ()):
            usable[i] = False
    rec = np.flatnonzero(usable)
    if accept is not None:
        rec = rec[[accept(snapshot.records[i]) for i in rec.tolist()]] if rec.size else rec
    live = snapshot.live[rec]
    if local_load:
        local = np.array(
            [local_load.get(snapshot.records[i].peer_id, 0) for i in rec.tolist()], dtype=np.int64
        )
        live = np.maximum(live, local)
    jitter = 1.0 + JITTER * np.array([rng.random() for _ in range(rec.size)])
    per_token = (snapshot.per_token[rec] * (1.0 + LOAD_PENALTY * live)) * jitter  # = edge_cost(rtt=0)
    starts, ends = snapshot.start[rec], snapshot.end[rec]
    per_block = per_token / (ends - starts)
    network = np.array([rtt.get(snapshot.addresses[i], HOP_COST_S) for i in rec.tolist()])
    return _Peers(snapshot, rec, network, per_block, jitter, np.maximum(starts, start), np.minimum(ends, end))


def _sub_span_edges(
    peers: _Peers, start: int, end: int, push: bool = False
) -> dict[int, list[tuple[int, int]]]:
    """Edges by the block they start at: (end block, peer index).

    Every peer gives its whole (clipped) span. Sub-spans: a peer's prefixes `[start, b)` and
    suffixes `[b, end)`, cut at the blocks `b` where another usable peer's span starts or ends (a
    cut anywhere else could only be joined by another cut piece; a middle piece would only add a
    hop where a prefix or suffix does). In a big swarm that is ~2 edges per block of every peer
    (20,000 for 1000 peers of ~10 blocks), too many to search in milliseconds, so for each pair of
    blocks only the cheapest sub-span is kept. Relay: by its cost, the gateway's round trip plus
    compute (exact: a hop's cost does not depend on its neighbours). Push: a part's cost depends
    on its neighbours through the announced round trips, so two are kept per pair, the cheapest
    without them (half the gateway's round trip in, compute) and the cheapest counting each peer's
    best announced legs in and out (`_announced_savings`; optimistic, as those legs need that
    neighbour there). The candidates are enumerated with numpy, not a Python loop."""
    edges: dict[int, list[tuple[int, int]]] = {}
    for index, (begin, finish) in enumerate(zip(peers.start, peers.end, strict=True)):
        edges.setdefault(begin, []).append((finish, index))
    if not len(peers):
        return edges
    _, network, per_block, jitter, starts, ends = peers.arrays
    cuts = np.unique(np.concatenate([[start, end], starts, ends]))
    owner, at = np.nonzero((cuts[None, :] > starts[:, None]) & (cuts[None, :] < ends[:, None]))
    if owner.size == 0:
        return edges
    cut = cuts[at]
    froms = np.concatenate([starts[owner], cut])  # prefixes, then suffixes
    tos = np.concatenate([cut, ends[owner]])
    owner = np.concatenate([owner, owner])
    compute = per_block[owner] * (tos - froms)
    pair = froms * (end + 1) + tos
    if not push:
        kept = _cheapest_per_pair(pair, (network * jitter)[owner] + compute, end)
    else:
        alone = network[owner] / 2 + compute
        kept = _cheapest_per_pair(pair, alone, end)
        savings = _announced_savings(peers)
        if savings is not None:
            with_legs = _cheapest_per_pair(pair, alone - savings[owner], end)
            kept = np.union1d(kept, with_legs)
    for begin, finish, index in zip(
        froms[kept].tolist(), tos[kept].tolist(), owner[kept].tolist(), strict=True
    ):
        edges.setdefault(begin, []).append((finish, index))
    return edges


def _cheapest_per_pair(pair: np.ndarray, cost: np.ndarray, end: int) -> np.ndarray:
    """The positions of the cheapest candidate of each pair of blocks (the first when tied)."""
    cheapest = np.full((end + 1) * (end + 1), np.inf)
    np.minimum.at(cheapest, pair, cost)
    winners = np.flatnonzero(cost == cheapest[pair])
    _, first = np.unique(pair[winners], return_index=True)
    return winners[first]


def _announced_savings(peers: _Peers) -> np.ndarray | None:
    """Per usable peer, the most its announced round trips can save a push route: its best leg
    out to a usable peer it announced, plus the best leg in from a usable peer that announced it,
    each against the unannounced leg (half the gateway's round trip to the later peer). None when
    no usable peer announced a usable one."""
    rec, network = peers.arrays[0], peers.arrays[1]
    source, target, leg = peers.snapshot.announced_pairs()
    if not source.size:
        return None
    peer_of = np.full(len(peers.snapshot.records), -1, dtype=np.int64)
    peer_of[rec] = np.arange(rec.size)
    source, target = peer_of[source], peer_of[target]
    both = (source >= 0) & (target >= 0)
    if not both.any():
        return None
    source, target = source[both], target[both]
    saved = np.maximum(network[target] / 2 - leg[both], 0.0)
    out, into = np.zeros(rec.size), np.zeros(rec.size)
    np.maximum.at(out, source, saved)
    np.maximum.at(into, target, saved)
    return out + into


def _cheapest_relay(
    peers: _Peers, edges: dict[int, list[tuple[int, int]]], start: int, end: int
) -> Route | None:
    """Relay: a hop costs the gateway's round trip to its peer plus the peer's compute. Every
    edge goes to a later block, so the blocks in order are a topological order: one sweep."""
    hop_cost = [n * j for n, j in zip(peers.network, peers.jitter, strict=True)]
    per_block = peers.per_block
    best: dict[int, float] = {start: 0.0}
    previous: dict[int, tuple[int, int]] = {}  # block -> (block before, peer index)
    for block in sorted(edges):
        if block not in best or block >= end:
            continue
        base = best[block]
        for to, index in edges[block]:
            cost = base + hop_cost[index] + per_block[index] * (to - block)
            if cost < best.get(to, float("inf")):
                best[to] = cost
                previous[to] = (block, index)
    if end not in previous:
        return None
    hops: list[Hop] = []
    block = end
    while block != start:
        before, index = previous[block]
        hops.append(peers.hop(index, before, block))
        block = before
    return tuple(reversed(hops))


def _cheapest_push(
    peers: _Peers, edges: dict[int, list[tuple[int, int]]], start: int, end: int
) -> Route | None:
    """Push: entering a hop costs the leg from the hop before it (half the round trip its peer
    announced to this one, else half the gateway's round trip to this one), the last hop adds
    half the gateway's round trip back. A node is an edge (a peer on some blocks); edges that end
    at a block are final before any edge leaves it, so the blocks in order are one sweep.

    The announced round trips come indexed from the snapshot (`SnapshotIndex.into`, by record),
    so arrivals are keyed by record too."""
    snapshot = peers.snapshot
    rec, network, per_block = peers.rec, peers.network, peers.per_block
    addresses, announced, into = snapshot.addresses, snapshot.announced, snapshot.into
    # node: (peer index, start block, end block, node before or -1);
    # arrivals: block -> (cost, node, record index) of the partial routes that end there
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
            cheapest_of: dict[int, tuple[float, int]] = {}  # record -> its cheapest arrival here
            for cost, node, came_from in reversed(came):
                cheapest_of[came_from] = (cost, node)
        entered: dict[int, tuple[float, int]] = {}  # peer index -> (cost to enter it here, node before)
        for to, index in edges[block]:
            got = entered.get(index)
            if got is None:
                if came is None:
                    got = (network[index] / 2, -1)
                else:
                    got = _enter(network[index] / 2, addresses[rec[index]], came, cheapest_of, announced,
                                 into[rec[index]])  # fmt: skip
                entered[index] = got
            nodes.append((index, block, to, got[1]))
            arrival = (got[0] + per_block[index] * (to - block), len(nodes) - 1, rec[index])
            reached = arrivals.get(to)
            if reached is None:
                arrivals[to] = [arrival]
            else:
                reached.append(arrival)
    done = min(
        ((cost + network[nodes[node][0]] / 2, node) for cost, node, _ in arrivals.get(end, ())),
        default=None,
    )
    if done is None:
        return None
    hops: list[Hop] = []
    node = done[1]
    while node != -1:
        index, begin, finish, node = nodes[node]
        hops.append(peers.hop(index, begin, finish))
    return tuple(reversed(hops))


def _enter(
    unannounced: float,
    address: str,
    came: list[tuple[float, int, int]],
    cheapest_of: dict[int, tuple[float, int]],
    announced: list[dict[str, float]],
    announcers: list[tuple[int, float]],
) -> tuple[float, int]:
    """The cheapest way into the peer at `address` from `came` (the partial routes ending where it
    starts, cheapest first; `cheapest_of`: the cheapest of each record among them), and the node
    it comes from. From a peer that announced no round trip to it the leg is `unannounced` (half
    the gateway's round trip to it), the same for all: the cheapest such arrival is the first in
    `came` that did not announce one. The records that did (`announcers`, a few) are looked up
    one by one."""
    best, before = float("inf"), -1
    for cost, node, came_from in came:
        if address not in announced[came_from]:
            best, before = cost + unannounced, node
            break
    for came_from, leg in announcers:
        arrival = cheapest_of.get(came_from)
        if arrival is not None and arrival[0] + leg < best:
            best, before = arrival[0] + leg, arrival[1]
    return best, before


def covered(records: list[PeerRecord], num_blocks: int) -> bool:
    return plan_route(records, num_blocks, rng=random.Random(0)) is not None

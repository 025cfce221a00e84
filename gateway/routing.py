"""Route planning: a chain of peers that covers every block of a model, from DHT records.

A route is planned as a shortest path over block boundaries 0..num_blocks: a peer serving
`[start, end)` is an edge from `start` to `end`. An edge costs the network hop (the gateway's
measured round trip to the peer, `gateway.rtt`) plus the peer's time per token (1 / announced
throughput), inflated by its load, so the planner prefers fewer,
faster, idler peers. A little random jitter spreads sessions over equal replicas instead of piling
them on the first one. Peers that are draining, banned after a failure, or short of cache for the
session are not used.
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
) -> Route | None:
    """Cheapest chain of peers covering blocks [start, end), or None when there is none.

    ``accept`` (optional) keeps only the peers it returns True for, e.g. one precision
    (``gateway.precision.accepts``). ``rtt``: measured round trips by peer address (seconds).
    """
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


def covered(records: list[PeerRecord], num_blocks: int) -> bool:
    return plan_route(records, num_blocks, rng=random.Random(0)) is not None

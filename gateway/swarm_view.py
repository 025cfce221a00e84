"""The gateway's view of the swarm: peer records from the DHT, served stale-while-revalidate."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from discovery.records import PeerRecord, PeerState
from gateway.routing import NoRouteError, Route, plan_route

log = logging.getLogger("gateway.swarm_view")

RECENT_REFRESHES = 3  # a snapshot this many refresh periods old is still as good as a lookup
RESERVATION_S = 10.0  # a planned route counts as load this long at most, unless its sessions open


class SwarmView:
    """What the gateway knows of the swarm: DHT lookups, and the gateway's own load on each peer.

    Lookups are served stale-while-revalidate: a request never waits for the DHT when a snapshot
    exists (a lookup can take a DHT timeout when nodes have just died); the snapshot is refreshed
    in the background once older than `refresh`, and records past their own expiry are dropped
    on every read, so a snapshot never outlives what it describes.

    `keep_fresh` (the gateway runs it for its models) refreshes every `refresh` seconds whether
    requests come or not. Without it an idle gateway's snapshot expired with its records, and the
    first request after a pause longer than the ttl waited for a lookup, which waits a whole DHT
    RPC timeout on every dead node still in the routing tables (~2 s per killed peer). While the
    snapshot is `recent`, a request that finds no usable route in it is answered from it rather
    than by a lookup of its own.
    """

    def __init__(self, dht, *, refresh: float = 1.0):
        self.dht = dht  # anything with `async peers(model) -> list[PeerRecord]` (`SwarmDHT`); None: no peers
        self.refresh = refresh
        self._cache: dict[str, tuple[float, list[PeerRecord]]] = {}
        self._lookups: dict[str, asyncio.Future] = {}
        self._seen: dict[str, dict[str, PeerRecord]] = {}  # model -> peer id -> latest record
        self.local_load: Counter[str] = Counter()  # peer id -> sessions this gateway has open there
        self.rtt: dict[str, float] = {}  # peer address -> measured round trip, s (gateway.rtt fills it)
        self.push = False  # plan for push (hidden states peer to peer) rather than relay
        # Peers' moves (`PeerRecord.moving_to`, peer.balancer) seen starting in lookups, for /metrics.
        self.moves_seen = 0
        # Routes planned but whose sessions are not open yet: a burst of requests plans before any
        # of them opens, and without these every one of them would pick the same replica.
        self._reserved: dict[str, list[float]] = {}  # peer id -> monotonic times of reservations

    async def peers(self, model: str, fresh: bool = False, timeout: float | None = None) -> list[PeerRecord]:
        """Records of `model`'s peers, from a DHT lookup at most `refresh` seconds old.

        One lookup per model runs at a time, shared by every caller (many streams failing over at
        once must not each crawl the DHT). A caller that cannot wait (`timeout`) gets the last
        unexpired records seen: a lookup that meets a dead node (every killed peer runs one)
        waits a whole RPC timeout for it.
        """
        loop = asyncio.get_running_loop()
        cached = self._cache.get(model)
        if cached is None or fresh:
            lookup = self._lookup(model)
            try:
                return await asyncio.wait_for(asyncio.shield(lookup), timeout)
            except TimeoutError:
                log.warning("DHT lookup for %s is slow; using the last records seen", model)
                return self._unexpired(cached)
        if loop.time() - cached[0] >= self.refresh:
            self._lookup(model)  # in the background; _fetch logs its own failures
        return self._unexpired(cached)

    async def keep_fresh(self, models: list[str]) -> None:
        """Refresh every model's snapshot every `refresh` seconds, until cancelled."""
        while True:
            for model in models:
                self._lookup(model)  # one per model at a time: a slow one is not started twice
            await asyncio.sleep(self.refresh)

    def addresses(self) -> set[str]:
        """Every peer address in the current snapshots (what `gateway.rtt` measures)."""
        return {record.address for _, records in self._cache.values() for record in records}

    def moves_in_progress(self) -> int:
        """Peers whose latest record in a snapshot announces a move (`PeerRecord.moving_to`)."""
        return sum(
            record.moving_to is not None
            for cached in self._cache.values()
            for record in self._unexpired(cached)
        )

    def recent(self, model: str) -> bool:
        """The snapshot of `model` is from a lookup that ended within a few refresh periods: as
        good as a lookup now, but for a peer that joined since."""
        cached = self._cache.get(model)
        age = asyncio.get_running_loop().time() - cached[0] if cached else float("inf")
        return age < RECENT_REFRESHES * self.refresh

    @staticmethod
    def _unexpired(cached: tuple[float, list[PeerRecord]] | None) -> list[PeerRecord]:
        now = time.time()
        return [record for record in (cached[1] if cached else []) if not record.is_expired(now)]

    def _lookup(self, model: str) -> asyncio.Task:
        """One lookup per model at a time, shared by every caller (many streams failing over at
        once must not each crawl the DHT)."""
        task = self._lookups.get(model)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(model))
            self._lookups[model] = task
            task.add_done_callback(lambda _: self._lookups.pop(model, None))
        return task

    async def _fetch(self, model: str) -> list[PeerRecord]:
        loop = asyncio.get_running_loop()
        try:
            records = await self.dht.peers(model) if self.dht is not None else []
        except Exception:  # keep serving from the last snapshot
            log.exception("DHT lookup for %s failed", model)
            return self._unexpired(self._cache.get(model))
        self._cache[model] = (loop.time(), records)
        seen = self._seen.setdefault(model, {})
        for record in records:
            before = seen.get(record.peer_id)
            if record.moving_to is not None and (before is None or before.moving_to != record.moving_to):
                self.moves_seen += 1  # a move this gateway had not seen announced yet
            seen[record.peer_id] = record
        return records

    def known(self, model: str, grace: float = 60.0) -> list[PeerRecord]:
        """Every peer seen in a recent lookup (its latest record, up to `grace` seconds past its
        expiry): candidates to try at once after a failure, before a fresh lookup. A dead one
        fails to open fast and is excluded."""
        now = time.time()
        seen = self._seen.get(model, {})
        for peer_id in [p for p, record in seen.items() if record.expires_at + grace < now]:
            del seen[peer_id]
        return list(seen.values())

    def load(self) -> Counter[str]:
        """This gateway's sessions per peer, open or planned in the last `RESERVATION_S` seconds."""
        cutoff = time.monotonic() - RESERVATION_S
        load = Counter(self.local_load)
        for peer_id, times in list(self._reserved.items()):
            times[:] = [t for t in times if t > cutoff]
            if times:
                load[peer_id] += len(times)
            else:
                del self._reserved[peer_id]
        return load

    def reserve(self, route: Route) -> None:
        now = time.monotonic()
        for hop in route:
            self._reserved.setdefault(hop.peer_id, []).append(now)

    def opened(self, peer_id: str) -> None:
        """A session opened on `peer_id`: it counts as open now instead of as planned."""
        self.local_load[peer_id] += 1
        times = self._reserved.get(peer_id)
        if times:
            times.pop(0)

    def closed(self, peer_id: str) -> None:
        self.local_load[peer_id] -= 1
        if self.local_load[peer_id] <= 0:
            del self.local_load[peer_id]

    async def plan(
        self,
        model: str,
        num_blocks: int,
        *,
        exclude: set[str] = frozenset(),
        min_free_tokens: int = 0,
        accept: Callable[[PeerRecord], bool] | None = None,
    ) -> Route:
        """The cheapest route over the model's live peers, or `NoRouteError`."""
        for fresh in (False, True):  # the snapshot may be stale: a peer may have joined since
            if fresh and self.recent(model):
                break  # kept fresh in the background: a lookup now would only wait on dead nodes
            records = await self.peers(model, fresh=fresh)
            route = plan_route(records, num_blocks, exclude=exclude, min_free_tokens=min_free_tokens, accept=accept,
                               local_load=self.load(), rtt=self.rtt, push=self.push)  # fmt: skip
            if route is not None:
                self.reserve(route)
                return route
        raise NoRouteError(f"no live peers cover all {num_blocks} blocks of {model}")

    @staticmethod
    def is_live(route: Route, records: list[PeerRecord], exclude: set[str] = frozenset()) -> bool:
        """Every hop of `route` is an online peer among `records`, not in `exclude`, that still
        serves the hop's blocks (all of its span or a part: a sub-span)."""
        live = {record.peer_id: record for record in records if record.state == PeerState.ONLINE}
        return all(
            hop.peer_id in live
            and hop.peer_id not in exclude
            and live[hop.peer_id].start <= hop.start < hop.end <= live[hop.peer_id].end
            for hop in route
        )

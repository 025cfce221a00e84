"""The gateway's round trip to each peer, measured with `Info` (a cheap unary call) and smoothed.

The route planner (`gateway.routing`) charges each hop this round trip instead of a constant: on
one machine the hop costs ~0.5 ms and compute dominates, across the internet a 50 ms hop costs
more than the compute of a few blocks, and the planner should then prefer the replica that is
near. Relay mode sends every hidden state back through the gateway, so the gateway's round trip
to a peer is exactly what a hop costs there.

Smoothing is an exponentially weighted mean (weight `ALPHA` for the newest sample, as TCP's SRTT)
of the *minimum* of a few pings per round, so one ping that waited behind a forward pass does
not move it much. A peer that does not answer keeps its last figure; a peer never measured
costs `routing.HOP_COST_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from common.peer_client import ChannelPool, PeerError, peer_info

log = logging.getLogger("gateway.rtt")

ALPHA = 0.3
PINGS_PER_ROUND = 2
PING_TIMEOUT_S = 2.0


class RttTracker:
    """address -> smoothed round trip in seconds."""

    def __init__(self, pool: ChannelPool, *, interval: float = 2.0):
        self.pool = pool
        self.interval = interval
        self.rtt: dict[str, float] = {}

    def observe(self, address: str, seconds: float) -> None:
        old = self.rtt.get(address)
        self.rtt[address] = seconds if old is None else (1 - ALPHA) * old + ALPHA * seconds

    async def ping(self, address: str) -> float | None:
        best = None
        for _ in range(PINGS_PER_ROUND):
            begin = time.perf_counter()
            try:
                await peer_info(self.pool, address, timeout=PING_TIMEOUT_S)
            except PeerError:
                return best
            took = time.perf_counter() - begin
            best = took if best is None else min(best, took)
        if best is not None:
            self.observe(address, best)
        return best

    async def measure(self, addresses: Iterable[str]) -> None:
        await asyncio.gather(*(self.ping(address) for address in set(addresses)))

    async def run(self, addresses: Callable[[], Iterable[str]]) -> None:
        """Measure every address `addresses()` names every `interval` seconds, until cancelled."""
        while True:
            known = set(addresses())
            try:
                await self.measure(known)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("measuring round trips failed")
            # a peer not measured yet (just joined) is measured within a fraction of the interval
            unmeasured = not known or any(address not in self.rtt for address in addresses())
            await asyncio.sleep(self.interval / 10 if unmeasured else self.interval)

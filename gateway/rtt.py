"""The gateway's round trip to each peer, measured with `Info` (a cheap unary call) and smoothed.

The route planner (`gateway.routing`) charges each hop this round trip instead of a constant: on
one machine the hop costs ~0.5 ms and compute dominates, across the internet a 50 ms hop costs
more than the compute of a few blocks, and the planner should then prefer the replica that is
near. Relay mode sends every hidden state back through the gateway, so the gateway's round trip
to a peer is exactly what a hop costs there.

The figure is the *minimum* over the last `WINDOW_ROUNDS` rounds of a few pings each (a windowed
minimum, as BBR keeps its min_rtt and LEDBAT its base delay). On a loaded machine most pings
wait somewhere, behind a forward pass on the peer's event loop or for a core that another
process holds, and that wait is not the link: only ever adding time, it says nothing about the
path, and it lands on one replica or the other by chance. An exponentially weighted mean of each
round's fastest ping (TCP's SRTT, used first) still moved with every such round: on a busy
machine two replicas at the same distance measured 1-5 ms apart, more than their compute time,
and the planner sent every stream of a burst to one of them. A minimum ignores any number of slow
rounds and follows a real drop at once; a real rise (a route that got longer) shows once the
window has turned over, `WINDOW_ROUNDS` x `interval` (10 s) later. A peer that does not answer
keeps its last figure; a peer never measured costs `routing.HOP_COST_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

from common.peer_client import ChannelPool, PeerError, peer_info

log = logging.getLogger("gateway.rtt")

WINDOW_ROUNDS = 5  # rounds the minimum is taken over
PINGS_PER_ROUND = 3
PING_TIMEOUT_S = 2.0


class RttTracker:
    """address -> round trip in seconds, the least of the last `WINDOW_ROUNDS` rounds (module doc)."""

    def __init__(self, pool: ChannelPool, *, interval: float = 2.0, window: int = WINDOW_ROUNDS):
        if window < 1:
            raise ValueError(f"window must be >= 1 round, got {window}")
        self.pool = pool
        self.interval = interval
        self.window = window
        self.rtt: dict[str, float] = {}  # read by the planner (SwarmView.rtt is this dict)
        self._rounds: dict[str, deque[float]] = {}

    def observe(self, address: str, seconds: float) -> None:
        """One round's fastest ping to `address`."""
        rounds = self._rounds.get(address)
        if rounds is None:
            rounds = self._rounds[address] = deque(maxlen=self.window)
        rounds.append(seconds)
        self.rtt[address] = min(rounds)

    def forget(self, keep: set[str]) -> None:
        """Drop the figures of addresses no longer in any snapshot (peers that left)."""
        for address in [a for a in self._rounds if a not in keep]:
            del self._rounds[address]
            self.rtt.pop(address, None)

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
            if known:
                self.forget(known)
            try:
                await self.measure(known)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("measuring round trips failed")
            # a peer not measured yet (just joined) is measured within a fraction of the interval
            unmeasured = not known or any(address not in self.rtt for address in addresses())
            await asyncio.sleep(self.interval / 10 if unmeasured else self.interval)

"""A peer that chose its own blocks keeps checking that they are still the right ones.

Every `interval` seconds (times a random factor in [0.5, 1.5], so that peers started together do
not decide together) the balancer reads the model's records and asks `peer.block_selection.
move_target` whether moving would raise the swarm's bottleneck enough. If so it looks again after
a short random pause (another peer may have started moving meanwhile: it then announces
`draining` and where it is going, `PeerRecord.moving_to`; its old blocks count as unserved and
its new ones as served, so the two do not fill one gap together), and only then calls
`move(start, end)`: the server announces the same, drains (gateways move live sessions elsewhere, replaying them: no token lost), loads the
new span and announces again. After a move the peer waits at least `cooldown` seconds before
the next one, so a swarm in flux does not make it hop back and forth.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from discovery.records import PeerRecord
from peer.block_selection import move_target

log = logging.getLogger("peer.balancer")


class Balancer:
    def __init__(
        self,
        records: Callable[[], Awaitable[list[PeerRecord]]],
        me: Callable[[], PeerRecord],
        move: Callable[[int, int], Awaitable[None]],
        *,
        interval: float,
        cooldown: float | None = None,
        rng: random.Random | None = None,
    ):
        if interval <= 0:
            raise ValueError(f"balance interval must be > 0, got {interval}")
        self.records = records
        self.me = me
        self.move = move
        self.interval = interval
        self.cooldown = 2 * interval if cooldown is None else cooldown
        self.rng = rng or random.Random()
        self.moves = 0
        self.moving = False
        self._last_move = -float("inf")

    async def check(self) -> tuple[int, int] | None:
        """One round: the span moved to, or None."""
        if time.monotonic() - self._last_move < self.cooldown:
            return None
        target = move_target(await self.records(), self.me())
        if target is None:
            return None
        await asyncio.sleep(self.rng.uniform(0.0, 0.25 * self.interval))
        target = move_target(await self.records(), self.me())  # someone else may have moved
        if target is None:
            return None
        log.info("moving from [%d, %d) to [%d, %d): the swarm's bottleneck rises", self.me().start,
                 self.me().end, *target)  # fmt: skip
        self.moving = True
        try:
            await self.move(*target)
        finally:
            self.moving = False
            self._last_move = time.monotonic()
        self.moves += 1
        return target

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval * self.rng.uniform(0.5, 1.5))
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("rebalancing check failed")

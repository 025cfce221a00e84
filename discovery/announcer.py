"""A peer's heartbeat in the DHT: re-announce its record well inside the record's expiry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from discovery.dht import SwarmDHT
from discovery.records import PeerRecord

log = logging.getLogger(__name__)


class Announcer:
    """Re-announces `make_record()` every `heartbeat` seconds with ``expires_at = now + ttl``.

    `make_record` is called for every announce, so changing fields (free cache, live sessions,
    state) reach the DHT within one heartbeat; `announce_now()` pushes a change at once.
    Announces are serialized; a failed heartbeat is logged and retried at the next one.
    """

    def __init__(
        self,
        dht: SwarmDHT,
        make_record: Callable[[], PeerRecord],
        *,
        heartbeat: float = 5.0,
        ttl: float | None = None,
    ):
        ttl = 3 * heartbeat if ttl is None else ttl
        if heartbeat <= 0 or ttl <= heartbeat:
            raise ValueError(f"need 0 < heartbeat < ttl, got heartbeat={heartbeat}, ttl={ttl}")
        self.dht = dht
        self.make_record = make_record
        self.heartbeat = heartbeat
        self.ttl = ttl
        self.last_record: PeerRecord | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._stopped = False

    async def start(self) -> PeerRecord:
        """Announce once (errors propagate), then keep announcing in the background."""
        if self._task is not None:
            raise RuntimeError("Announcer already started")
        record = await self.announce_now()
        self._task = asyncio.ensure_future(self._run())
        return record

    async def announce_now(self) -> PeerRecord:
        async with self._lock:
            if self._stopped:
                raise RuntimeError("Announcer stopped")
            record = self.make_record().with_expiry(self.dht.clock() + self.ttl)
            await self.dht.announce(record)
            self.last_record = record
            return record

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.heartbeat
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = loop.time() + self.heartbeat
            try:
                await self.announce_now()
            except Exception:
                log.exception("DHT heartbeat failed; retrying in %.1fs", self.heartbeat)

    async def stop(self, withdraw: bool = True) -> None:
        """Stop the heartbeat; with `withdraw`, tombstone the record so it vanishes at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._lock:
            self._stopped = True
            if withdraw and self.last_record is not None:
                try:
                    await self.dht.withdraw(self.last_record)
                except Exception:
                    log.exception("DHT withdraw of %s failed", self.last_record.peer_id)

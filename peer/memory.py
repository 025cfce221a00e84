"""The peer's KV memory budget: which sessions hold cache, which are kept idle, who is evicted.

Accounting is in tokens of this span's KV cache with every layer at full length
(`KVCache.bytes_per_token` converts bytes): a budget of N tokens is N tokens' worth of memory.

* A session RESERVES the most its cache can ever allocate when it opens (`KVCache.budget_tokens`:
  its `max_length` tokens on full-attention layers, the trimmed store's bound on sliding-window
  layers), so a live session can always grow to its limit: the sum of live reservations never
  exceeds the budget, hence load alone never runs the peer out of memory (caches grow by doubling
  but never past those bounds). Counting window layers by their bound, not at full length, is
  what lets a window model (Mistral, Gemma 2/3, gpt-oss) admit more sessions for the same memory.
* When its stream closes, a session with cached tokens is kept IDLE under its session id for up
  to `idle_ttl` seconds, holding only what it has allocated (`cache.held_tokens`). A later stream
  may resume it (`OpenSession.resume`) and skip recomputing the conversation so far.
* Idle sessions are evictable: an open that does not fit evicts them least-recently-used first.
  If live sessions alone leave no room, the open waits up to `open_wait` seconds for one to close
  and then fails with RESOURCE_EXHAUSTED; the gateway tries elsewhere or answers 503.

Concurrency contract: every method runs on the event loop; nothing here touches tensors, so no
lock is needed. Waiters sleep on an event that is replaced (set, then renewed) on every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Protocol

log = logging.getLogger("peer.memory")


def session_tag(session_id: str) -> str:
    """What logs show of a session id: the first 8 hex digits of its sha256. The id itself is a
    capability (whoever knows it can resume the session's cache), so it is never logged."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]


class BudgetExhausted(Exception):
    """No room for the session within the wait bound; the peer answers RESOURCE_EXHAUSTED."""


class _Cache(Protocol):
    length: int

    @property
    def held_tokens(self) -> int: ...


class _Session(Protocol):
    session_id: str
    cache: _Cache
    reserved: int
    idle_since: float
    in_forward: bool


class SessionTable:
    """Live and idle sessions of one peer against a budget of `budget` cache tokens."""

    def __init__(self, budget: int, *, idle_ttl: float = 300.0, open_wait: float = 5.0):
        self.budget = budget
        self.idle_ttl = idle_ttl
        self.open_wait = open_wait
        self.live: dict[int, _Session] = {}  # id(session) -> session
        self.idle: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self.reserved_live = 0
        self.reserved_idle = 0
        self.evictions = 0
        self._changed = asyncio.Event()

    # -- figures ----------------------------------------------------------------------------
    @property
    def free_tokens(self) -> int:
        """Tokens an open can get right now: idle caches count as free, being evictable."""
        self.expire()
        return max(0, self.budget - self.reserved_live)

    def live_ids(self) -> set[str]:
        return {session.session_id for session in self.live.values()}

    # -- open / close -----------------------------------------------------------------------
    async def admit(
        self, tokens: int, session_id: str, resume: bool, make, resumed_tokens=None
    ) -> tuple[_Session, bool]:
        """Reserve `tokens` budget units for a session; returns (session, resumed).

        `make()` builds a fresh session. With `resume`, the idle session kept under `session_id`
        is reattached instead when there is one; it reserves at least what it holds, and
        `resumed_tokens(session)` when given (its own cache may grow otherwise than a fresh one:
        a layer whose window covered its former length is stored at full length). A resume that finds the session still live (its
        previous stream has not finished closing) waits for it like an open waits for room.
        Raises `BudgetExhausted` when the bound passes without room.
        """
        if tokens > self.budget:
            raise BudgetExhausted(
                f"a session needing {tokens} cache tokens exceeds this peer's cache budget of {self.budget}"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.open_wait
        while True:
            self.expire()
            still_live = resume and session_id in self.live_ids()
            if not still_live:
                kept = self.idle.pop(session_id, None)
                if kept is not None:
                    self.reserved_idle -= kept.reserved
                session = kept if resume and kept is not None else None
                need = tokens
                if session is not None:
                    need = max(
                        tokens, session.cache.held_tokens, resumed_tokens(session) if resumed_tokens else 0
                    )
                self._evict_for(need)
                if self.reserved_live + self.reserved_idle + need <= self.budget:
                    session = session if session is not None else make()
                    session.reserved = need
                    self.live[id(session)] = session
                    self.reserved_live += need
                    return session, kept is not None and resume
                if kept is not None:  # no room even for it: put it back, still resumable later
                    self._keep(kept)
            remaining = deadline - loop.time()
            if remaining <= 0:
                if still_live:  # the old stream is stuck: start afresh, the caller replays
                    resume = False
                    deadline = loop.time() + self.open_wait
                    continue
                raise BudgetExhausted(
                    f"no cache room for {tokens} tokens after {self.open_wait:.1f} s "
                    f"({self.budget - self.reserved_live} of {self.budget} free, {len(self.live)} live sessions)"
                )
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    def release(self, session: _Session, keep: bool) -> None:
        """The session's stream ended: free its reservation, keeping its cache idle if asked."""
        if self.live.pop(id(session), None) is None:
            return
        self.reserved_live -= session.reserved
        # A cache that a forward pass is still writing (its stream was cancelled mid-step) is not
        # kept: a resume would race with that pass.
        if keep and self.idle_ttl > 0 and session.cache.length > 0 and not session.in_forward:
            old = self.idle.pop(session.session_id, None)
            if old is not None:
                self.reserved_idle -= old.reserved
            session.reserved = session.cache.held_tokens
            self._keep(session)
        self._notify()

    def drop_idle(self) -> None:
        """Forget every idle session (draining)."""
        self.idle.clear()
        self.reserved_idle = 0
        self._notify()

    # -- internals --------------------------------------------------------------------------
    def _keep(self, session: _Session) -> None:
        session.idle_since = time.monotonic()
        self.idle[session.session_id] = session
        self.reserved_idle += session.reserved

    def _evict_for(self, need: int) -> None:
        while self.idle and self.reserved_live + self.reserved_idle + need > self.budget:
            session_id, session = self.idle.popitem(last=False)
            self.reserved_idle -= session.reserved
            self.evictions += 1
            log.debug("evicted idle session %s (%d tokens)", session_tag(session_id), session.cache.length)

    def expire(self) -> None:
        if not self.idle:
            return
        horizon = time.monotonic() - self.idle_ttl
        while self.idle:
            session_id, session = next(iter(self.idle.items()))
            if session.idle_since > horizon:
                break
            del self.idle[session_id]
            self.reserved_idle -= session.reserved

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

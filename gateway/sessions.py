"""Session pins: which route a conversation uses, so its next turn goes to the same peers.

A pin is small JSON under `swarm:session:<key>` with an expiry. Any gateway replica that shares
the Redis sees the same pins. Without Redis the pins live in this process (an LRU map). When Redis
fails the gateway keeps serving without pins: reads miss and writes are dropped, the outage is
logged once, counted, and pins resume when Redis answers again.

Keys: an explicit `X-Session-Id` header when the client sends one, otherwise a hash of the
conversation so far (see `conversation_key`), so plain OpenAI clients get pinning for free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from gateway.routing import Hop, Route

log = logging.getLogger("gateway.sessions")

PREFIX = "swarm:session:"
SESSION_HEADER = "x-session-id"  # a client's explicit conversation key


@dataclass
class Pin:
    model: str
    route: Route
    # tokens the route's peers already hold for this conversation (used for cache reuse)
    tokens: list[int] = field(default_factory=list)
    # what the peers' session id (the capability that resumes their caches) is derived from with
    # the gateway's secret (`Gateway.peer_session_id`): the id itself is never stored
    session_nonce: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "route": [hop.to_dict() for hop in self.route],
                "tokens": self.tokens,
                "session_nonce": self.session_nonce,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Pin:
        data = json.loads(raw)
        return cls(
            model=str(data["model"]),
            route=tuple(Hop.from_dict(hop) for hop in data["route"]),
            tokens=[int(token) for token in data.get("tokens", [])],
            session_nonce=str(data.get("session_nonce", "")),
        )


def scoped_key(scope: str | None, key: str) -> str:
    """The pin key of `key` for the caller `scope` (`gateway.auth.pin_scope`: a store key's id, else
    the bearer token as sent): another caller cannot read or overwrite it. The scope itself is not
    stored, only a hash of it."""
    if not scope:
        return key
    digest = hashlib.sha256(scope.strip().encode()).hexdigest()[:16]
    return f"{digest}:{key}"


def conversation_key(model: str, messages: list[dict]) -> str:
    """Hash of the model and every message but the newest user turn.

    Turn N+1 of a chat resends turns 1..N plus the assistant's reply, so hashing all but the last
    message of turn N+1 gives the same key as hashing all of turn N plus its reply: the key that
    turn N stores its pin under (see `next_turn_key`).
    """
    return _digest(model, messages[:-1])


def next_turn_key(model: str, messages: list[dict], reply: str) -> str:
    return _digest(model, [*messages, {"role": "assistant", "content": reply}])


def _digest(model: str, messages: list[dict]) -> str:
    canonical = json.dumps(
        [model, [(m.get("role"), m.get("content")) for m in messages]], sort_keys=True, default=str
    )
    return "conv-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


class SessionStore(Protocol):
    """Where pins live. `available` is False while the backend is down (pins are then skipped)."""

    backend: str
    errors: int

    @property
    def available(self) -> bool: ...

    async def get(self, key: str) -> Pin | None: ...

    async def put(self, key: str, pin: Pin) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...


class MemorySessionStore:
    """In-process pins with an expiry, bounded in size (least recently used goes first)."""

    backend = "memory"
    errors = 0  # never fails

    def __init__(self, ttl: float = 3600.0, max_items: int = 100_000):
        self.ttl = ttl
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()

    @property
    def available(self) -> bool:
        return True

    async def get(self, key: str) -> Pin | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, raw = item
        if expires < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return Pin.from_json(raw)

    async def put(self, key: str, pin: Pin) -> None:
        self._items[key] = (time.monotonic() + self.ttl, pin.to_json())
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    async def delete(self, key: str) -> None:
        self._items.pop(key, None)

    async def close(self) -> None:
        self._items.clear()


class RedisSessionStore:
    """Pins in Redis, shared by every gateway replica; degrades to no pins while Redis is down."""

    backend = "redis"

    def __init__(self, url: str, ttl: float = 3600.0, on_error=None):
        import redis.asyncio as redis

        self.ttl = ttl
        self._redis = redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._down_since: float | None = None
        self.errors = 0
        self._on_error = on_error

    @property
    def available(self) -> bool:
        return self._down_since is None

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if self._on_error:
            self._on_error()
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("redis unavailable (%s); serving without session pins until it returns", exc)

    def _ok(self) -> None:
        if self._down_since is not None:
            log.info("redis is back after %.1f s; session pins resume", time.monotonic() - self._down_since)
            self._down_since = None

    async def get(self, key: str) -> Pin | None:
        from redis.exceptions import RedisError

        try:
            raw = await self._redis.get(PREFIX + key)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._ok()
        if raw is None:
            return None
        try:
            return Pin.from_json(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed session pin under %s", key)
            return None

    async def put(self, key: str, pin: Pin) -> None:
        from redis.exceptions import RedisError

        try:
            await self._redis.set(PREFIX + key, pin.to_json(), ex=max(1, int(self.ttl)))
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return
        self._ok()

    async def delete(self, key: str) -> None:
        from redis.exceptions import RedisError

        try:
            await self._redis.delete(PREFIX + key)
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def close(self) -> None:
        await self._redis.aclose()

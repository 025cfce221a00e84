"""kademlia storage that merges values entry by entry instead of overwriting them, and keeps only
entries whose signature holds (`discovery.signing`)."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from kademlia.storage import ForgetfulStorage
from kademlia.utils import digest

from discovery.entries import (
    MAX_VALUE_BYTES,
    MODELS_KEY,
    Entries,
    cap_entries,
    decode_entries,
    encode_entries,
    merge_entries,
    prune,
)
from discovery.signing import accepted_entries, signed_at

MODELS_DIGEST = digest(MODELS_KEY)  # the one key whose entries any member may sign

log = logging.getLogger(__name__)


class MergingStorage(ForgetfulStorage):
    """kademlia storage whose values are merged entry by entry (see the module docstring).

    Stored internally as parsed `Entries`; `get` / iteration return JSON strings, as kademlia
    expects. Writes that are not JSON objects of entries are ignored (logged), never raised.
    Entries stored from the network (`__setitem__`) are verified: unsigned, forged, oversize or
    replayed ones (signed before the entry held for that id) are dropped and counted in
    `rejected[reason]`; `merge` is for entries this node signed or already verified.
    """

    CAP_WARNING_INTERVAL_S = 60.0

    def __init__(
        self,
        ttl: float = 24 * 3600,
        max_value_bytes: int = MAX_VALUE_BYTES,
        clock: Callable[[], float] = time.time,
        rejected: Counter | None = None,
    ):
        super().__init__(ttl=ttl)
        self.rejected = Counter() if rejected is None else rejected  # reason -> entries dropped
        self.clock = clock  # unix time, which entries' `expires_at` is measured in (tests pass a fake)
        self.data: OrderedDict[bytes, tuple[float, Entries]] = OrderedDict()
        self.max_value_bytes = max_value_bytes
        self._encoded: dict[bytes, tuple[Entries, str]] = {}  # key -> (the entries encoded, JSON)
        self._last_cap_warning = -math.inf

    def __setitem__(self, key: bytes, value: object) -> None:
        entries = decode_entries(value)
        if not isinstance(key, bytes) or entries is None:
            shown = key.hex() if isinstance(key, bytes) else repr(key)[:40]
            log.warning("ignoring a malformed DHT value (%s) for key %s", type(value).__name__, shown)
            self.rejected["malformed"] += 1
            return
        entries = accepted_entries(entries, self.clock(), self.rejected, any_signer=key == MODELS_DIGEST)
        held = self.data[key][1] if key in self.data else {}
        fresh = {}
        for entry_id, entry in entries.items():
            current = held.get(entry_id)
            if current is not None and signed_at(entry) < signed_at(current):
                self.rejected["replayed"] += 1  # an older copy: a replay, or a late hand-off
            else:
                fresh[entry_id] = entry
        if fresh:
            self.merge(key, fresh)

    def merge(self, key: bytes, entries: Entries) -> None:
        current = self.data.pop(key, (0.0, {}))[1]
        merged = merge_entries(current, entries, self.clock())
        capped = cap_entries(merged, self.max_value_bytes)
        if len(capped) < len(merged):
            self._warn_capped(key, len(merged) - len(capped), len(merged))
            merged = capped
        if merged:
            self.data[key] = (time.monotonic(), merged)
        self.cull()

    def _warn_capped(self, key: bytes, evicted: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_cap_warning >= self.CAP_WARNING_INTERVAL_S:
            self._last_cap_warning = now
            log.warning(
                "DHT value for key %s is over %d bytes: evicted %d of %d entries (expiring soonest)",
                key.hex(), self.max_value_bytes, evicted, total,
            )  # fmt: skip

    def entries(self, key: bytes) -> Entries:
        """A copy of the live (unexpired) entries under `key`, tombstones included."""
        self.cull()
        return dict(self._prune_key(key))

    def get(self, key: bytes, default: Any = None) -> Any:
        # Encoded once per change: a model's shards are read by every gateway every second.
        self.cull()
        live = self._prune_key(key)
        if not live:
            return default
        cached = self._encoded.get(key)
        if cached is None or cached[0] is not live:
            cached = self._encoded[key] = (live, encode_entries(live))
        return cached[1]

    def __getitem__(self, key: bytes) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def cull(self) -> None:
        cutoff = time.monotonic() - self.ttl
        while self.data and next(iter(self.data.values()))[0] <= cutoff:
            key, _ = self.data.popitem(last=False)
            self._encoded.pop(key, None)

    def snapshot(self) -> list[tuple[bytes, Entries]]:
        """(key, entries) for every key with live entries, oldest write first."""
        self.cull()
        return [(key, entries) for key in list(self.data) if (entries := self._prune_key(key))]

    def __iter__(self):
        return iter([(key, encode_entries(entries)) for key, entries in self.snapshot()])

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, str]]:
        cutoff = time.monotonic() - seconds_old
        return [
            (key, encode_entries(entries)) for key, entries in self.snapshot() if self.data[key][0] <= cutoff
        ]

    def _prune_key(self, key: bytes) -> Entries:
        if key not in self.data:
            return {}
        birthday, entries = self.data[key]
        live = prune(entries, self.clock())
        if not live:
            del self.data[key]
            self._encoded.pop(key, None)
        elif len(live) != len(entries):
            self.data[key] = (birthday, live)  # keeps its place in the age order
        return live

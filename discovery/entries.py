"""DHT values as entries: the record format, the merge rule, expiry and size limits (pure functions).

Record format
-------------
Every DHT value is a JSON object of *entries*, ``{"<entry id>": {..., "expires_at": <unix time>}}``:

* ``model:<model id>`` -> ``{peer_id: PeerRecord.to_dict()}``, one entry per block peer serving that
  model. A departed peer's entry is a tombstone ``{"departed": true, "expires_at": t}``. Past
  `discovery.shards.SHARD_CAPACITY` peers, a model's entries spread over a tree of shard keys next
  to this one (`discovery.shards`); this key is its root.
* ``models`` -> ``{model_id: {"num_blocks": n, "expires_at": t}}``, one entry per announced model.

Every entry is also signed (``public_key``, ``signed_at``, ``sig``; see `discovery.signing`), and
storage and readers drop entries whose signature does not hold.

Values are JSON *strings* because kademlia only stores str / bytes / int / float / bool.

Why merge per peer
------------------
A plain kademlia ``set`` overwrites: two peers announcing the same model would erase each other.
`MergingStorage` therefore merges an incoming value into the stored one entry by entry; per entry
the later ``expires_at`` wins (on a tie a tombstone wins). A peer only ever stores its own entry, so
each store call is small; the merge happens in every node's storage. Nodes may hold different
merges (one missed a store, another joined late), so a read does not stop at the first value as
kademlia's ``Server.get`` does: it asks the k nodes nearest to the key (plus its own storage) and
merges all their answers with the same rule.

Why records carry their own expiry
----------------------------------
kademlia's TTL is one per node, counts from the last write of the whole key and is applied lazily,
so it cannot age out one peer inside a merged value. Each entry carries ``expires_at`` (absolute
unix time, so clocks must agree to within a few seconds; the default TTL is 3 heartbeats), and the
storage drops expired entries on every read and write. Peers re-announce every heartbeat
(`Announcer`). A withdrawal stores a tombstone whose expiry is just past the peer's last announced
expiry: it outlives every copy of the record anywhere, so no stale copy can bring it back, and it
vanishes by itself afterwards.

Size limits
-----------
* rpcudp refuses a request whose packed arguments exceed 8192 bytes: a store call carries at most
  `MAX_STORE_BYTES` of JSON. A single entry is far smaller (string fields are length-capped), and
  merged values handed to other nodes (kademlia's hand-off to a new neighbour, the hourly republish)
  are split into several stores by `split_entries`.
* A reply is one UDP datagram; over ~64 KB it is silently lost. The storage caps a merged value at
  `MAX_VALUE_BYTES` (about 85 signed peer records of ~560 bytes) by evicting the entries that expire
  soonest, and logs a warning when it does. A model's shards hold at most 48 records each, so the
  cap is only reached by many peers joining one shard at once (`discovery.shards`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from discovery.records import PeerRecord, is_finite_number
from discovery.signing import signed_at

log = logging.getLogger(__name__)

MODELS_KEY = "models"
MAX_STORE_BYTES = 7_800  # JSON per store call; rpcudp's limit is 8192 for name + node id + key + value
MAX_VALUE_BYTES = 48_000  # merged value per key; a find_value reply must fit one UDP datagram
MAX_ENTRY_ID_CHARS = 256

Entries = dict[str, dict[str, Any]]


def model_key(model: str) -> str:
    return f"model:{model}"


def _valid_entry(entry_id: object, entry: object) -> bool:
    return (
        isinstance(entry_id, str)
        and 0 < len(entry_id) <= MAX_ENTRY_ID_CHARS
        and isinstance(entry, dict)
        and is_finite_number(entry.get("expires_at"))
        and entry.get("departed", False) in (True, False)
    )


def decode_entries(value: object) -> Entries | None:
    """The valid entries of a DHT value; None when it is not a JSON object at all."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    return {key: entry for key, entry in data.items() if _valid_entry(key, entry)}


def encode_entries(entries: Entries) -> str:
    """Compact, ASCII-only (so len() == bytes), deterministic JSON."""
    return json.dumps(entries, separators=(",", ":"), sort_keys=True, allow_nan=False)


def is_departed(entry: Mapping[str, Any]) -> bool:
    return entry.get("departed") is True


def prune(entries: Entries, now: float) -> Entries:
    return {key: entry for key, entry in entries.items() if entry["expires_at"] > now}


def _supersedes(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    # Signed entries (`discovery.signing`): the one signed last wins, so a peer's tombstone beats
    # its earlier records and its next record (after a restart with the same key) beats the tombstone.
    if signed_at(new) != signed_at(old):
        return signed_at(new) > signed_at(old)
    if new["expires_at"] != old["expires_at"]:
        return new["expires_at"] > old["expires_at"]
    return is_departed(new) and not is_departed(old)


def merge_entries(base: Entries, incoming: Entries, now: float) -> Entries:
    """Per entry id the later signature wins, then the later expiry (a tombstone on a tie);
    expired entries are dropped."""
    return merge_entries_into(prune(base, now), incoming, now)


def _same_signed(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """One signed entry (read from another replica): nothing to compare."""
    sig = a.get("sig")
    return isinstance(sig, str) and sig == b.get("sig")


def merge_entries_into(merged: Entries, incoming: Entries, now: float) -> Entries:
    """`merge_entries` into `merged` itself (which must hold no expired entry), for a reader that
    merges many values (a model's shards) without copying the growing result each time."""
    for key, entry in incoming.items():
        if entry["expires_at"] <= now:
            continue
        current = merged.get(key)
        if current is None or (not _same_signed(entry, current) and _supersedes(entry, current)):
            merged[key] = entry
    return merged


def _entry_items(entries: Entries) -> list[str]:
    return [f"{json.dumps(key)}:{encode_entries(entry)}" for key, entry in sorted(entries.items())]


def cap_entries(entries: Entries, limit: int = MAX_VALUE_BYTES) -> Entries:
    """Evict the entries that expire soonest until the encoded value fits in `limit` bytes.

    A model's records are sharded (`discovery.shards`), so this is a safety net, not a limit.
    """
    size = len(encode_entries(entries))
    if size <= limit:
        return entries
    kept = dict(entries)
    # Tombstones are tiny and guard against resurrection: live records go first.
    for key, entry in sorted(entries.items(), key=lambda item: (is_departed(item[1]), item[1]["expires_at"])):
        size -= len(json.dumps(key)) + 1 + len(encode_entries(entry)) + 1
        del kept[key]
        if size <= limit:
            break
    return kept


def split_entries(entries: Entries, limit: int = MAX_STORE_BYTES) -> list[str]:
    """Encode `entries` as several JSON objects, each at most `limit` bytes (one per store call)."""
    chunks: list[str] = []
    items: list[str] = []
    size = 2
    for item in _entry_items(entries):
        if len(item) + 2 > limit:
            log.warning("dropping a DHT entry of %d bytes: over the %d-byte store limit", len(item), limit)
            continue
        if items and size + 1 + len(item) > limit:
            chunks.append("{" + ",".join(items) + "}")
            items, size = [], 2
        size += len(item) + (1 if items else 0)
        items.append(item)
    if items:
        chunks.append("{" + ",".join(items) + "}")
    return chunks


def records_from_entries(
    entries: Entries, model: str, now: float | None = None, parsed: dict[str, PeerRecord | None] | None = None
) -> list[PeerRecord]:
    """Live, valid records for `model`, sorted by span then peer id; bad entries are skipped.

    `parsed` (optional, kept by the caller between reads): signature -> the record parsed from
    that signed entry (None: malformed). A signed entry never changes, and validating a thousand
    records on every read cost a gateway ~50 ms."""
    now = time.time() if now is None else now
    records = []
    for peer_id, entry in entries.items():
        if is_departed(entry):
            continue
        sig = entry.get("sig") if parsed is not None else None
        if isinstance(sig, str) and sig in parsed:
            record = parsed[sig]
            if record is None:
                continue
        else:
            try:
                record = PeerRecord.from_dict(entry)
            except (ValueError, TypeError) as exc:
                log.debug("ignoring malformed record %r for %s: %s", peer_id, model, exc)
                record = None
            if isinstance(sig, str):
                parsed[sig] = record
            if record is None:
                continue
        if record.peer_id != peer_id or record.model != model or record.is_expired(now):
            continue
        records.append(record)
    return sorted(records, key=lambda r: (r.start, r.end, r.peer_id))

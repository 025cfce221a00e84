"""Where a model's peer records live in the DHT once one key cannot hold them all (pure functions).

Why shard
---------
A DHT value is answered in one UDP datagram, so the merged value under one key is capped
(`discovery.entries.MAX_VALUE_BYTES`, 48 KB: about 85 signed records of ~560 bytes). A public
swarm has far more peers per model.

The scheme: a binary tree of shards that splits where it is full
-----------------------------------------------------------------
A model's shards are numbered like a binary heap: shard 1 is the root, the children of shard ``s``
are ``2s`` and ``2s + 1``; shard ``s`` is at level ``s.bit_length() - 1``. A peer's path down the
tree is fixed by its id (the bits of ``sha1(peer_id)``, one per level), and so is its *rank* (the
same hash as a number). A peer finds its place when it reviews (at its first announce and every
`REVIEW_S` after): from the root down its path, the first shard with fewer than `SHARD_CAPACITY`
peers, or the one it is in already if it ranks among the `SHARD_CAPACITY` lowest there (several
peers that joined one shard at once overfill it; the highest-ranked leave at their next review, and
every peer reading the same shard ranks the same way, so they agree on who goes). So:

* the number of shards follows the swarm: one shard (the root) up to `SHARD_CAPACITY` peers,
  ``2**(L+1) - 1`` shards hold up to ``SHARD_CAPACITY * (2**(L+1) - 1)`` peers (L + 1 levels);
  1000 peers need 5 levels (31 shards of <= 48), 10,000 need 8;
* no peer needs to know how many peers there are: a full shard is visible to all who read it;
* when peers leave, those below move up at their next review (a place above has opened);
* a full shard is never entered, so a shard grows past capacity only by peers joining it within
  one review of each other (bounded by the value cap, about 85 records, before evictions).

A reader walks the tree breadth first: the root, then the children of every shard that holds at
least `DESCEND_AT` live records (half of capacity: a shard that has lost some peers may still have
children whose peers have not moved up yet), one round of parallel reads per level.

Why XOR-adjacent keys
---------------------
Shard ``s`` of a model is stored under the model's key with ``s - 1`` XORed into its last 4 bytes
(`shard_key`), so the root is the model's key from before sharding, and every shard key shares
its first 128 bits with it: all of a model's shards have the same k nearest nodes. One crawl
(or one remembered from the last few seconds) finds them, and each level of a read is one round of
parallel ``find_value`` calls to nodes already known — never a lookup per shard. The price: a
model's records all load the same k nodes (storage ~0.6 KB per peer and replica; stores and reads
of that model all go there). Petals keys per block instead, which spreads load over more nodes but
makes a whole-model read one lookup per block.

Mixed versions
--------------
The root is the old single key, so up to `SHARD_CAPACITY` peers old and new peers see each other
fully. Past that, a peer without sharding still announces in the root and reads only the root: new
readers see it (while the root's cap holds it), but an old gateway sees only the root's peers.
Upgrade gateways before a model grows past `SHARD_CAPACITY` peers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from kademlia.utils import digest

from discovery.entries import Entries, is_departed, model_key

SHARD_CAPACITY = 48  # records per shard: ~27 KB signed, well under the 48 KB value cap (~85)
DESCEND_AT = SHARD_CAPACITY // 2  # a reader reads a shard's children when it holds this many
MAX_LEVEL = 16  # 2**17 - 1 shards of 48: 6 million peers; also bounds a read walked on junk
ROOT = 1
REVIEW_S = 60.0  # a peer checks its place in the tree this often (and at its first announce)

_OFFSET_BYTES = 4  # shard numbers go in the key's last 4 bytes


def level_of(shard: int) -> int:
    return shard.bit_length() - 1


def children(shard: int) -> tuple[int, int]:
    return 2 * shard, 2 * shard + 1


def shard_key(base: bytes, shard: int) -> bytes:
    """`base` (a 20-byte DHT key) with ``shard - 1`` XORed into its last 4 bytes; the root is `base`."""
    if not 1 <= shard < 1 << (MAX_LEVEL + 1):
        raise ValueError(f"shard must be in 1..{(1 << (MAX_LEVEL + 1)) - 1}, got {shard}")
    head, tail = base[:-_OFFSET_BYTES], int.from_bytes(base[-_OFFSET_BYTES:], "big")
    return head + (tail ^ (shard - 1)).to_bytes(_OFFSET_BYTES, "big")


def model_base_key(model: str) -> bytes:
    """The DHT key of a model's root shard (the single key of peers before sharding)."""
    return digest(model_key(model))


def model_shard_key(model: str, shard: int) -> bytes:
    return shard_key(model_base_key(model), shard)


def region_of(key: bytes) -> bytes:
    """The key with its shard bits cleared: every shard of one model has the same region, hence
    (to within 2**32 in XOR distance) the same nearest nodes."""
    return key[:-_OFFSET_BYTES] + bytes(_OFFSET_BYTES)


def peer_hash(peer_id: str) -> int:
    """A peer's rank (lower stays higher in the tree) and, bit by bit, its path down."""
    return int.from_bytes(hashlib.sha1(peer_id.encode("utf-8")).digest(), "big")


def child_on_path(shard: int, peer_id: str) -> int:
    """The child of `shard` on `peer_id`'s path (bit `level_of(shard)` of its hash)."""
    return 2 * shard + (peer_hash(peer_id) >> level_of(shard) & 1)


def residents(entries: Entries) -> list[str]:
    """Peer ids with a live record (not a tombstone) in a shard's entries."""
    return [entry_id for entry_id, entry in entries.items() if not is_departed(entry)]


def ranks_within(peer_id: str, others: Iterable[str], capacity: int = SHARD_CAPACITY) -> bool:
    """`peer_id` is among the `capacity` lowest-ranked of `others` and itself."""
    mine = peer_hash(peer_id)
    lower = sum(1 for other in set(others) if other != peer_id and peer_hash(other) < mine)
    return lower < capacity


def should_descend(entries: Entries) -> bool:
    """A reader reads a shard's children when the shard holds `DESCEND_AT` live records or more."""
    return len(residents(entries)) >= DESCEND_AT

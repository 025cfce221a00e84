"""The swarm's Kademlia DHT: peer records, a merging storage, announce / withdraw / lookup.

Record format
-------------
Every DHT value is a JSON object of *entries*, ``{"<entry id>": {..., "expires_at": <unix time>}}``:

* ``model:<model id>`` -> ``{peer_id: PeerRecord.to_dict()}``, one entry per block peer serving that
  model. A departed peer's entry is a tombstone ``{"departed": true, "expires_at": t}``.
* ``models`` -> ``{model_id: {"num_blocks": n, "expires_at": t}}``, one entry per announced model.

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
  `MAX_VALUE_BYTES` (about 150 peer records per model) by evicting the entries that expire soonest,
  and logs a warning when it does.

Concurrency: everything runs on one asyncio event loop; storage operations are synchronous, so
they never interleave. Network input (store requests, find_value replies) is validated and
malformed parts are dropped, never trusted and never allowed to raise into the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import ForgetfulStorage
from kademlia.utils import digest

log = logging.getLogger(__name__)

DEFAULT_DHT_PORT = 8468
MODELS_KEY = "models"
MAX_STORE_BYTES = 7_800  # JSON per store call; rpcudp's limit is 8192 for name + node id + key + value
MAX_VALUE_BYTES = 48_000  # merged value per key; a find_value reply must fit one UDP datagram
MAX_ENTRY_ID_CHARS = 256
TOMBSTONE_MARGIN_S = 0.001
STATE_ONLINE = "online"
STATE_DRAINING = "draining"
STATES = (STATE_ONLINE, STATE_DRAINING)

Entries = dict[str, dict[str, Any]]


def model_key(model: str) -> str:
    return f"model:{model}"


# --------------------------------------------------------------------------- addresses


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> ``(host, port)``; ValueError when malformed."""
    if not isinstance(address, str):
        raise ValueError(f"address must be a string 'host:port', got {type(address).__name__}")
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"address must look like 'host:port', got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 addresses must be bracketed like '[::1]:port', got {address!r}")
    if not host or any(ch.isspace() for ch in host):
        raise ValueError(f"address has an invalid host: {address!r}")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"address has a non-numeric port: {address!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"address port must be in 1..65535: {address!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- records

# Caps keep one entry far below MAX_STORE_BYTES whatever a peer puts in its strings.
_STR_LIMITS = {
    "peer_id": 128,
    "address": 256,
    "model": 256,
    "dtype": 32,
    "quant": 32,
    "state": 16,
    "version": 64,
}
_INT_FIELDS = ("start", "end", "num_blocks", "free_cache_tokens", "live_sessions", "metrics_port")
_FLOAT_FIELDS = ("throughput", "expires_at")
_MAY_BE_EMPTY = ("version",)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PeerRecord:
    """What a block peer says about itself in the DHT. Construction validates (ValueError)."""

    peer_id: str
    address: str  # "host:port" of the peer's gRPC server
    model: str
    start: int  # blocks [start, end)
    end: int
    num_blocks: int  # blocks in the whole model
    dtype: str = "float32"
    quant: str = "none"
    throughput: float = 0.0  # tokens/s
    free_cache_tokens: int = 0
    live_sessions: int = 0
    state: str = STATE_ONLINE
    version: str = ""
    expires_at: float = 0.0  # unix time
    metrics_port: int = 0  # HTTP port of the peer's Prometheus /metrics on its host; 0 = not served

    def __post_init__(self) -> None:
        for name, limit in _STR_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")
            if len(value) > limit or (not value and name not in _MAY_BE_EMPTY):
                raise ValueError(f"{name} must be 1..{limit} characters")
        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value):
                raise ValueError(f"{name} must be a finite number")
            object.__setattr__(self, name, float(value))
        if not 0 <= self.start < self.end <= self.num_blocks:
            raise ValueError(f"span [{self.start}, {self.end}) is not inside 0..{self.num_blocks}")
        if self.throughput < 0 or self.free_cache_tokens < 0 or self.live_sessions < 0:
            raise ValueError("throughput, free_cache_tokens and live_sessions must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be in 0..65535")
        if self.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {self.state!r}")
        parse_address(self.address)

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: object) -> PeerRecord:
        """Parse network input; unknown keys are ignored (newer peers), missing required ones are not."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a peer record must be a JSON object, got {type(data).__name__}")
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in data:
                kwargs[field.name] = data[field.name]
            elif field.default is dataclasses.MISSING:
                raise ValueError(f"peer record lacks {field.name!r}")
        return cls(**kwargs)

    def with_expiry(self, expires_at: float) -> PeerRecord:
        return dataclasses.replace(self, expires_at=expires_at)

    def is_expired(self, now: float | None = None) -> bool:
        return self.expires_at <= (time.time() if now is None else now)


# --------------------------------------------------------------------------- entries (pure)


def _valid_entry(entry_id: object, entry: object) -> bool:
    return (
        isinstance(entry_id, str)
        and 0 < len(entry_id) <= MAX_ENTRY_ID_CHARS
        and isinstance(entry, dict)
        and _is_number(entry.get("expires_at"))
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
    if new["expires_at"] != old["expires_at"]:
        return new["expires_at"] > old["expires_at"]
    return is_departed(new) and not is_departed(old)


def merge_entries(base: Entries, incoming: Entries, now: float) -> Entries:
    """Per entry id the later expiry wins (a tombstone on a tie); expired entries are dropped."""
    merged = prune(base, now)
    for key, entry in incoming.items():
        if entry["expires_at"] <= now:
            continue
        current = merged.get(key)
        if current is None or _supersedes(entry, current):
            merged[key] = entry
    return merged


def _entry_items(entries: Entries) -> list[str]:
    return [f"{json.dumps(key)}:{encode_entries(entry)}" for key, entry in sorted(entries.items())]


def cap_entries(entries: Entries, limit: int = MAX_VALUE_BYTES) -> Entries:
    """Evict the entries that expire soonest until the encoded value fits in `limit` bytes.

    Past ~150 peers per model the swarm would need sharded keys (e.g. ``model:<id>:<block>``).
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


def records_from_entries(entries: Entries, model: str, now: float | None = None) -> list[PeerRecord]:
    """Live, valid records for `model`, sorted by span then peer id; bad entries are skipped."""
    now = time.time() if now is None else now
    records = []
    for peer_id, entry in entries.items():
        if is_departed(entry):
            continue
        try:
            record = PeerRecord.from_dict(entry)
        except (ValueError, TypeError) as exc:
            log.debug("ignoring malformed record %r for %s: %s", peer_id, model, exc)
            continue
        if record.peer_id != peer_id or record.model != model or record.is_expired(now):
            continue
        records.append(record)
    return sorted(records, key=lambda r: (r.start, r.end, r.peer_id))


# --------------------------------------------------------------------------- storage


class MergingStorage(ForgetfulStorage):
    """kademlia storage whose values are merged entry by entry (see the module docstring).

    Stored internally as parsed `Entries`; `get` / iteration return JSON strings, as kademlia
    expects. Writes that are not JSON objects of entries are ignored (logged), never raised.
    """

    CAP_WARNING_INTERVAL_S = 60.0

    def __init__(self, ttl: float = 24 * 3600, max_value_bytes: int = MAX_VALUE_BYTES):
        super().__init__(ttl=ttl)
        self.data: OrderedDict[bytes, tuple[float, Entries]] = OrderedDict()
        self.max_value_bytes = max_value_bytes
        self._last_cap_warning = -math.inf

    def __setitem__(self, key: bytes, value: object) -> None:
        entries = decode_entries(value)
        if not isinstance(key, bytes) or entries is None:
            shown = key.hex() if isinstance(key, bytes) else repr(key)[:40]
            log.warning("ignoring a malformed DHT value (%s) for key %s", type(value).__name__, shown)
            return
        self.merge(key, entries)

    def merge(self, key: bytes, entries: Entries) -> None:
        current = self.data.pop(key, (0.0, {}))[1]
        merged = merge_entries(current, entries, time.time())
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
        entries = self.entries(key)
        return encode_entries(entries) if entries else default

    def __getitem__(self, key: bytes) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def cull(self) -> None:
        cutoff = time.monotonic() - self.ttl
        while self.data and next(iter(self.data.values()))[0] <= cutoff:
            self.data.popitem(last=False)

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
        live = prune(entries, time.time())
        if not live:
            del self.data[key]
        elif len(live) != len(entries):
            self.data[key] = (birthday, live)  # keeps its place in the age order
        return live


# --------------------------------------------------------------------------- kademlia plumbing


class _SwarmProtocol(KademliaProtocol):
    """KademliaProtocol with a configurable RPC timeout, a size-safe hand-off, and no crashes on junk."""

    # A node that missed a reply is skipped by lookups for this long (unless it talks to us again):
    # other nodes keep it in their tables and hand it back in every crawl, and waiting out its
    # timeout each time made lookups and announcements slower than a record's ttl.
    UNRESPONSIVE_S = 30.0

    def __init__(self, source_node: Node, storage: MergingStorage, ksize: int, wait_timeout: float):
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = wait_timeout
        self._background: set[asyncio.Future] = set()
        self._unresponsive: dict[bytes, float] = {}

    def handle_call_response(self, result: Any, node: Node) -> Any:
        if result[0]:
            self._unresponsive.pop(node.id, None)
        else:
            self._unresponsive[node.id] = time.monotonic()
        return super().handle_call_response(result, node)

    def is_unresponsive(self, node_id: bytes) -> bool:
        since = self._unresponsive.get(node_id)
        if since is None:
            return False
        if time.monotonic() - since > self.UNRESPONSIVE_S:
            del self._unresponsive[node_id]
            return False
        return True

    async def _solve_datagram(self, datagram: bytes, address: tuple) -> None:
        try:
            await super()._solve_datagram(datagram, address)
        except Exception as exc:  # undecodable datagram from the network
            log.warning("ignoring a malformed datagram from %s: %s", address, exc)

    async def _accept_request(self, msg_id: bytes, data: object, address: tuple) -> None:
        try:
            await super()._accept_request(msg_id, data, address)
        except Exception as exc:  # wrong arity or types in a request
            log.warning("ignoring a malformed request from %s: %s", address, exc)

    def welcome_if_new(self, node: Node) -> None:
        """kademlia's hand-off (paper 2.5), with its bugs fixed.

        Upstream hashes the already-hashed storage key again (so it hands off to the wrong nodes),
        skips a new node farther than every known one even in a network smaller than k, sends each
        merged value in one store (refused over 8 KB), and adds this very node to its own table when
        it pings itself. Here: the stored key is the node id, a new node is "close" while fewer than
        k are known, values are split under the store limit, self (and ids that are not 20 bytes)
        are ignored.
        """
        if len(node.id) != 20 or node.id == self.source_node.id:
            return
        self._unresponsive.pop(node.id, None)  # it just talked to us
        if not self.router.is_new_node(node):
            return
        log.debug("new DHT contact %s", node)
        for key, entries in self.storage.snapshot():
            if self._should_hand_off(node, key):
                for chunk in split_entries(entries):
                    self._spawn(self.call_store(node, key, chunk))
        self.router.add_contact(node)

    def _should_hand_off(self, new: Node, key: bytes) -> bool:
        target = Node(key)
        neighbors = self.router.find_neighbors(target)
        if not neighbors:
            return True
        self_closest = self.source_node.distance_to(target) < neighbors[0].distance_to(target)
        farthest = neighbors[-1].distance_to(target)
        new_close = len(neighbors) < self.router.ksize or new.distance_to(target) < farthest
        return self_closest and new_close

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("DHT background call failed: %s", task.exception())

    def shutdown(self) -> None:
        """Cancel background stores and fail pending RPCs now instead of at their timeout."""
        for task in list(self._background):
            task.cancel()
        for future, timeout in list(self._outstanding.values()):
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()


def _valid_contact(item: object) -> bool:
    return (
        isinstance(item, list | tuple)
        and len(item) == 3
        and isinstance(item[0], bytes)
        and len(item[0]) == 20
        and isinstance(item[1], str)
        and _is_int(item[2])
        and 0 < item[2] <= 65535
    )


class _SafeNodeCrawl(NodeSpiderCrawl):
    """NodeSpiderCrawl that drops malformed contacts from replies instead of raising on them."""

    async def _nodes_found(self, responses: dict) -> list[Node]:
        cleaned = {}
        for peer_id, response in responses.items():
            ok, contacts = response if isinstance(response, tuple) and len(response) == 2 else (False, None)
            if ok and not isinstance(contacts, list):
                contacts = []
            if ok:
                contacts = [
                    tuple(item)
                    for item in contacts
                    if _valid_contact(item) and not self.protocol.is_unresponsive(item[0])
                ]
            cleaned[peer_id] = (ok, contacts)
        return await super()._nodes_found(cleaned)


def _found_value(result: object) -> object | None:
    """The value in a call_find_value result, or None (no reply, node list, junk)."""
    if isinstance(result, tuple) and len(result) == 2 and result[0] is True and isinstance(result[1], dict):
        return result[1].get("value")
    return None


class _SwarmServer(Server):
    """kademlia Server that stores per-entry chunks and reads by merging the k nearest nodes."""

    protocol_class = _SwarmProtocol
    READ_CONCURRENCY = 8  # bounded so many ~48 KB replies do not overflow the UDP receive buffer

    def __init__(self, *, ksize: int, alpha: int, node_id: bytes | None, rpc_timeout: float):
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=MergingStorage())
        self.rpc_timeout = rpc_timeout

    def _create_protocol(self) -> _SwarmProtocol:
        return _SwarmProtocol(self.node, self.storage, self.ksize, self.rpc_timeout)

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        ok, node_id = await self.protocol.ping(addr, self.node.id)
        if not ok or not isinstance(node_id, bytes) or len(node_id) != 20 or node_id == self.node.id:
            return None
        return Node(node_id, addr[0], addr[1])

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> list[Node]:
        nodes = [node for node in await asyncio.gather(*map(self.bootstrap_node, addrs)) if node is not None]
        return await self._crawl(self.node, nodes)

    async def _crawl(self, target: Node, start: list[Node]) -> list[Node]:
        if not start:
            return []
        try:
            return await _SafeNodeCrawl(self.protocol, target, start, self.ksize, self.alpha).find()
        except Exception as exc:  # last resort: a lookup must not die on one odd reply
            log.warning("DHT crawl failed (%s); using the nodes known so far", exc)
            return start

    def num_contacts(self) -> int:
        return sum(len(bucket) for bucket in self.protocol.router.buckets) if self.protocol else 0

    async def nearest_nodes(self, key: bytes) -> list[Node]:
        target = Node(key)
        return await self._crawl(target, self.protocol.router.find_neighbors(target))

    async def store_entries(self, key: bytes, entries: Entries) -> int:
        """Store on the k nearest nodes (and here when among them); returns how many hold it."""
        chunks = split_entries(entries)
        nodes = await self.nearest_nodes(key)
        held = 0
        if self._among_nearest(Node(key), nodes):
            self.storage.merge(key, entries)
            held += 1
        calls = [self._store_all(node, key, chunks) for node in nodes]
        held += sum(await asyncio.gather(*calls))
        return held

    def _among_nearest(self, target: Node, nearest: list[Node]) -> bool:
        # Upstream stores locally only when closer than the farthest of the k found, so in a network
        # smaller than k (or on a lone node) the announcer may keep nothing.
        if len(nearest) < self.ksize:
            return True
        return self.node.distance_to(target) < max(node.distance_to(target) for node in nearest)

    async def _store_all(self, node: Node, key: bytes, chunks: list[str]) -> bool:
        results = await asyncio.gather(
            *(self.protocol.call_store(node, key, c) for c in chunks), return_exceptions=True
        )
        return all(isinstance(r, tuple) and r[0] for r in results)

    async def set_digest(self, dkey: bytes, value: object) -> bool:
        """Used by kademlia's hourly republish; chunked like every other store."""
        entries = decode_entries(value)
        if not entries:
            return False
        return await self.store_entries(dkey, entries) > 0

    async def get_entries(self, key: bytes) -> Entries:
        """Merge of this node's entries and those of the k nodes nearest to `key`."""
        merged = self.storage.entries(key)
        nodes = await self.nearest_nodes(key)
        target = Node(key)
        gate = asyncio.Semaphore(self.READ_CONCURRENCY)

        async def ask(node: Node) -> object:
            async with gate:
                return await self.protocol.call_find_value(node, target)

        results = await asyncio.gather(*(ask(node) for node in nodes), return_exceptions=True)
        now = time.time()
        for node, result in zip(nodes, results, strict=True):
            value = _found_value(result)
            if value is None:
                continue
            entries = decode_entries(value)
            if entries is None:
                log.warning("ignoring a malformed DHT value from %s", node)
                continue
            merged = merge_entries(merged, entries, now)
        return merged


async def _resolve(host: str, port: int, family: int) -> tuple[str, int] | None:
    """kademlia needs IP addresses for bootstrap; resolve names (docker service names) here."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, family=family, type=socket.SOCK_DGRAM
        )
    except OSError as exc:
        log.warning("cannot resolve DHT bootstrap address %s:%d: %s", host, port, exc)
        return None
    return (infos[0][4][0], port) if infos else None


# --------------------------------------------------------------------------- public API


class SwarmDHT:
    """A kademlia node with merging storage; announce, withdraw and look up peer records.

    Use from one event loop. Every `rebootstrap_interval` seconds a background task re-bootstraps
    when the routing table is empty (bootstrap node not up yet, or every contact timed out), and
    otherwise pings the bootstrap addresses (cheap: one datagram each) so that a bootstrap node
    that restarted is rejoined (see `_bootstrap_is_new`).
    """

    def __init__(
        self,
        *,
        ksize: int = 20,
        alpha: int = 3,
        rpc_timeout: float = 2.0,
        node_id: bytes | None = None,
        rebootstrap_interval: float = 5.0,
    ):
        self._server = _SwarmServer(ksize=ksize, alpha=alpha, node_id=node_id, rpc_timeout=rpc_timeout)
        self._bootstrap: list[tuple[str, int]] = []
        self._family = socket.AF_INET
        self._host: str | None = None
        self._port: int | None = None
        self._rebootstrap_interval = rebootstrap_interval
        self._maintenance: asyncio.Task | None = None
        self._last_expiry: dict[tuple[str, str], float] = {}  # (model, peer_id) -> last announced expiry

    # ---- lifecycle

    async def start(
        self, host: str = "0.0.0.0", port: int = 0, bootstrap: Iterable[tuple[str, int]] = ()
    ) -> None:
        """Listen on UDP host:port (0 picks a free port, see `port`) and join via `bootstrap`."""
        if self._port is not None:
            raise RuntimeError("SwarmDHT already started")
        await self._server.listen(port, host)
        sock = self._server.transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._host, self._port = self._server.transport.get_extra_info("sockname")[:2]
        self._family = sock.family
        self._bootstrap = [(str(h), int(p)) for h, p in bootstrap]
        log.info("DHT node %s listening on %s", self.node_id[:12], self.address)
        if self._bootstrap:
            await self.bootstrap()
        self._maintenance = asyncio.ensure_future(self._maintain())

    async def bootstrap(self) -> int:
        """(Re)join through the bootstrap addresses; returns the number of nodes found.

        Names are resolved on every attempt: kademlia takes only IPs, and a docker service name
        may not resolve until its container is up.
        """
        resolved = await asyncio.gather(*(_resolve(h, p, self._family) for h, p in self._bootstrap))
        found = await self._server.bootstrap([addr for addr in resolved if addr is not None])
        if found:
            log.info("DHT joined via %s: %d node(s) known", self._bootstrap, len(found))
        else:
            log.warning("DHT bootstrap via %s reached no node; will retry", self._bootstrap)
        return len(found)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self._rebootstrap_interval)
            if not self._bootstrap:
                continue
            try:
                if self._server.num_contacts() == 0 or await self._bootstrap_is_new():
                    await self.bootstrap()
            except Exception:
                log.exception("DHT re-bootstrap failed")

    async def _bootstrap_is_new(self) -> bool:
        """Ping the bootstrap addresses (one datagram each way); True when one answers with a node
        id this node does not know.

        That is a bootstrap node that restarted: it comes back empty, with a new id, and nobody
        would ever contact it again (nodes only re-bootstrap with no contacts left), so the peers
        that join through it afterwards would form a network of their own that no gateway sees.
        The ping already makes the restarted node know this one (kademlia welcomes the sender of
        any request); the crawl that follows puts it into this node's table and teaches it the rest.
        """
        resolved = await asyncio.gather(*(_resolve(h, p, self._family) for h, p in self._bootstrap))
        addrs = [addr for addr in resolved if addr is not None]
        nodes = await asyncio.gather(*(self._server.bootstrap_node(addr) for addr in addrs))
        router = self._server.protocol.router
        fresh = [node for node in nodes if node is not None and router.is_new_node(node)]
        if fresh:
            log.info("DHT bootstrap node(s) %s answer with a new id; rejoining through them", fresh)
        return bool(fresh)

    def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            self._maintenance = None
        if self._server.protocol is not None:
            self._server.protocol.shutdown()
        self._server.stop()

    # ---- introspection

    @property
    def port(self) -> int:
        """The UDP port actually bound (useful after start(port=0))."""
        if self._port is None:
            raise RuntimeError("SwarmDHT not started")
        return self._port

    @property
    def host(self) -> str:
        if self._host is None:
            raise RuntimeError("SwarmDHT not started")
        return self._host

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def node_id(self) -> str:
        return self._server.node.id.hex()

    @property
    def num_contacts(self) -> int:
        return self._server.num_contacts()

    @property
    def storage(self) -> MergingStorage:
        return self._server.storage

    # ---- records

    async def announce(self, record: PeerRecord) -> int:
        """Store `record` under its model and the model under `models`; returns how many nodes hold it."""
        self._require_started()
        if record.is_expired():
            raise ValueError(f"record of {record.peer_id} has already expired; set expires_at in the future")
        slot = (record.model, record.peer_id)
        # Noted before sending: a withdrawal must outlive even an announce cancelled half-way.
        self._last_expiry[slot] = max(self._last_expiry.get(slot, 0.0), record.expires_at)
        model_entry = {"num_blocks": record.num_blocks, "expires_at": record.expires_at}
        held, _ = await asyncio.gather(
            self._server.store_entries(digest(model_key(record.model)), {record.peer_id: record.to_dict()}),
            self._server.store_entries(digest(MODELS_KEY), {record.model: model_entry}),
        )
        log.debug("announced %s on %d node(s)", record.peer_id, held)
        return held

    async def withdraw(self, record: PeerRecord) -> int:
        """Tombstone `record.peer_id` so it vanishes from lookups at once; returns how many nodes hold it."""
        self._require_started()
        slot = (record.model, record.peer_id)
        until = max(record.expires_at, self._last_expiry.pop(slot, 0.0), time.time()) + TOMBSTONE_MARGIN_S
        tombstone = {record.peer_id: {"departed": True, "expires_at": until}}
        held = await self._server.store_entries(digest(model_key(record.model)), tombstone)
        log.info("withdrew %s from %s on %d node(s)", record.peer_id, record.model, held)
        return held

    async def peers(self, model: str) -> list[PeerRecord]:
        """Live (unexpired, not withdrawn) records for `model`, both states, sorted by span."""
        self._require_started()
        entries = await self._server.get_entries(digest(model_key(model)))
        return records_from_entries(entries, model)

    async def models(self) -> dict[str, int]:
        """Announced model ids -> blocks in the model."""
        self._require_started()
        entries = await self._server.get_entries(digest(MODELS_KEY))
        return {
            model: entry["num_blocks"]
            for model, entry in sorted(entries.items())
            if not is_departed(entry) and _is_int(entry.get("num_blocks")) and entry["num_blocks"] > 0
        }

    def _require_started(self) -> None:
        if self._port is None or self._server.transport is None or self._server.transport.is_closing():
            raise RuntimeError("SwarmDHT is not running")


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
            record = self.make_record().with_expiry(time.time() + self.ttl)
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


__all__ = [
    "DEFAULT_DHT_PORT",
    "MAX_STORE_BYTES",
    "MAX_VALUE_BYTES",
    "MODELS_KEY",
    "STATES",
    "Announcer",
    "MergingStorage",
    "PeerRecord",
    "SwarmDHT",
    "decode_entries",
    "encode_entries",
    "format_address",
    "merge_entries",
    "model_key",
    "parse_address",
    "records_from_entries",
    "split_entries",
]

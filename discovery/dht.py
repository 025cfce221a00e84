"""The swarm's Kademlia node: kademlia's protocol and server with their faults fixed, and
`SwarmDHT`, which announces, withdraws and looks up peer records (`discovery.records`) stored as
merged entries (`discovery.entries`, `discovery.storage`), each signed by the peer it describes
(`discovery.signing`), spread over a tree of shard keys per model (`discovery.shards`).

In a private swarm (a swarm key, `common.swarm_key`) every datagram carries an HMAC-SHA256 tag
under the swarm key, and datagrams without a valid tag are dropped before they are even decoded:
a node without the key can neither read the swarm's records nor store any, nor take part in
lookups. The tag covers the whole datagram (request or reply), so records need no MAC of their own.

Concurrency: everything runs on one asyncio event loop; storage operations are synchronous, so
they never interleave. Network input (store requests, find_value replies) is validated and
malformed parts are dropped, never trusted and never allowed to raise into the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.utils import digest

from common.identity import Identity
from discovery.entries import (
    MAX_VALUE_BYTES,
    MODELS_KEY,
    Entries,
    decode_entries,
    is_departed,
    merge_entries,
    merge_entries_into,
    records_from_entries,
    split_entries,
)
from discovery.records import PeerRecord, format_address, is_int
from discovery.shards import (
    MAX_LEVEL,
    REVIEW_S,
    ROOT,
    SHARD_CAPACITY,
    child_on_path,
    children,
    level_of,
    model_shard_key,
    ranks_within,
    region_of,
    residents,
    should_descend,
)
from discovery.signing import accepted_entries, sign_entry
from discovery.storage import MODELS_DIGEST, MergingStorage

log = logging.getLogger(__name__)

DEFAULT_DHT_PORT = 8468
TOMBSTONE_MARGIN_S = 0.001
STRAGGLER_GRACE_S = 0.25  # see `_answered`; far above a loopback or LAN reply, about one WAN round trip
TAG_BYTES = 32  # HMAC-SHA256 tag appended to every datagram in a private swarm
# A crawl's k nearest nodes are reused this long by stores and reads of the same region (a model's
# shards share one, `discovery.shards`): a heartbeat or a gateway refresh then costs its stores or
# reads only, not three or more crawl rounds first. A reuse is skipped when a node in it has stopped
# answering or the routing table has changed while the crawl found fewer than k nodes.
CRAWL_REUSE_S = 30.0
READ_REPLICAS = 3  # nodes asked per key on a read; stores go to all k nearest
REVIEW_REPLICAS = 2  # nodes asked per shard when a peer reviews its place (ids and counts only)
# The `models` entry (a model exists, its block count) is re-stored this often rather than every
# heartbeat, with a lifetime of two periods: with many peers per model it was half of every
# heartbeat's bytes, for an entry that never changes.
MODELS_REFRESH_S = 60.0
VERIFIED_CACHE = 50_000  # signatures already checked, so re-reading a record costs no Ed25519 check


def datagram_tag(swarm_key: bytes, datagram: bytes) -> bytes:
    return hmac.new(swarm_key, datagram, hashlib.sha256).digest()


class _TaggingTransport:
    """The datagram transport, with the swarm key's tag appended to everything sent."""

    def __init__(self, transport: asyncio.DatagramTransport, swarm_key: bytes):
        self._transport = transport
        self._swarm_key = swarm_key

    def sendto(self, data: bytes, addr=None) -> None:
        self._transport.sendto(data + datagram_tag(self._swarm_key, data), addr)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class _SwarmProtocol(KademliaProtocol):
    """KademliaProtocol with a configurable RPC timeout, a size-safe hand-off, and no crashes on junk."""

    # A node that missed a reply is skipped by lookups for this long (unless it talks to us again):
    # other nodes keep it in their tables and hand it back in every crawl, and waiting out its
    # timeout each time made lookups and announcements slower than a record's ttl. 30 s was too
    # short: a gateway idle for longer met the killed peer's node again on its next lookup (2 s).
    # A live node that missed one reply is rehabilitated as soon as it sends us anything.
    UNRESPONSIVE_S = 300.0

    def __init__(
        self,
        source_node: Node,
        storage: MergingStorage,
        ksize: int,
        wait_timeout: float,
        swarm_key: bytes | None = None,
    ):
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = wait_timeout
        self._swarm_key = swarm_key
        self._background: set[asyncio.Future] = set()
        self._unresponsive: dict[bytes, float] = {}

    def connection_made(self, transport) -> None:
        super().connection_made(
            transport if self._swarm_key is None else _TaggingTransport(transport, self._swarm_key)
        )

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self._swarm_key is not None:
            body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
            if len(data) <= TAG_BYTES or not hmac.compare_digest(tag, datagram_tag(self._swarm_key, body)):
                # a node outside the swarm, or a corrupted datagram: no answer, no routing-table entry
                self.storage.rejected["datagram_not_member"] += 1
                return
            data = body
        super().datagram_received(data, addr)

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
        self.adopt(asyncio.ensure_future(coro))

    def adopt(self, task: asyncio.Future) -> None:
        """Keep `task` running in the background (cancelled by `shutdown`)."""
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
        and is_int(item[2])
        and 0 < item[2] <= 65535
    )


async def _answered(protocol: _SwarmProtocol, calls: list[Any]) -> list[Any]:
    """Run kademlia RPC coroutines together; once one has answered, the others get
    `STRAGGLER_GRACE_S` (or 3x the first answer's time, if longer) and those still out count as
    no reply, ``(False, None)``.

    Upstream gathers every call, so one dead node in a round of a crawl costs the whole lookup a
    full RPC timeout although the others answered in a millisecond. The calls left behind run on
    (in the protocol's background set): a late reply still refreshes its node, a timeout still
    marks it unresponsive."""
    if not calls:
        return []
    loop = asyncio.get_running_loop()
    begin = loop.time()
    tasks = [asyncio.ensure_future(call) for call in calls]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    if pending:
        grace = max(STRAGGLER_GRACE_S, 3 * (loop.time() - begin))
        _, pending = await asyncio.wait(pending, timeout=grace)
    for task in pending:
        protocol.adopt(task)
    return [
        task.result() if task.done() and not task.cancelled() and task.exception() is None else (False, None)
        for task in tasks
    ]


class _SafeNodeCrawl(NodeSpiderCrawl):
    """NodeSpiderCrawl that drops malformed contacts from replies instead of raising on them, and
    that does not wait out a dead node's timeout once the others of its round answered."""

    async def _find(self, rpcmethod):
        # upstream's round (alpha nearest uncontacted nodes, or all of them when the nearest set
        # did not change), with `_answered` instead of waiting for every call
        count = self.alpha
        if self.nearest.get_ids() == self.last_ids_crawled:
            count = len(self.nearest)
        self.last_ids_crawled = self.nearest.get_ids()
        peers = self.nearest.get_uncontacted()[:count]
        for peer in peers:
            self.nearest.mark_contacted(peer)
        results = await _answered(self.protocol, [rpcmethod(peer, self.node) for peer in peers])
        return await self._nodes_found({peer.id: result for peer, result in zip(peers, results, strict=True)})

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
    """kademlia Server that stores per-entry chunks on the k nearest nodes and reads by merging the
    answers of the nearest few (`read_values`)."""

    protocol_class = _SwarmProtocol
    READ_CONCURRENCY = 16  # bounded so many <= 48 KB replies do not overflow the 1 MB UDP receive buffer

    def __init__(
        self,
        *,
        ksize: int,
        alpha: int,
        node_id: bytes | None,
        rpc_timeout: float,
        clock: Callable[[], float],
        swarm_key: bytes | None = None,
        read_replicas: int = READ_REPLICAS,
    ):
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=MergingStorage(clock=clock))
        self.rpc_timeout = rpc_timeout
        self.swarm_key = swarm_key
        self.read_replicas = read_replicas
        self.crawl_reuse_s = CRAWL_REUSE_S
        self._crawls: dict[bytes, tuple[float, int, list[Node]]] = {}  # region -> (when, contacts, nodes)
        self._verified: dict[str, str] = {}  # signature -> entry id, for entries already accepted

    def _create_protocol(self) -> _SwarmProtocol:
        return _SwarmProtocol(self.node, self.storage, self.ksize, self.rpc_timeout, self.swarm_key)

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

    async def nearest_nodes(self, key: bytes, *, reuse: bool = True) -> list[Node]:
        """The k nodes nearest to `key`'s region (`discovery.shards.region_of`), from a crawl at most
        `CRAWL_REUSE_S` old when `reuse` and that crawl still looks right."""
        region = region_of(key)
        cached = self._crawls.get(region)
        if reuse and cached is not None and self._still_good(*cached):
            return cached[2]
        contacts = self.num_contacts()
        target = Node(region)
        nodes = await self._crawl(target, self.protocol.router.find_neighbors(target))
        if nodes:
            self._crawls[region] = (time.monotonic(), contacts, nodes)
        else:
            self._crawls.pop(region, None)
        return nodes

    def _still_good(self, when: float, contacts: int, nodes: list[Node]) -> bool:
        if time.monotonic() - when > self.crawl_reuse_s:
            return False
        if len(nodes) < self.ksize and self.num_contacts() != contacts:
            return False  # a small network that has grown (or shrunk) since: the new ones may be nearer
        return not any(self.protocol.is_unresponsive(node.id) for node in nodes)

    def forget_crawl(self, key: bytes) -> None:
        """Crawl again next time (most nodes of the last one did not answer)."""
        self._crawls.pop(region_of(key), None)

    async def store_entries(self, key: bytes, entries: Entries) -> int:
        """Store on the k nearest nodes (and here when among them); returns how many hold it."""
        chunks = split_entries(entries)
        nodes = await self.nearest_nodes(key)
        held = 0
        if self._among_nearest(Node(key), nodes):
            self.storage.merge(key, entries)
            held += 1
        results = await _answered(self.protocol, [self._store_all(node, key, chunks) for node in nodes])
        stored = sum(result is True for result in results)
        if 2 * stored < len(nodes):
            self.forget_crawl(key)
        return held + stored

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
        """Merge of this node's entries and those of the nodes nearest to `key`."""
        return (await self.read_values([key]))[key]

    async def read_values(self, keys: list[bytes], *, replicas: int | None = None) -> dict[bytes, Entries]:
        """For each of `keys` (all in one region: shards of one model), the merge of this node's
        entries and those of the `read_replicas` nodes nearest to it, read in parallel.

        Every key is asked of the same nodes (one crawl, or a recent one reused). The nearest node
        of every key is asked first, then the second nearest..., so that a read bounded by
        `READ_CONCURRENCY` has an answer for every key early (each key's stragglers get
        `_answered`'s grace from its own first answer). Replicas mostly answer with the very same
        string: it is decoded once; and an entry whose signature was already checked is not
        checked again (an Ed25519 check costs ~50-200 us, a thousand records a read)."""
        if not keys:
            return {}
        nearest = await self.nearest_nodes(keys[0])
        count = replicas or self.read_replicas
        nodes = nearest[:count]
        gate = asyncio.Semaphore(self.READ_CONCURRENCY)
        answers = await self._ask_all(keys, nodes, gate)
        # A key that none of its replicas answered in time is asked of the next nearest nodes
        # once: under load a whole shard's answers can be late, and it would vanish from the read.
        unanswered = [key for key in keys if not any(_found_value(r) is not None for r in answers[key][1])]
        spare = nearest[count : 2 * count]
        if unanswered and spare:
            for key, (asked, results) in (await self._ask_all(unanswered, spare, gate)).items():
                answers[key] = (answers[key][0] + asked, answers[key][1] + results)
        now = self.storage.clock()
        out: dict[bytes, Entries] = {}
        answered = 0
        for key in keys:
            asked, results = answers[key]
            out[key] = self._merge_answers(key, asked, results, now)
            answered += sum(1 for result in results[: len(nodes)] if isinstance(result, tuple) and result[0])
        if nodes and 2 * answered < len(nodes) * len(keys):
            self.forget_crawl(keys[0])
        return out

    async def _ask_all(
        self, keys: list[bytes], nodes: list[Node], gate: asyncio.Semaphore
    ) -> dict[bytes, tuple[list[Node], list[Any]]]:
        """`find_value` of every key on every node, the nearest node of every key first."""

        async def ask(node: Node, key: bytes) -> object:
            async with gate:
                return await self.protocol.call_find_value(node, Node(key))

        calls: dict[bytes, list[asyncio.Future]] = {key: [] for key in keys}
        for node in nodes:
            for key in keys:
                calls[key].append(asyncio.ensure_future(ask(node, key)))
        results = await asyncio.gather(*(_answered(self.protocol, calls[key]) for key in keys))
        return {key: (list(nodes), result) for key, result in zip(keys, results, strict=True)}

    def _merge_answers(self, key: bytes, nodes: list[Node], results: list[Any], now: float) -> Entries:
        merged = self.storage.entries(key)
        rejected = self.storage.rejected
        seen: set[str | bytes] = set()
        for node, result in zip(nodes, results, strict=True):
            value = _found_value(result)
            if value is None:
                continue
            if isinstance(value, str | bytes):
                if value in seen:
                    continue  # the same answer as another replica's: nothing new in it
                seen.add(value)
                if len(value) > MAX_VALUE_BYTES:
                    log.warning("ignoring an oversized DHT value (%d bytes) from %s", len(value), node)
                    rejected["oversize_value"] += 1
                    continue
            entries = decode_entries(value)
            if entries is None:
                log.warning("ignoring a malformed DHT value from %s", node)
                rejected["malformed"] += 1
                continue
            # a node's answer is network input like a store: forged entries are dropped here too
            entries = self._accepted(entries, now, any_signer=key == MODELS_DIGEST)
            merged = merge_entries(merged, entries, now)
        return merged

    def _accepted(self, entries: Entries, now: float, *, any_signer: bool) -> Entries:
        """`accepted_entries`, skipping the checks of entries accepted before (same id, same
        signature: the signature covers everything else, and the checks only get laxer with time).
        Only entries checked strictly (signer = entry id) are remembered: one accepted under the
        any-signer `models` key must not pass later as a peer's record."""
        if any_signer:
            return accepted_entries(entries, now, self.storage.rejected, any_signer=True)
        kept, unknown = {}, {}
        for entry_id, entry in entries.items():
            sig = entry.get("sig")
            if isinstance(sig, str) and self._verified.get(sig) == entry_id:
                kept[entry_id] = entry
            else:
                unknown[entry_id] = entry
        if unknown:
            fresh = accepted_entries(unknown, now, self.storage.rejected)
            if len(self._verified) + len(fresh) > VERIFIED_CACHE:
                self._verified.clear()
            for entry_id, entry in fresh.items():
                self._verified[entry["sig"]] = entry_id
            kept.update(fresh)
        return kept


def _fits(peer_id: str, here: list[str]) -> bool:
    """A shard whose residents are `here` has room for `peer_id`, or holds it already and it ranks
    among the `SHARD_CAPACITY` lowest there (a shard several peers joined at once sheds its
    highest-ranked ones)."""
    return ranks_within(peer_id, here) if peer_id in here else len(here) < SHARD_CAPACITY


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
        clock: Callable[[], float] = time.time,
        identity: Identity | None = None,
        swarm_key: bytes | None = None,
        read_replicas: int = READ_REPLICAS,
        review_s: float = REVIEW_S,
    ):
        # `clock`: the unix time records' expiry is judged by (tests pass a fake to age records)
        self.clock = clock
        # signs what this node announces; a node that only reads (a gateway, `swarm status`) may
        # leave it out and gets a throw-away one
        self.identity = identity or Identity.generate()
        self.private = swarm_key is not None
        self._server = _SwarmServer(
            ksize=ksize,
            alpha=alpha,
            node_id=node_id,
            rpc_timeout=rpc_timeout,
            clock=clock,
            swarm_key=swarm_key,
            read_replicas=read_replicas,
        )
        self._bootstrap: list[tuple[str, int]] = []
        self._family = socket.AF_INET
        self._host: str | None = None
        self._port: int | None = None
        self._rebootstrap_interval = rebootstrap_interval
        self._maintenance: asyncio.Task | None = None
        self._last_expiry: dict[tuple[str, str], float] = {}  # (model, peer_id) -> last announced expiry
        # where this node's peers sit in their model's shard tree (`discovery.shards`): (model,
        # peer_id) -> (monotonic time of the last review, shard), and every shard a record was
        # stored in -> its expiry there (a withdrawal tombstones all of those still alive)
        self.review_s = review_s
        self._places: dict[tuple[str, str], tuple[float, int]] = {}
        self._written: dict[tuple[str, str], dict[int, float]] = {}
        self.last_read: dict[str, int] = {"shards": 0, "rounds": 0}  # of the last whole-model read
        self._known_shards: dict[str, set[int]] = {}  # model -> shards read at the last read of it
        self._parsed: dict[str, PeerRecord | None] = {}  # signature -> record (`records_from_entries`)
        self._models_announced: dict[str, tuple[float, int]] = {}  # model -> (monotonic time, num_blocks)
        self.models_refresh_s = MODELS_REFRESH_S

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

    @property
    def rejected(self) -> Counter:
        """reason -> DHT entries (and, in a private swarm, datagrams) dropped by this node."""
        return self.storage.rejected

    # ---- records

    async def announce(self, record: PeerRecord) -> int:
        """Store `record` in its shard of its model and the model under `models`; returns how many
        nodes hold the record."""
        self._require_started()
        now = self.clock()
        if record.is_expired(now):
            raise ValueError(f"record of {record.peer_id} has already expired; set expires_at in the future")
        if record.peer_id != self.identity.peer_id:
            raise ValueError(
                f"record's peer_id {record.peer_id} is not this node's identity ({self.identity.peer_id}): "
                "a record can only be signed by the peer it names"
            )
        slot = (record.model, record.peer_id)
        # Noted before sending: a withdrawal must outlive even an announce cancelled half-way.
        self._last_expiry[slot] = max(self._last_expiry.get(slot, 0.0), record.expires_at)
        shard = await self._place(record.model, record.peer_id)
        written = self._written.setdefault(slot, {})
        written[shard] = max(written.get(shard, 0.0), record.expires_at)
        entry = sign_entry(self.identity, record.peer_id, record.to_dict(), now)
        held, _ = await asyncio.gather(
            self._server.store_entries(model_shard_key(record.model, shard), {record.peer_id: entry}),
            self._announce_model(record, now),
        )
        log.debug("announced %s in shard %d on %d node(s)", record.peer_id, shard, held)
        return held

    async def _announce_model(self, record: PeerRecord, now: float) -> None:
        """The `models` entry of `record.model`, at most every `MODELS_REFRESH_S` (see there)."""
        last = self._models_announced.get(record.model)
        if (
            last is not None
            and last[1] == record.num_blocks
            and time.monotonic() - last[0] < self.models_refresh_s
        ):
            return
        self._models_announced[record.model] = (time.monotonic(), record.num_blocks)
        expires_at = max(record.expires_at, now + 2 * self.models_refresh_s)
        entry = sign_entry(
            self.identity, record.model, {"num_blocks": record.num_blocks, "expires_at": expires_at}, now
        )
        await self._server.store_entries(digest(MODELS_KEY), {record.model: entry})

    async def _place(self, model: str, peer_id: str) -> int:
        """The shard `peer_id` announces in: the last one found, reviewed every `review_s`."""
        slot = (model, peer_id)
        placed = self._places.get(slot)
        if placed is not None and time.monotonic() - placed[0] < self.review_s:
            return placed[1]
        shard = await self._review_place(model, peer_id, None if placed is None else placed[1])
        if placed is not None and placed[1] != shard:
            log.info("peer %s moves from shard %d to %d of %s", peer_id[:12], placed[1], shard, model)
        self._places[slot] = (time.monotonic(), shard)
        return shard

    async def _review_place(self, model: str, peer_id: str, current: int | None) -> int:
        """Where `peer_id` belongs now. A peer below the root reads its shard and the parent only
        (one round): it climbs when the parent has room, stays while it fits, else goes down."""
        if current is None or current == ROOT:
            return await self._find_place(model, peer_id, ROOT)
        keys = [model_shard_key(model, current // 2), model_shard_key(model, current)]
        values = await self._server.read_values(keys, replicas=REVIEW_REPLICAS)
        if len(residents(values[keys[0]])) < SHARD_CAPACITY:
            return await self._find_place(model, peer_id, ROOT)  # room above: climb as far as it goes
        if _fits(peer_id, residents(values[keys[1]])):
            return current
        return await self._find_place(model, peer_id, child_on_path(current, peer_id))

    async def _find_place(self, model: str, peer_id: str, shard: int) -> int:
        """From `shard` down `peer_id`'s path (one read of one shard per level): the first shard it
        fits in (`_fits`)."""
        while level_of(shard) < MAX_LEVEL:
            key = model_shard_key(model, shard)
            here = residents((await self._server.read_values([key], replicas=REVIEW_REPLICAS))[key])
            if _fits(peer_id, here):
                return shard
            shard = child_on_path(shard, peer_id)
        return shard

    async def withdraw(self, record: PeerRecord) -> int:
        """Tombstone `record.peer_id` so it vanishes from lookups at once; returns how many nodes
        hold the tombstone in its current shard. Every shard the record was stored in and may still
        be alive in gets one (a peer that moved shards left a copy behind)."""
        self._require_started()
        slot = (record.model, record.peer_id)
        now = self.clock()
        until = max(record.expires_at, self._last_expiry.pop(slot, 0.0), now) + TOMBSTONE_MARGIN_S
        entry = {"departed": True, "expires_at": until}
        tombstone = {record.peer_id: sign_entry(self.identity, record.peer_id, entry, now)}
        placed = self._places.pop(slot, None)
        current = placed[1] if placed is not None else ROOT
        written = self._written.pop(slot, {})
        shards = [current] + sorted(s for s, expiry in written.items() if expiry > now and s != current)
        held, *_ = await asyncio.gather(
            *(self._server.store_entries(model_shard_key(record.model, s), tombstone) for s in shards)
        )
        log.info("withdrew %s from %s on %d node(s)", record.peer_id, record.model, held)
        return held

    async def peers(self, model: str) -> list[PeerRecord]:
        """Live (unexpired, not withdrawn) records for `model`, both states, sorted by span."""
        self._require_started()
        entries = await self.model_entries(model)
        if len(self._parsed) > VERIFIED_CACHE:
            self._parsed.clear()
        return records_from_entries(entries, model, self.clock(), self._parsed)

    async def model_entries(self, model: str) -> Entries:
        """Every entry of `model`'s shard tree, merged.

        The first round reads the root and every shard this node read at its last read of the
        model, all at once (a gateway refreshing every second walks the tree in one round, not one
        per level); each further round reads the children, not read yet, of every shard holding
        `DESCEND_AT` records. Re-reading the shards known from the last read also keeps in view
        the peers below a shard whose records expired together (they stay there until their next
        review)."""
        self._require_started()
        merged: Entries = {}
        read: set[int] = set()
        known: set[int] = set()
        level, rounds = {ROOT} | self._known_shards.get(model, set()), 0
        while level:
            ordered = sorted(level)
            keys = [model_shard_key(model, shard) for shard in ordered]
            values = await self._server.read_values(keys)
            rounds += 1
            read.update(ordered)
            now = self.clock()
            deeper: set[int] = set()
            for shard, key in zip(ordered, keys, strict=True):
                merge_entries_into(merged, values[key], now)
                if residents(values[key]):
                    known.add(shard)
                if should_descend(values[key]) and level_of(shard) < MAX_LEVEL:
                    deeper.update(children(shard))
            known |= deeper
            level = deeper - read
        # next time: the shards with records, and the children of the full ones
        self._known_shards[model] = known
        self.last_read = {"shards": len(read), "rounds": rounds}
        return merged

    async def models(self) -> dict[str, int]:
        """Announced model ids -> blocks in the model."""
        self._require_started()
        entries = await self._server.get_entries(digest(MODELS_KEY))
        return {
            model: entry["num_blocks"]
            for model, entry in sorted(entries.items())
            if not is_departed(entry) and is_int(entry.get("num_blocks")) and entry["num_blocks"] > 0
        }

    def _require_started(self) -> None:
        if self._port is None or self._server.transport is None or self._server.transport.is_closing():
            raise RuntimeError("SwarmDHT is not running")

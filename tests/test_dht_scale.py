"""Many peers per model: the shard tree (`discovery.shards`) on real kademlia nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from common.identity import Identity
from discovery.dht import SwarmDHT
from discovery.entries import MAX_VALUE_BYTES, encode_entries, model_key
from discovery.records import PeerRecord
from discovery.shards import (
    ROOT,
    SHARD_CAPACITY,
    child_on_path,
    children,
    level_of,
    model_base_key,
    model_shard_key,
    peer_hash,
    ranks_within,
    region_of,
    shard_key,
)

MODEL = "demo/llama-156m"


def record_for(identity: Identity, clock: float, *, ttl: float = 600.0, start: int = 0) -> PeerRecord:
    return PeerRecord(
        peer_id=identity.peer_id,
        address=f"10.0.{peer_hash(identity.peer_id) % 250}.1:50051",
        model=MODEL,
        start=start,
        end=start + 2,
        num_blocks=8,
        throughput=20.0,
        free_cache_tokens=4096,
        version="0.1.0",
        expires_at=clock + ttl,
    )


async def announce_many(nodes: list[SwarmDHT], identities: list[Identity], **fields) -> list[PeerRecord]:
    """Announce one record per identity, round robin over `nodes` (a node signs as one peer at a time)."""
    records = []
    for i, identity in enumerate(identities):
        node = nodes[i % len(nodes)]
        node.identity = identity
        record = record_for(identity, node.clock(), start=2 * (i % 4), **fields)
        await node.announce(record)
        records.append(record)
    return records


@pytest_asyncio.fixture
async def make_nodes():
    started: list[SwarmDHT] = []

    async def factory(n: int, **kwargs) -> list[SwarmDHT]:
        nodes = []
        for _ in range(n):
            dht = SwarmDHT(rpc_timeout=1.0, **kwargs)
            started.append(dht)
            await dht.start("127.0.0.1", 0, [("127.0.0.1", nodes[0].port)] if nodes else [])
            nodes.append(dht)
        return nodes

    yield factory
    for dht in started:
        dht.stop()


# --------------------------------------------------------------------------- pure parts


def test_shard_keys_are_xor_adjacent_and_the_root_is_the_old_key():
    from kademlia.utils import digest

    base = model_base_key(MODEL)
    assert base == digest(model_key(MODEL)) == model_shard_key(MODEL, ROOT)  # peers before sharding
    keys = [model_shard_key(MODEL, shard) for shard in range(1, 64)]
    assert len(set(keys)) == 63 and all(len(key) == 20 for key in keys)
    assert {key[:16] for key in keys} == {base[:16]}  # the same 128-bit prefix: the same nearest nodes
    assert {region_of(key) for key in keys} == {region_of(base)}
    assert model_shard_key("other/model", 2)[:16] != base[:16]
    for bad in (0, -1, 1 << 17):
        with pytest.raises(ValueError):
            shard_key(base, bad)


def test_tree_paths_follow_the_peer_id():
    assert [level_of(s) for s in (1, 2, 3, 4, 7, 8)] == [0, 1, 1, 2, 2, 3]
    assert children(1) == (2, 3) and children(5) == (10, 11)
    ids = [Identity.generate().peer_id for _ in range(64)]
    for peer_id in ids:
        shard = ROOT
        for _ in range(6):  # a path is fixed by the id: every step goes to a child of the last
            nxt = child_on_path(shard, peer_id)
            assert nxt in children(shard) and child_on_path(shard, peer_id) == nxt
            shard = nxt
    assert {child_on_path(1, peer_id) for peer_id in ids} == {2, 3}  # ids spread over both halves


def test_a_shard_keeps_its_lowest_ranked_peers():
    ids = sorted((Identity.generate().peer_id for _ in range(SHARD_CAPACITY + 10)), key=peer_hash)
    kept = [p for p in ids if ranks_within(p, ids)]
    assert kept == ids[:SHARD_CAPACITY]  # every reader of the same shard agrees on who moves down
    assert ranks_within(ids[-1], ids[:5])


# --------------------------------------------------------------------------- live nodes


@pytest.mark.asyncio
async def test_every_one_of_300_records_is_found_by_a_whole_model_read(make_nodes):
    nodes = await make_nodes(6)
    identities = [Identity.generate() for _ in range(300)]
    records = await announce_many(nodes[1:], identities)
    reader = nodes[0]
    found = await reader.peers(MODEL)
    assert {r.peer_id for r in found} == {r.peer_id for r in records}
    assert {r.address for r in found} == {r.address for r in records}
    # far more than one key can hold: spread over several shards, none over the value cap
    assert (
        len(encode_entries({r.peer_id: r.to_dict() for r in records})) > 2 * MAX_VALUE_BYTES
    )  # unsigned, even
    assert reader.last_read["shards"] >= 7 and reader.last_read["rounds"] >= 3
    shards_used = {shard for node in nodes[1:] for (_, shard) in node._places.values()}
    assert len(shards_used) >= 7
    for node in nodes:
        for _, value in node.storage:
            assert len(value) <= MAX_VALUE_BYTES, "a shard over the cap evicts records"
    root = model_shard_key(MODEL, ROOT)
    assert len(nodes[0].storage.entries(root)) <= SHARD_CAPACITY + 5
    # another node reads the same, and a second read reuses the first one's crawl
    crawls = 0
    original = nodes[2]._server._crawl

    async def counted(*args):
        nonlocal crawls
        crawls += 1
        return await original(*args)

    nodes[2]._server._crawl = counted
    assert {r.peer_id for r in await nodes[2].peers(MODEL)} == {r.peer_id for r in records}
    first = crawls
    assert {r.peer_id for r in await nodes[2].peers(MODEL)} == {r.peer_id for r in records}
    assert crawls == first <= 1  # not a lookup per shard, and none on the next read


@pytest.mark.asyncio
async def test_records_expire_per_shard(make_nodes, fake_clock):
    nodes = await make_nodes(4, clock=fake_clock)
    short = await announce_many(nodes[1:], [Identity.generate() for _ in range(70)], ttl=10.0)
    long = await announce_many(nodes[1:], [Identity.generate() for _ in range(70)], ttl=600.0)
    reader = nodes[0]
    assert len(await reader.peers(MODEL)) == 140
    places = {peer: shard for node in nodes[1:] for ((_, peer), (_, shard)) in node._places.items()}
    assert len({places[r.peer_id] for r in short}) >= 2  # the short-lived ones sit in several shards
    fake_clock.advance(11.0)
    assert {r.peer_id for r in await reader.peers(MODEL)} == {r.peer_id for r in long}
    for node in nodes:
        for record in short:
            assert record.peer_id not in node.storage.entries(model_shard_key(MODEL, places[record.peer_id]))


class JunkProtocol(KademliaProtocol):
    """Answers every value lookup with what `JUNK` holds for its port: not JSON, or too big."""

    JUNK: dict[int, object] = {}

    def rpc_find_value(self, sender, nodeid, key):
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return {"value": self.JUNK[self.transport.get_extra_info("sockname")[1]]}


class JunkServer(Server):
    protocol_class = JunkProtocol


@pytest.mark.asyncio
async def test_a_malformed_or_oversized_shard_value_is_ignored_without_losing_the_others(make_nodes):
    nodes = await make_nodes(4)
    records = await announce_many(nodes[1:], [Identity.generate() for _ in range(120)])
    junk_nodes = []
    try:
        for value in ["{not json", '{"pad": "' + "x" * 50_000 + '"}']:
            rogue = JunkServer()
            await rogue.listen(0, "127.0.0.1")
            JunkProtocol.JUNK[rogue.transport.get_extra_info("sockname")[1]] = value
            await rogue.bootstrap([("127.0.0.1", nodes[0].port)])
            junk_nodes.append(rogue)
        reader = SwarmDHT(rpc_timeout=1.0, read_replicas=20)  # asks every node, the junk ones too
        await reader.start(
            "127.0.0.1", 0, [("127.0.0.1", junk_nodes[0].transport.get_extra_info("sockname")[1])]
        )
        try:
            await asyncio.sleep(0.1)
            found = await reader.peers(MODEL)
            assert {r.peer_id for r in found} == {r.peer_id for r in records}
            assert reader.rejected["malformed"] >= reader.last_read["shards"]
            assert reader.rejected["oversize_value"] >= reader.last_read["shards"]
        finally:
            reader.stop()
    finally:
        for rogue in junk_nodes:
            rogue.stop()


@pytest.mark.asyncio
async def test_a_peer_that_moved_shards_is_withdrawn_from_both(make_nodes):
    nodes = await make_nodes(3)
    await announce_many(nodes[1:], [Identity.generate() for _ in range(SHARD_CAPACITY)])  # a full root
    mover = nodes[1]
    mover.identity = identity = Identity.generate()
    record = record_for(identity, time.time())
    await mover.announce(record)
    first = mover._places[(MODEL, identity.peer_id)][1]
    # as if its next review found another place: it announces there, its first copy lives on
    other = child_on_path(first, identity.peer_id)
    mover._places[(MODEL, identity.peer_id)] = (time.monotonic(), other)
    await mover.announce(record.with_expiry(time.time() + 600))
    assert identity.peer_id in {r.peer_id for r in await nodes[0].peers(MODEL)}
    await mover.withdraw(record)
    assert identity.peer_id not in {r.peer_id for r in await nodes[0].peers(MODEL)}
    for shard in (first, other):
        held = nodes[0].storage.entries(model_shard_key(MODEL, shard)).get(identity.peer_id)
        assert held is None or held.get("departed") is True

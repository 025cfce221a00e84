"""discovery: records, the merging storage, and real kademlia nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.utils import digest

from common.identity import Identity
from discovery.announcer import Announcer
from discovery.dht import SwarmDHT
from discovery.entries import (
    MAX_STORE_BYTES,
    MAX_VALUE_BYTES,
    MODELS_KEY,
    decode_entries,
    encode_entries,
    merge_entries,
    model_key,
    split_entries,
)
from discovery.records import PeerRecord, parse_address
from discovery.signing import sign_entry
from discovery.storage import MergingStorage
from tests.conftest import wait_until, wait_until_async

REPO = Path(__file__).resolve().parents[1]
MODEL = "demo/llama-156m"


class IdentityBook:
    """Test peers by name: each name gets its own key, hence its own peer id (`common.identity`)."""

    def __init__(self):
        self._by_name: dict[str, Identity] = {}
        self._names: dict[str, str] = {}

    def identity(self, name: str) -> Identity:
        if name not in self._by_name:
            self._by_name[name] = identity = Identity.generate()
            self._names[identity.peer_id] = name
        return self._by_name[name]

    def __getitem__(self, name: str) -> str:
        return self.identity(name).peer_id

    def name(self, peer_id: str) -> str:
        return self._names.get(peer_id, peer_id)

    def names(self, records) -> list[str]:
        """Names of `records` (or of entry ids), sorted: derived ids do not sort like the names."""
        return sorted(self.name(getattr(r, "peer_id", r)) for r in records)


PEERS = IdentityBook()


def signed(name: str, entry: dict, now: float | None = None) -> dict:
    """`entry` signed by the peer called `name`, under its own peer id."""
    return {
        PEERS[name]: sign_entry(PEERS.identity(name), PEERS[name], entry, time.time() if now is None else now)
    }


def as_peer(node: SwarmDHT, name: str) -> SwarmDHT:
    """`node`, now announcing as the peer called `name` (a node signs with one identity at a time)."""
    node.identity = PEERS.identity(name)
    return node


async def announce(node: SwarmDHT, record: PeerRecord) -> int:
    node.identity = PEERS.identity(PEERS.name(record.peer_id))
    return await node.announce(record)


def make_record(name: str, *, start: int = 0, end: int = 4, ttl: float = 30.0, **fields) -> PeerRecord:
    values = {
        "peer_id": PEERS[name],
        "address": "127.0.0.1:50051",
        "model": MODEL,
        "start": start,
        "end": end,
        "num_blocks": 8,
        "dtype": "float32",
        "quant": "none",
        "throughput": 25.5,
        "free_cache_tokens": 4096,
        "live_sessions": 0,
        "state": "online",
        "version": "0.1.0",
        "expires_at": time.time() + ttl,
    }
    values.update(fields)
    return PeerRecord(**values)


@pytest_asyncio.fixture
async def make_nodes():
    """make_nodes(n, bootstrap=None): n nodes; the first is the bootstrap of the others unless given."""
    started: list[SwarmDHT] = []

    async def factory(n: int, bootstrap: list[tuple[str, int]] | None = None, **kwargs) -> list[SwarmDHT]:
        nodes = []
        for _ in range(n):
            dht = SwarmDHT(rpc_timeout=1.0, **kwargs)
            started.append(dht)
            boot = bootstrap if bootstrap is not None else [("127.0.0.1", nodes[0].port)] if nodes else []
            await dht.start("127.0.0.1", 0, boot)
            nodes.append(dht)
        return nodes

    yield factory
    for dht in started:
        dht.stop()


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:8468", ("127.0.0.1", 8468)), ("peer-a:1", ("peer-a", 1)), ("[::1]:65535", ("::1", 65535))],
)
def test_parse_address_accepts(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "host", ":80", "host:", "host:abc", "host:0", "host:70000", "::1:80", 80]
)
def test_parse_address_rejects(text):
    with pytest.raises(ValueError):
        parse_address(text)


def test_record_round_trip_and_validation():
    record = make_record("peer-a")
    assert PeerRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert PeerRecord.from_dict({**record.to_dict(), "future_field": 1}) == record
    assert isinstance(PeerRecord.from_dict({**record.to_dict(), "throughput": 3}).throughput, float)
    bad = [
        "not a dict",
        {k: v for k, v in record.to_dict().items() if k != "address"},
        {**record.to_dict(), "start": "0"},
        {**record.to_dict(), "start": True},
        {**record.to_dict(), "start": 4, "end": 4},
        {**record.to_dict(), "end": 9},
        {**record.to_dict(), "state": "sleeping"},
        {**record.to_dict(), "throughput": float("nan")},
        {**record.to_dict(), "free_cache_tokens": -1},
        {**record.to_dict(), "address": "nowhere"},
        {**record.to_dict(), "peer_id": "x" * 500},
    ]
    for data in bad:
        with pytest.raises(ValueError):
            PeerRecord.from_dict(data)
    assert record.is_expired(record.expires_at) and not record.is_expired(record.expires_at - 1)


def test_storage_merges_per_entry(fake_clock):
    storage = MergingStorage(clock=fake_clock)
    key = digest(model_key(MODEL))
    now = fake_clock()
    a, b = make_record("a"), make_record("b", start=4, end=8)
    storage[key] = encode_entries(signed("a", a.to_dict(), now))
    storage[key] = encode_entries(signed("b", b.to_dict(), now)).encode()  # bytes values are accepted too
    assert PEERS.names(decode_entries(storage[key])) == ["a", "b"]

    older = a.to_dict() | {"free_cache_tokens": 1, "expires_at": a.expires_at - 5}
    storage[key] = encode_entries(signed("a", older, now - 1))
    assert decode_entries(storage[key])[PEERS["a"]]["free_cache_tokens"] == 4096  # older loses
    newer = a.to_dict() | {"free_cache_tokens": 7, "expires_at": a.expires_at + 5}
    storage[key] = encode_entries(signed("a", newer, now + 1))
    assert decode_entries(storage[key])[PEERS["a"]]["free_cache_tokens"] == 7

    for junk in [
        "not json",
        b"\xff\xfe",
        42,
        "[1, 2]",
        '{"c": 5}',
        '{"c": {"expires_at": "soon"}}',
        '{"c": {}}',
    ]:
        storage[key] = junk  # ignored, never raised
    assert PEERS.names(decode_entries(storage[key])) == ["a", "b"]

    tombstone = signed("b", {"departed": True, "expires_at": b.expires_at + 1}, now + 1)
    storage[key] = encode_entries(tombstone)
    storage[key] = encode_entries(signed("b", b.to_dict(), now))  # a stale copy cannot resurrect it
    entries = decode_entries(storage[key])
    assert entries[PEERS["b"]] == tombstone[PEERS["b"]]

    storage[key] = encode_entries(signed("x", {"expires_at": now + 0.2}, now))
    assert PEERS["x"] in decode_entries(storage.get(key))
    fake_clock.advance(0.25)
    assert PEERS["x"] not in decode_entries(storage.get(key))
    assert dict(storage)[key] == storage[key]


def test_storage_drops_key_when_every_entry_expired(fake_clock):
    storage = MergingStorage(clock=fake_clock)
    storage[b"k" * 20] = encode_entries(signed("x", {"expires_at": fake_clock() + 0.1}, fake_clock()))
    fake_clock.advance(0.15)
    assert storage.get(b"k" * 20) is None and list(storage) == []
    with pytest.raises(KeyError):
        storage[b"k" * 20]


def test_merge_tie_prefers_tombstone():
    t = time.time() + 10
    merged = merge_entries(
        {"a": {"expires_at": t, "x": 1}}, {"a": {"expires_at": t, "departed": True}}, time.time()
    )
    assert merged["a"]["departed"] is True


def test_storage_caps_value_size_evicting_soonest_expiry():
    storage = MergingStorage()
    now = time.time()
    for i in range(400):  # ~400 records of ~500 bytes is far over the cap
        storage[b"m" * 20] = encode_entries(
            signed(f"peer-{i:03d}", make_record(f"peer-{i:03d}", ttl=10 + i).to_dict())
        )
    value = storage[b"m" * 20]
    assert len(value) <= MAX_VALUE_BYTES
    kept = decode_entries(value)
    assert PEERS["peer-399"] in kept and PEERS["peer-000"] not in kept
    assert min(e["expires_at"] for e in kept.values()) > now + 10 + 400 - len(kept) - 1


def test_thirty_records_split_under_store_limit():
    entries = {}
    for i in range(30):
        entries |= signed(f"peer-{i:02d}", make_record(f"peer-{i:02d}").to_dict())
    assert len(encode_entries(entries)) > MAX_STORE_BYTES  # too big for one store call...
    chunks = split_entries(entries)
    assert all(len(chunk) <= MAX_STORE_BYTES for chunk in chunks)  # ...so it is split
    rebuilt: dict = {}
    for chunk in chunks:
        rebuilt.update(json.loads(chunk))
    assert rebuilt == entries
    assert len(encode_entries(entries)) < MAX_VALUE_BYTES


def test_announcer_rejects_ttl_not_above_heartbeat():
    with pytest.raises(ValueError):
        Announcer(None, lambda: None, heartbeat=2.0, ttl=2.0)


# --------------------------------------------------------------------------- live nodes


@pytest.mark.asyncio
async def test_port_zero_reports_bound_port(make_nodes):
    (dht,) = await make_nodes(1)
    assert dht.port > 0 and dht.address == f"127.0.0.1:{dht.port}"
    assert await announce(dht, make_record("solo")) == 1  # a lone node keeps its own record
    assert PEERS.names(await dht.peers(MODEL)) == ["solo"]


@pytest.mark.asyncio
async def test_two_peers_same_span_via_different_nodes_visible_from_third(make_nodes):
    boot, n1, n2, n3 = await make_nodes(4)
    await asyncio.gather(announce(n1, make_record("peer-a")), announce(n2, make_record("peer-b")))
    records = await n3.peers(MODEL)
    assert PEERS.names(records) == ["peer-a", "peer-b"]
    assert all((r.start, r.end) == (0, 4) for r in records)
    assert await boot.peers(MODEL) == records


@pytest.mark.asyncio
async def test_read_merges_values_that_differ_between_nodes(make_nodes):
    boot, n1, n2, reader = await make_nodes(4)
    key = digest(model_key(MODEL))
    # As if each store reached only one node: kademlia's get would return one of the two.
    n1.storage[key] = encode_entries(signed("peer-a", make_record("peer-a").to_dict()))
    n2.storage[key] = encode_entries(signed("peer-b", make_record("peer-b", start=4, end=8).to_dict()))
    assert PEERS.names(await reader.peers(MODEL)) == ["peer-a", "peer-b"]
    # a tombstone held by one node hides the record held by another
    n2.storage[key] = encode_entries(signed("peer-a", {"departed": True, "expires_at": time.time() + 60}))
    assert PEERS.names(await reader.peers(MODEL)) == ["peer-b"]


@pytest.mark.asyncio
async def test_expired_record_disappears(make_nodes, fake_clock):
    boot, n1, reader = await make_nodes(3, clock=fake_clock)  # records age only when the test says so
    announcer = Announcer(
        as_peer(n1, "short-lived"), lambda: make_record("short-lived"), heartbeat=0.3, ttl=1.0
    )
    first = await announcer.start()
    fake_clock.advance(0.9)
    # the heartbeat (every 0.3 s of real time) re-announces with a later expiry...
    assert await wait_until_async(lambda: announcer.last_record is not first, 5), "no heartbeat"
    fake_clock.advance(0.9)  # ...so the record outlives one ttl past the first announce
    assert PEERS.names(await reader.peers(MODEL)) == ["short-lived"]
    await announcer.stop(withdraw=False)  # e.g. the peer crashed
    fake_clock.advance(1.1)  # past the last announce's expiry
    assert await reader.peers(MODEL) == []
    for node in (boot, n1, reader):
        assert node.storage.get(digest(model_key(MODEL))) is None


@pytest.mark.asyncio
async def test_withdrawn_record_disappears_at_once(make_nodes):
    boot, n1, n2, reader = await make_nodes(4)
    announcer = Announcer(as_peer(n1, "leaving"), lambda: make_record("leaving"), heartbeat=5.0)
    await announcer.start()
    await announce(n2, make_record("staying"))
    stale = n1.storage.entries(digest(model_key(MODEL)))[PEERS["leaving"]]
    assert PEERS.names(await reader.peers(MODEL)) == ["leaving", "staying"]
    await announcer.stop(withdraw=True)
    assert PEERS.names(await reader.peers(MODEL)) == ["staying"]
    # a late copy of the old signed record (a replay) does not bring it back
    n2.storage[digest(model_key(MODEL))] = encode_entries({PEERS["leaving"]: stale})
    assert PEERS.names(await reader.peers(MODEL)) == ["staying"]
    with pytest.raises(RuntimeError):
        await announcer.announce_now()


@pytest.mark.asyncio
async def test_reannounce_updates_fields_without_duplicating(make_nodes):
    boot, n1, reader = await make_nodes(3)
    state = {"free": 4096, "state": "online"}
    announcer = Announcer(
        as_peer(n1, "p"),
        lambda: make_record("p", free_cache_tokens=state["free"], state=state["state"]),
        heartbeat=5.0,
    )
    await announcer.start()
    (record,) = await reader.peers(MODEL)
    assert record.free_cache_tokens == 4096
    state.update(free=1024, state="draining")
    await announcer.announce_now()
    (record,) = await reader.peers(MODEL)
    assert (record.free_cache_tokens, record.state) == (1024, "draining")
    await announcer.stop(withdraw=False)


@pytest.mark.asyncio
async def test_models_lists_model_with_num_blocks(make_nodes):
    boot, n1, n2 = await make_nodes(3)
    await announce(n1, make_record("a"))
    await announce(n1, make_record("b", model="other/model", num_blocks=32, start=0, end=16))
    assert await n2.models() == {MODEL: 8, "other/model": 32}
    assert PEERS.names(await n2.peers("other/model")) == ["b"]
    assert await n2.peers("unknown/model") == []


class RogueProtocol(KademliaProtocol):
    """Answers every lookup with junk."""

    def rpc_find_node(self, sender, nodeid, key):
        super().rpc_find_node(sender, nodeid, key)
        return [["junk"], 5, [b"short", "127.0.0.1", 1]]

    def rpc_find_value(self, sender, nodeid, key):
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return {"value": '{"evil": {"expires_at": 9e12, "peer_id": "evil", "start": "zero"}}'}


class RogueServer(Server):
    protocol_class = RogueProtocol


@pytest.mark.asyncio
async def test_malformed_network_input_is_ignored(make_nodes):
    boot, n1, target, reader = await make_nodes(4)
    rogue = RogueServer()
    await rogue.listen(0, "127.0.0.1")
    try:
        rogue_port = rogue.transport.get_extra_info("sockname")[1]
        await rogue.bootstrap([("127.0.0.1", boot.port)])
        await announce(n1, make_record("good"))
        key = digest(model_key(MODEL))
        node = Node(target._server.node.id, "127.0.0.1", target.port)
        junk_values = ["not json", "[1,2]", '{"p": 5}', '{"p": {"expires_at": "x"}}', 7, b"\xff", ["list"]]
        for value in junk_values:
            await n1._server.protocol.call_store(node, key, value)
        n1._server.protocol.store(("127.0.0.1", target.port), b"bad-id", key)  # wrong arity: no reply
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in [b"\x00" * 5, b"\x00" + b"x" * 40, b"\x07" * 30]:
                sock.sendto(datagram, ("127.0.0.1", target.port))
        # a reply to a ping sent after the junk: the target has handled everything that came before
        ok, _ = await n1._server.protocol.call_ping(node)
        assert ok
        assert PEERS.names(await target.peers(MODEL)) == ["good"]
        assert PEERS.names(decode_entries(target.storage[key])) == ["good"]
        # the reader crawls past the rogue's junk contacts and junk value
        assert PEERS.names(await reader.peers(MODEL)) == ["good"]
        assert await reader.models() == {MODEL: 8}
        fresh = SwarmDHT(rpc_timeout=1.0)
        try:
            await fresh.start("127.0.0.1", 0, [("127.0.0.1", rogue_port)])  # junk during bootstrap
            assert fresh.num_contacts >= 1
        finally:
            fresh.stop()
    finally:
        rogue.stop()


@pytest.mark.asyncio
async def test_thirty_peers_stay_under_size_limits(make_nodes):
    nodes = await make_nodes(4)
    records = [make_record(f"peer-{i:02d}", start=(i % 4) * 2, end=(i % 4) * 2 + 2) for i in range(30)]
    for i, record in enumerate(records):  # one at a time: a node signs as one peer at a time
        await announce(nodes[i % 4], record)
    assert len(await nodes[0].peers(MODEL)) == 30
    key = digest(model_key(MODEL))
    for node in nodes:
        assert len(node.storage[key]) <= MAX_VALUE_BYTES and len(decode_entries(node.storage[key])) == 30
    # A node joining later receives the merged value in chunks under rpcudp's 8 KB request limit.
    (late,) = await make_nodes(1, bootstrap=[("127.0.0.1", nodes[0].port)])

    async def handed_off():
        return len(late.storage.entries(key)) == 30

    assert await wait_until_async(handed_off, 3.0)
    assert len(await late.peers(MODEL)) == 30


@pytest.mark.asyncio
async def test_isolated_node_rebootstraps_when_bootstrap_appears(make_nodes):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (early,) = await make_nodes(1, bootstrap=[("127.0.0.1", port)], rebootstrap_interval=0.2)
    assert early.num_contacts == 0
    await announce(early, make_record("early"))  # kept locally meanwhile
    boot = SwarmDHT(rpc_timeout=1.0)
    await boot.start("127.0.0.1", port, [])
    try:

        async def joined():
            return early.num_contacts > 0

        assert await wait_until_async(joined, 3.0)
        assert PEERS.names(await boot.peers(MODEL)) == ["early"]
    finally:
        boot.stop()


# --------------------------------------------------------------------------- separate process


@pytest.fixture
def dht_process(tmp_path):
    """A bootstrap node in its own process (`python -m discovery.node`), always terminated."""
    log_path = tmp_path / "dht_node.log"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "discovery.node", "--host", "127.0.0.1", "--port", "0"],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )

    def ready():  # the ready line, or True once the process has exited without one
        found = re.search(r"DHT node ready on 127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
        return found or proc.poll() is not None

    try:
        match = wait_until(ready, 15, interval=0.05)
        if not isinstance(match, re.Match) or proc.poll() is not None:
            raise RuntimeError(f"dht_node did not start:\n{log_path.read_text(errors='replace')}")
        yield proc, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.asyncio
async def test_bootstrap_node_in_separate_process(dht_process, make_nodes):
    proc, port = dht_process
    announcer_node, reader = await make_nodes(2, bootstrap=[("localhost", port)])  # names are resolved
    await announce(announcer_node, make_record("peer-a"))
    await announce(announcer_node, make_record("peer-b", start=4, end=8))
    assert PEERS.names(await reader.peers(MODEL)) == ["peer-a", "peer-b"]
    assert await reader.models() == {MODEL: 8}
    # the remote node holds the merged value itself
    protocol, me = reader._server.protocol, reader._server.node.id
    ok, reply = await protocol.find_value(("127.0.0.1", port), me, digest(model_key(MODEL)))
    assert ok and PEERS.names(decode_entries(reply["value"])) == ["peer-a", "peer-b"]
    ok, reply = await protocol.find_value(("127.0.0.1", port), me, digest(MODELS_KEY))
    assert ok and MODEL in decode_entries(reply["value"])
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 5) == 0

"""Swarm security (docs/security.md): signed DHT records, the swarm key, mutual TLS.

Unit tests feed forged, replayed, unsigned and oversize entries to the storage; live tests use
real kademlia nodes; the slow one runs a private swarm over mutual TLS as separate processes.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import grpc
import pytest
from kademlia.utils import digest
from prometheus_client import CollectorRegistry, generate_latest

from common.grpc_security import ClientSecurity, MemberCheck, TlsFiles
from common.identity import Identity, identity_in_use, peer_id_of
from common.peer_client import ChannelPool, PeerError, peer_info
from common.pki import make_swarm_pki
from common.security_metrics import SecurityCollector
from common.swarm_key import check_member, create_swarm_key, load_swarm_key, member_metadata
from discovery.dht import SwarmDHT
from discovery.entries import decode_entries, encode_entries, model_key
from discovery.records import PeerRecord
from discovery.signing import MAX_CLOCK_SKEW_S, MAX_LIFETIME_S, entry_problem, sign_entry
from discovery.storage import MergingStorage
from tests.conftest import DEMO_MODEL_NAME, wait_until

MODEL = "m"
KEY = digest(model_key(MODEL))


def record_of(identity: Identity, address: str = "127.0.0.1:5000", ttl: float = 30.0, **fields) -> PeerRecord:
    return PeerRecord(peer_id=identity.peer_id, address=address, model=MODEL, start=0, end=2, num_blocks=4,
                      expires_at=time.time() + ttl, **fields)  # fmt: skip


def signed(identity: Identity, entry: dict, now: float, entry_id: str | None = None) -> dict:
    entry_id = entry_id or identity.peer_id
    return {entry_id: sign_entry(identity, entry_id, entry, now)}


# --------------------------------------------------------------------------- identity and keys


def test_identity_file_keeps_the_id_and_is_locked(tmp_path):
    path = tmp_path / "id" / "peer.key"
    first = Identity.load_or_create(path, lock=False)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Identity.load_or_create(path, lock=False).peer_id == first.peer_id == peer_id_of(first.public_key)
    held = Identity.load_or_create(path)
    assert identity_in_use(path)
    with pytest.raises(ValueError, match="in use"):
        Identity.load_or_create(path)
    del held
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(ValueError, match="PEM"):
        Identity.load_or_create(tmp_path / "junk.key")


def test_swarm_key_file_and_grpc_credential(tmp_path, monkeypatch):
    path = create_swarm_key(tmp_path / "swarm.key")
    key = load_swarm_key(path)
    assert len(key) == 32 and load_swarm_key(None) is None
    monkeypatch.setenv("SWARM_KEY_FILE", str(path))
    assert load_swarm_key(None) == key
    (tmp_path / "short.key").write_text("abcd")
    for bad in (tmp_path / "short.key", tmp_path / "missing.key"):
        with pytest.raises(ValueError):
            load_swarm_key(bad)
    ((_, value),) = member_metadata(key, "pub", "/swarm.Peer/Info")
    assert check_member(key, value, "/swarm.Peer/Info") == ("pub", "")
    assert check_member(key, value, "/swarm.Peer/Inference")[1] == "bad_mac"  # bound to the method
    assert check_member(b"x" * 32, value, "/swarm.Peer/Info")[1] == "bad_mac"
    assert check_member(key, None, "/swarm.Peer/Info")[1] == "missing"
    assert check_member(key, "a,b", "/swarm.Peer/Info")[1] == "malformed"
    ((_, old),) = member_metadata(key, "pub", "/swarm.Peer/Info", now=time.time() - 3600)
    assert check_member(key, old, "/swarm.Peer/Info")[1] == "stale"


def test_swarm_up_private_creates_a_key_and_says_which_mode(tmp_path):
    from types import SimpleNamespace

    from swarm.launcher import swarm_key_for, swarm_mode_line

    def args(**kw):
        return SimpleNamespace(**{"private": False, "swarm_key_file": None, **kw})

    assert swarm_key_for(args(), tmp_path) is None
    made = swarm_key_for(args(private=True), tmp_path)
    assert made == tmp_path / "swarm.key" and len(load_swarm_key(made)) == 32
    named = swarm_key_for(args(private=True, swarm_key_file=str(tmp_path / "k" / "team.key")), tmp_path)
    assert load_swarm_key(named) != load_swarm_key(made)
    assert swarm_key_for(args(swarm_key_file=str(named)), tmp_path) == named  # reused, not replaced
    (tmp_path / "bad.key").write_text("nope")
    with pytest.raises(ValueError):
        swarm_key_for(args(swarm_key_file=str(tmp_path / "bad.key")), tmp_path)
    assert swarm_mode_line(None, "127.0.0.1").startswith("open swarm")
    assert swarm_mode_line(made, "127.0.0.1").startswith("private swarm")
    assert "BEYOND LOOPBACK on 0.0.0.0" in swarm_mode_line(None, "0.0.0.0")


# --------------------------------------------------------------------------- storage and readers


def test_storage_drops_forged_replayed_unsigned_and_oversize_entries(fake_clock):
    storage = MergingStorage(clock=fake_clock)
    now = fake_clock()
    owner, attacker = Identity.generate(), Identity.generate()
    genuine = record_of(owner).to_dict()
    storage[KEY] = encode_entries(signed(owner, genuine, now))
    assert storage.rejected == {}

    def held() -> dict:
        return decode_entries(storage[KEY])[owner.peer_id]

    # a record in the owner's name with the attacker's address, signed by the attacker
    forged = genuine | {"address": "10.6.6.6:5000"}
    storage[KEY] = encode_entries({owner.peer_id: sign_entry(attacker, owner.peer_id, forged, now + 1)})
    # the owner's own signature, with the address changed afterwards
    tampered = sign_entry(owner, owner.peer_id, genuine, now + 1) | {"address": "10.6.6.6:5000"}
    storage[KEY] = encode_entries({owner.peer_id: tampered})
    # a tombstone for the owner's id, an hour ahead, signed by the attacker
    tombstone = {"departed": True, "expires_at": now + 3000}
    storage[KEY] = encode_entries({owner.peer_id: sign_entry(attacker, owner.peer_id, tombstone, now + 1)})
    # the same tombstone without any signature, and one with a signature on another entry id
    storage[KEY] = encode_entries({owner.peer_id: tombstone})
    storage[KEY] = encode_entries(
        {owner.peer_id: sign_entry(owner, "other-id", genuine, now + 1)}
    )  # copied from another slot
    assert held()["address"] == "127.0.0.1:5000" and not held().get("departed")
    assert storage.rejected == {"wrong_signer": 2, "bad_signature": 2, "unsigned": 1}

    # replays: an older signed copy, a record signed in the future, one that claims to live for days
    newer = signed(owner, genuine | {"free_cache_tokens": 7}, now + 2)
    storage[KEY] = encode_entries(newer)
    storage[KEY] = encode_entries(signed(owner, genuine | {"free_cache_tokens": 1}, now + 1))
    assert held()["free_cache_tokens"] == 7
    future = genuine | {"expires_at": now + 2 * MAX_CLOCK_SKEW_S + 30}
    storage[KEY] = encode_entries(signed(owner, future, now + 2 * MAX_CLOCK_SKEW_S))
    storage[KEY] = encode_entries(signed(owner, genuine | {"expires_at": now + 2 * MAX_LIFETIME_S}, now + 3))
    assert held()["free_cache_tokens"] == 7
    oversize = signed(attacker, {"expires_at": now + 10, "pad": "x" * 4000}, now)
    storage[KEY] = encode_entries(oversize)
    assert attacker.peer_id not in decode_entries(storage[KEY])
    assert storage.rejected["replayed"] == 1
    assert storage.rejected["future_timestamp"] == 1
    assert storage.rejected["lifetime"] == 1
    assert storage.rejected["oversize"] == 1

    # the owner's own tombstone works, and hides every record it signed before
    withdrawal = signed(owner, {"departed": True, "expires_at": now + 40}, now + 4)
    storage[KEY] = encode_entries(withdrawal)
    storage[KEY] = encode_entries(newer)  # replayed after the withdrawal
    assert held()["departed"] is True


def test_entry_problem_never_raises_on_junk():
    now = time.time()
    for entry in [
        {"expires_at": now + 1, "public_key": 5, "sig": "x", "signed_at": now},
        {"expires_at": now + 1, "public_key": "!!", "sig": "x", "signed_at": now},
        {"expires_at": now + 1, "public_key": "AA", "sig": "AA", "signed_at": float("nan")},
        {"expires_at": now + 1, "public_key": "AA", "sig": "AA", "signed_at": now, "x": float("inf")},
    ]:
        assert entry_problem("id", entry, now) is not None


@pytest.mark.asyncio
async def test_readers_ignore_forged_records_served_by_a_dht_node():
    """A node that serves forged entries (as a malicious node would) cannot hide, move or
    impersonate a peer for a reader that merges its answer."""
    nodes: list[SwarmDHT] = []
    try:
        for _ in range(3):
            node = SwarmDHT(rpc_timeout=1.0)
            await node.start("127.0.0.1", 0, [("127.0.0.1", nodes[0].port)] if nodes else [])
            nodes.append(node)
        boot, owner_node, reader = nodes
        owner, attacker = owner_node.identity, Identity.generate()
        await owner_node.announce(record_of(owner))
        now = time.time()
        forged = record_of(owner, address="10.6.6.6:5000").to_dict()
        served = {
            owner.peer_id: sign_entry(
                attacker, owner.peer_id, {"departed": True, "expires_at": now + 3000}, now + 1
            ),
            "f" * 32: sign_entry(attacker, "f" * 32, forged | {"peer_id": "f" * 32}, now),  # not its id
        }
        boot.storage.data[KEY] = (time.monotonic(), served)  # bypasses boot's own checks, as a liar would
        before = sum(reader.rejected.values())
        (record,) = await reader.peers(MODEL)
        assert (record.peer_id, record.address) == (owner.peer_id, "127.0.0.1:5000")
        assert sum(reader.rejected.values()) - before == 2
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.asyncio
async def test_private_dht_admits_only_nodes_with_the_swarm_key():
    key = bytes(range(32))
    nodes: list[SwarmDHT] = []

    async def start(swarm_key, bootstrap):
        node = SwarmDHT(rpc_timeout=0.5, swarm_key=swarm_key)
        nodes.append(node)
        await node.start("127.0.0.1", 0, bootstrap)
        return node

    try:
        boot = await start(key, [])
        member = await start(key, [("127.0.0.1", boot.port)])
        outsider = await start(None, [("127.0.0.1", boot.port)])
        wrong = await start(b"\x01" * 32, [("127.0.0.1", boot.port)])
        await member.announce(record_of(member.identity))
        await outsider.announce(record_of(outsider.identity))  # kept only in its own storage
        await wrong.announce(record_of(wrong.identity))
        assert [r.peer_id for r in await boot.peers(MODEL)] == [member.identity.peer_id]
        assert outsider.num_contacts == 0 and wrong.num_contacts == 0
        assert [r.peer_id for r in await outsider.peers(MODEL)] == [
            outsider.identity.peer_id
        ]  # sees only itself
        assert boot.rejected["datagram_not_member"] >= 2
        registry = CollectorRegistry()
        registry.register(SecurityCollector(lambda: boot.rejected))
        exposition = generate_latest(registry).decode()
        assert 'swarm_dht_rejected_entries_total{reason="datagram_not_member"}' in exposition
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.asyncio
async def test_member_check_refuses_calls_without_the_credential():
    """The interceptor alone, in front of a real gRPC server of the Peer service."""
    from protos import swarm_pb2, swarm_pb2_grpc

    class Servicer(swarm_pb2_grpc.PeerServicer):
        async def Info(self, request, context):
            return swarm_pb2.InfoResponse(peer_id="p")

    key = bytes(32)
    check = MemberCheck(key)
    server = grpc.aio.server(interceptors=[check])
    swarm_pb2_grpc.add_PeerServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        member = ChannelPool(ClientSecurity(swarm_key=key, public_key="me"))
        outsider, wrong = ChannelPool(), ChannelPool(ClientSecurity(swarm_key=b"\x01" * 32, public_key="me"))
        assert (await peer_info(member, address)).peer_id == "p"
        for pool in (outsider, wrong):
            with pytest.raises(PeerError) as failed:
                await peer_info(pool, address)
            assert failed.value.code == grpc.StatusCode.UNAUTHENTICATED
        # a captured credential cannot be replayed
        stub = member.stub(address)
        metadata = member.metadata("/swarm.Peer/Info")
        await stub.Info(swarm_pb2.InfoRequest(), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as replayed:
            await stub.Info(swarm_pb2.InfoRequest(), metadata=metadata)
        assert replayed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert check.rejected == {"missing": 1, "bad_mac": 1, "replayed": 1}
        for pool in (member, outsider, wrong):
            await pool.close()
    finally:
        await server.stop(0)


# --------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def private_tls_swarm(demo_model, tmp_path_factory):
    """The demo model on a private swarm (swarm key) over mutual TLS: DHT, two peers, a gateway
    (pushing hidden states peer to peer, the default)."""
    from swarm.launcher import LocalSwarm
    from tests.conftest import HEARTBEAT, TTL

    workdir = tmp_path_factory.mktemp("private-swarm")
    pki = make_swarm_pki(workdir / "pki")
    key_file = create_swarm_key(workdir / "swarm.key")
    local = LocalSwarm(demo_model, workdir=workdir, heartbeat=HEARTBEAT, ttl=TTL, model_name=DEMO_MODEL_NAME,
                       swarm_key_file=key_file)  # fmt: skip
    tls = {
        role: [
            "--tls-cert",
            str(pki[f"{role}_cert"]),
            "--tls-key",
            str(pki[f"{role}_key"]),
            "--tls-ca",
            str(pki["ca"]),
        ]
        for role in ("peer", "gateway")
    }
    try:
        local.start_dht()
        # a peer with the certificates but without the swarm key, started with the members so that
        # their start-ups overlap
        outsider = local.spawn_peer(
            0, 2, "--threads", "1", *tls["peer"], "--swarm-key-file", "", name="peer-outsider"
        )
        peers = local.start_peers([(0, 2), (2, 4)], "--threads", "1", *tls["peer"])
        https = ["--https-cert", str(pki["gateway_cert"]), "--https-key", str(pki["gateway_key"])]
        gateway = local.start_gateway(None, *tls["gateway"], *https, name="gateway-private")
        outsider.address = outsider.wait_for_line("PEER_READY", 120)
        yield peers, outsider, gateway, pki, load_swarm_key(key_file)
    finally:
        local.stop()


@pytest.mark.slow
def test_private_tls_swarm_serves_as_before_and_refuses_outsiders(private_tls_swarm, demo_gateway):
    import httpx
    from openai import OpenAI

    peers, outsider, gateway, pki, key = private_tls_swarm
    messages = [{"role": "user", "content": "def fibonacci(n):"}]

    def chat(base: str) -> str:
        http_client = (
            httpx.Client(verify=ssl.create_default_context(cafile=pki["ca"]))
            if base.startswith("https:")
            else None
        )
        client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, http_client=http_client)
        response = client.chat.completions.create(
            model=DEMO_MODEL_NAME,
            messages=messages,
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return response.choices[0].message.content

    assert gateway.address.startswith("https://")
    assert chat(gateway.address) == chat(demo_gateway("default").address)  # as on the open swarm
    with pytest.raises(httpx.HTTPError):  # the API is HTTPS only
        httpx.get(gateway.address.replace("https:", "http:") + "/health", timeout=5)
    assert "private swarm" in gateway.log() and "mutual TLS" in gateway.log()
    assert "private swarm" in peers[0].log() and "LISTENING BEYOND LOOPBACK" not in peers[0].log()

    assert "open swarm" in outsider.log()

    async def probe() -> None:
        files = TlsFiles.load(str(pki["gateway_cert"]), str(pki["gateway_key"]), str(pki["ca"]))
        member = ChannelPool(ClientSecurity(swarm_key=key, public_key="m", tls=files))
        no_key = ChannelPool(ClientSecurity(tls=files))  # the outsider's credentials: TLS, no key
        plaintext = ChannelPool(ClientSecurity(swarm_key=key, public_key="m"))
        try:
            first = await peer_info(member, peers[0].address)
            assert first.end_block == 2
            # the chats went peer to peer (push), the first peer's calls to the second admitted
            # by its membership check and over mutual TLS like a gateway's
            assert first.pushed_steps > 0 and peers[1].address in first.next_rtt_ms
            # at least as many as the sender saw acked: an ack that outlives the sender's deadline
            # under load is counted only here (the sender relays that step instead)
            received = (await peer_info(member, peers[1].address)).pushes_received
            assert received >= first.pushed_steps
            with pytest.raises(PeerError) as refused:
                await peer_info(no_key, peers[0].address)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(PeerError) as plain:
                await peer_info(plaintext, peers[0].address, timeout=3)
            assert plain.value.code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
        finally:
            for pool in (member, no_key, plaintext):
                await pool.close()

    asyncio.run(probe())

    trust = ssl.create_default_context(cafile=pki["ca"])

    def swarm_peers() -> set[str]:
        models = httpx.get(f"{gateway.address}/swarm/api", timeout=5, verify=trust).json()["models"]
        return {peer["address"] for model in models for peer in model["peers"]}

    # the outsider has announced every heartbeat since before the gateway started, but the
    # members' DHT never took its record, so no route can contain it
    assert wait_until(lambda: swarm_peers() == {p.address for p in peers}, 5)
    assert outsider.address not in swarm_peers()
    assert chat(gateway.address)  # and routes still go through members only

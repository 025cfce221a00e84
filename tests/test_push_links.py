"""Push links do not pile up (peer.forwarding): idle ones close with their channels, and at most
`max_links` stay open, the least recently used closed first. Real gRPC servers in this process
that ack every push, and count the Push streams open on them. A link spreads the pushes of a
pass over a few streams, or, to a next hop that takes batches, sends them as one request."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from peer.forwarding import STREAMS_PER_LINK, Forwarder, PushFailed, ack_for, entries_of
from protos import swarm_pb2, swarm_pb2_grpc
from tests.conftest import wait_until_async


class AckingPeer(swarm_pb2_grpc.PeerServicer):
    """Accepts every pushed step; `open` counts the Push streams still open."""

    def __init__(self) -> None:
        self.open = 0
        self.received = 0

    async def Push(self, request_iterator, context):
        self.open += 1
        try:
            async for _ in request_iterator:
                self.received += 1
                yield swarm_pb2.PushAck()
        finally:
            self.open -= 1


class BatchingPeer(swarm_pb2_grpc.PeerServicer):
    """Takes batches as a peer does (`PushAck.batches`); refuses the push ids in `refused`."""

    def __init__(self, refused: frozenset[str] = frozenset()) -> None:
        self.refused = refused
        self.requests: list[list[str]] = []  # the push ids of each request

    async def Push(self, request_iterator, context):
        async for request in request_iterator:
            ids = [push_id for push_id, _ in entries_of(request)]
            self.requests.append(ids)
            yield ack_for(
                [
                    swarm_pb2.PushVerdict(code=grpc.StatusCode.NOT_FOUND.value[0], message="gone")
                    if push_id in self.refused
                    else swarm_pb2.PushVerdict()
                    for push_id in ids
                ]
            )


async def _serve(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    swarm_pb2_grpc.add_PeerServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    return server, address


@pytest.fixture
async def peers():
    servers, servicers, addresses = [], [], []
    for _ in range(3):
        server = grpc.aio.server()
        servicer = AckingPeer()
        swarm_pb2_grpc.add_PeerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        servicers.append(servicer)
        addresses.append(f"127.0.0.1:{port}")
    yield addresses, servicers
    for server in servers:
        await server.stop(None)


async def push(forwarder: Forwarder, address: str) -> None:
    await forwarder.push(swarm_pb2.Forward(address=address, push_id="p"), swarm_pb2.Step(), timeout=5)


async def test_the_least_recently_used_link_is_closed_past_the_bound(peers):
    (a, b, c), servicers = peers
    forwarder = Forwarder(max_links=2, idle_s=60)
    try:
        for address in (a, b, a, c):  # a used again after b: b is the least recently used
            await push(forwarder, address)
        assert forwarder.links() == [a, c]
        assert await wait_until_async(lambda: [s.open for s in servicers] == [1, 0, 1], timeout=5)
        assert set(forwarder.pool._channels) == {a, c}, "the closed link's channel is closed too"
        assert forwarder.links_closed == 1
        await push(forwarder, b)  # a closed address opens a new link
        assert forwarder.links() == [c, b]
        assert [s.received for s in servicers] == [2, 2, 1]
    finally:
        await forwarder.close()


async def test_idle_links_close_with_their_channels(peers):
    (a, b, _), servicers = peers
    forwarder = Forwarder(idle_s=0.4)
    try:
        await push(forwarder, a)
        await push(forwarder, b)
        for _ in range(3):  # a stays busy, b goes idle
            await asyncio.sleep(0.2)
            await push(forwarder, a)
        assert await wait_until_async(
            lambda: (
                b not in forwarder.links() and b not in forwarder.pool._channels and servicers[1].open == 0
            ),
            timeout=5,
        )
        assert await wait_until_async(lambda: not forwarder.links(), timeout=5)
        assert await wait_until_async(lambda: servicers[0].open == 0, timeout=5)
        assert forwarder.pool._channels == {} and forwarder.links_closed >= 2
        await push(forwarder, a)  # and pushing again works
        assert forwarder.links() == [a] and servicers[0].received == 5
    finally:
        await forwarder.close()


async def test_a_closed_link_fails_its_waiting_pushes():
    """A link closed while a push waits on it (not the idle case) fails that push, not hangs."""
    server = grpc.aio.server()

    class Silent(swarm_pb2_grpc.PeerServicer):
        async def Push(self, request_iterator, context):
            async for _ in request_iterator:
                await asyncio.sleep(30)  # never acks in time

    swarm_pb2_grpc.add_PeerServicer_to_server(Silent(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    forwarder = Forwarder()
    try:
        pending = asyncio.ensure_future(push(forwarder, address))
        assert await wait_until_async(
            lambda: forwarder.links() and forwarder._links[address].waiting, timeout=5
        )
        link = forwarder._links[address]
        await forwarder._close_link(address, link, "test")
        with pytest.raises(PushFailed, match="CANCELLED"):
            await pending
    finally:
        await forwarder.close()
        await server.stop(None)


async def test_a_pass_of_pushes_goes_out_side_by_side(peers):
    """The 8 pushes of a pass, sent at once, use several streams of the link (gRPC takes one write
    at a time per stream), at most STREAMS_PER_LINK; every push is acked, and a lone push after
    them reuses an open stream."""
    (a, _, _), servicers = peers
    forwarder = Forwarder()
    try:
        await asyncio.gather(*(push(forwarder, a) for _ in range(8)))
        streams = len(forwarder._links[a].streams)
        assert 1 < streams <= STREAMS_PER_LINK
        assert servicers[0].received == 8 and servicers[0].open == streams
        await push(forwarder, a)
        assert len(forwarder._links[a].streams) == streams and servicers[0].received == 9
        assert forwarder.pushed == 9
    finally:
        await forwarder.close()
    assert await wait_until_async(lambda: servicers[0].open == 0, timeout=5)


async def test_a_pass_of_pushes_goes_as_one_request_once_the_next_hop_takes_batches():
    """The link's first push goes alone and learns from its ack that the next hop takes batches;
    then the pushes of one turn of the event loop (a pass's) go as one request, each push gets
    its own verdict (one refused among them fails that push alone), and the pushes of later
    turns go in requests of their own."""
    servicer = BatchingPeer(refused=frozenset({"gone"}))
    server, address = await _serve(servicer)
    forwarder = Forwarder()

    async def push_to(push_id: str) -> None:
        target = swarm_pb2.Forward(address=address, push_id=push_id)
        await forwarder.push(target, swarm_pb2.Step(position=len(push_id)), timeout=5)

    try:
        await push_to("first")
        ids = [f"s{i}" for i in range(7)]
        results = await asyncio.gather(*(push_to(i) for i in (*ids, "gone")), return_exceptions=True)
        assert results[:-1] == [None] * 7
        assert isinstance(results[-1], PushFailed) and results[-1].code == grpc.StatusCode.NOT_FOUND
        await asyncio.gather(*(push_to(i) for i in ids[:3]))
        assert servicer.requests == [["first"], [*ids, "gone"], ids[:3]]
        assert forwarder.pushed == 1 + 7 + 3 and len(forwarder._links[address].streams) == 1
    finally:
        await forwarder.close()
        await server.stop(None)


async def test_a_next_hop_that_predates_batches_gets_one_request_per_step(peers):
    """`AckingPeer` never says `batches`: a pass's pushes go as requests of one step each."""
    (a, _, _), servicers = peers
    forwarder = Forwarder()
    try:
        await push(forwarder, a)
        await asyncio.gather(*(push(forwarder, a) for _ in range(8)))
        assert servicers[0].received == 9 and not forwarder._links[a].batches
    finally:
        await forwarder.close()


def test_a_peers_server_takes_the_keepalive_pings_its_clients_send():
    """Every client of a peer (a gateway, another peer's push link) pings an idle connection every
    KEEPALIVE_MS; the peer's server must allow that (`server_options`), or gRPC's default (one ping
    per 5 minutes without data, two strikes) ends the connection with GOAWAY too_many_pings: the
    full suite's logs showed idle push links broken that way every few minutes, and the next push
    failed. Reproducing it live takes minutes of idle, so the pairing is checked here."""
    from common.peer_client import KEEPALIVE_MS, channel_options, server_options

    for keepalive_ms in (KEEPALIVE_MS, 200):
        client, server = dict(channel_options(keepalive_ms)), dict(server_options(keepalive_ms))
        assert client["grpc.keepalive_time_ms"] == keepalive_ms
        assert 0 < server["grpc.http2.min_ping_interval_without_data_ms"] <= keepalive_ms
        assert server["grpc.keepalive_permit_without_calls"] == 1
        for name in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
            assert client[name] == server[name]

"""The WAN harness's link: the delay it adds, in order, both ways, and pacing to a bandwidth."""

from __future__ import annotations

import asyncio
import time

import pytest

from loadtests.wan import LinkShape, start_link
from swarm.launcher import free_port


async def _echo_through(shape: LinkShape, payloads: list[bytes]) -> tuple[float, bytes]:
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = free_port()
    link = await start_link(port, ("127.0.0.1", target.sockets[0].getsockname()[1]), shape, seed=1)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        expected = b"".join(payloads)
        begin = time.perf_counter()
        for payload in payloads:
            writer.write(payload)
            await writer.drain()
        received = await reader.readexactly(len(expected))
        took = time.perf_counter() - begin
        writer.close()
        return took, received
    finally:
        link.close()
        target.close()


def test_a_round_trip_takes_twice_the_one_way_delay():
    took, received = asyncio.run(_echo_through(LinkShape(delay_ms=30), [b"ping"]))
    assert received == b"ping"
    assert 0.06 <= took < 0.5


def test_jitter_never_reorders_bytes():
    payloads = [bytes([i]) * 100 for i in range(50)]
    _, received = asyncio.run(_echo_through(LinkShape(delay_ms=5, jitter_ms=5), payloads))
    assert received == b"".join(payloads)


def test_bandwidth_paces_a_transfer():
    took, _ = asyncio.run(_echo_through(LinkShape(bandwidth_bps=8_000_000), [b"x" * 200_000]))
    assert took >= 200_000 * 8 / 8_000_000 * 0.9  # the directions overlap: one transfer time


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError):
        LinkShape(loss=1.0)
    with pytest.raises(ValueError):
        LinkShape(delay_ms=-1)

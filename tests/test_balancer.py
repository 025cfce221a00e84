"""The balancer's rounds, against records held in a list (the DHT's part is tested elsewhere):
three peers that all see one lost span move one of them onto it, not two."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from discovery.records import PeerRecord, PeerState
from peer.balancer import Balancer

NUM_BLOCKS = 8


def rec(peer_id: str, start: int, end: int) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, address="127.0.0.1:1", model="m", start=start, end=end,
                      num_blocks=NUM_BLOCKS, throughput=100.0, expires_at=1e12, auto_span=True)  # fmt: skip


async def test_three_balancers_seeing_one_gap_move_one_peer():
    records = {name: rec(name, 4, 8) for name in "bcd"}  # [0, 4) was lost
    moved: list[str] = []

    def balancer(name: str) -> Balancer:
        async def move(start: int, end: int) -> None:
            # what `PeerServer.move_to` announces first: draining, and where to
            records[name] = dataclasses.replace(records[name], state=PeerState.DRAINING, move_start=start,
                                                move_end=end)  # fmt: skip
            await asyncio.sleep(0.05)  # drain and load
            records[name] = dataclasses.replace(records[name], state=PeerState.ONLINE, start=start, end=end,
                                                move_start=0, move_end=0)  # fmt: skip
            moved.append(name)

        async def read() -> list[PeerRecord]:
            return list(records.values())

        return Balancer(read, lambda: records[name], move, interval=0.04, rng=random.Random(name))

    # Each sees the gap, pauses a random while (`Balancer.check`), looks again and moves or not.
    # Without the announced target, the second to look saw the first only draining (leaving), and
    # followed it onto [0, 4).
    results = await asyncio.gather(*(balancer(name).check() for name in "bcd"))
    assert sorted(map(str, results)) == ["(0, 4)", "None", "None"] and len(moved) == 1
    assert sorted((r.start, r.end) for r in records.values()) == [(0, 4), (4, 8), (4, 8)]


def test_interval_must_be_positive():
    async def nothing():
        return []

    with pytest.raises(ValueError):
        Balancer(nothing, lambda: rec("a", 0, 4), nothing, interval=0)

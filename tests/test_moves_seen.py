"""The gateway counts the moves peers announce (`PeerRecord.moving_to`) as its lookups see them,
and /metrics shows the count and the moves in progress."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

from discovery.records import PeerRecord, PeerState
from gateway.metrics import RouteActivity, _StateCollector
from gateway.swarm_view import SwarmView


class ListDHT:
    def __init__(self):
        self.records: list[PeerRecord] = []

    async def peers(self, model: str) -> list[PeerRecord]:
        return list(self.records)


def rec(peer_id: str, start: int, end: int, **changes) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, address="127.0.0.1:1", model="m", start=start, end=end, num_blocks=8,
                      throughput=10.0, expires_at=time.time() + 60, auto_span=True, **changes)  # fmt: skip


def metric_values(view: SwarmView) -> dict[str, float]:
    app = SimpleNamespace(state=SimpleNamespace(gateway=SimpleNamespace(swarm=view)))
    return {
        sample.name: sample.value
        for family in _StateCollector(app, RouteActivity()).collect()
        for sample in family.samples
    }


async def test_each_announced_move_is_counted_once():
    dht = ListDHT()
    view = SwarmView(dht)
    dht.records = [rec("a", 4, 8), rec("b", 4, 8)]
    await view.peers("m", fresh=True)
    assert view.moves_seen == 0 and view.moves_in_progress() == 0
    moving = rec("a", 4, 8, state=PeerState.DRAINING, move_start=0, move_end=4)
    dht.records = [moving, rec("b", 4, 8)]
    for _ in range(3):  # the same announcement, seen by several lookups
        await view.peers("m", fresh=True)
    assert view.moves_seen == 1 and view.moves_in_progress() == 1
    assert metric_values(view)["swarm_gateway_peer_moves_seen_total"] == 1
    assert metric_values(view)["swarm_gateway_peer_moves_in_progress"] == 1
    dht.records = [rec("a", 0, 4), rec("b", 4, 8)]  # arrived
    await view.peers("m", fresh=True)
    assert view.moves_in_progress() == 0
    dht.records = [dataclasses.replace(moving, start=0, end=4, move_start=4, move_end=8), rec("b", 4, 8)]
    await view.peers("m", fresh=True)  # and back: a second move
    assert view.moves_seen == 2

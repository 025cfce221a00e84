"""What operators see of placement: `swarm status` and the map's JSON show whether each peer chose
its span, moves in progress and the measured latencies (from records alone; the live swarm is in
test_swarm_map and test_block_placement)."""

from __future__ import annotations

import re
import time

from discovery.records import PeerRecord, PeerState
from gateway.swarm_map import peer_view
from swarm.status import format_models


def rec(peer_id: str, start: int, end: int, **changes) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, address=f"127.0.0.1:{len(peer_id) + 5000}", model="m", start=start, end=end,
                      num_blocks=8, throughput=50.0, expires_at=time.time() + 30, **changes)  # fmt: skip


def test_status_shows_placement_moves_and_latencies():
    peers = [
        rec("pinned-peer", 0, 4).to_dict(),
        rec(
            "auto-peer", 4, 8, auto_span=True, next_rtt={"127.0.0.1:5011": 0.42, "127.0.0.1:5012": 3.0}
        ).to_dict(),
        rec("mover", 4, 8, auto_span=True, state=PeerState.DRAINING, move_start=0, move_end=4).to_dict(),
    ]
    peers[1]["rtt_ms"] = 1.5
    table = format_models([{"id": "m", "num_blocks": 8, "peers": peers}])
    header = next(line for line in table.splitlines() if "peer" in line and "address" in line)
    for title in ("placed", "moving to", "rtt ms", "next hops ms"):
        assert title in header, header
    assert re.search(r"^  pinned-peer .*\[0,4\) +pinned +- ", table, re.M), table
    assert re.search(r"^  auto-peer .*\[4,8\) +auto +- .* 1\.5 +0\.4 \(of 2\)", table, re.M), table
    assert re.search(r"^  mover .*\[4,8\) +auto +\[0,4\) +draining", table, re.M), table
    assert "moves in progress: mover [4,8) -> [0,4)" in table


def test_map_view_names_the_move_target():
    now = time.time()
    view = peer_view(
        rec("mover", 4, 8, auto_span=True, move_start=0, move_end=4), None, False, now, rtt=0.002
    )
    assert view["moving_to"] == [0, 4] and view["auto_span"] is True and view["rtt_ms"] == 2.0
    assert peer_view(rec("still", 0, 4), None, False, now)["moving_to"] is None

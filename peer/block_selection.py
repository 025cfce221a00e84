"""Which blocks a peer serves when it is not told: pure functions over the DHT's peer records.

The swarm is as fast as its slowest block: every route crosses every block, so the tokens/s the
swarm can give is bounded by the block that the least throughput serves (the *bottleneck*).

* `choose_span` puts a new peer where that hurts most: over the window of its length whose
  blocks are the least served (lowest minimum, then lowest total; ties to the lowest start, so
  peers that decide at the same moment from the same records agree).
* `move_target` asks whether this peer should move: take its own throughput out, choose again as
  if it were new, and compare the bottleneck after the move with the bottleneck now. It moves
  only when now / after < `BALANCE_QUALITY` (0.75, as Petals' `should_choose_other_blocks`), so
  small imbalances, which measurement noise alone produces, never make peers wander.

Only `online` records count for the blocks they serve: a draining peer is leaving (or moving) and
its blocks are about to be unserved, which is exactly what the others should see. A peer that is
moving announces where to (`PeerRecord.moving_to`), and its throughput counts there already: a
move takes a drain and a load, tens of seconds in which every other balancer would otherwise see
the same gap and move onto it too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from discovery.records import PeerRecord, PeerState

BALANCE_QUALITY = 0.75


def block_throughputs(records: Iterable[PeerRecord], num_blocks: int, skip: str = "") -> list[float]:
    """tokens/s serving each block, summed over the online peers (but `skip`) that cover it, and
    over the peers moving onto it (see the module docstring)."""
    served = [0.0] * num_blocks
    for record in records:
        if record.peer_id == skip or record.num_blocks != num_blocks:
            continue
        if record.moving_to is not None:
            start, end = record.moving_to
        elif record.state == PeerState.ONLINE:
            start, end = record.start, record.end
        else:
            continue
        for block in range(start, end):
            served[block] += record.throughput
    return served


def choose_start(served: list[float], length: int) -> int:
    """Start of the window of `length` blocks that is least served (see the module docstring)."""
    length = min(length, len(served))
    windows = range(len(served) - length + 1)
    return min(windows, key=lambda s: (min(served[s : s + length]), sum(served[s : s + length]), s))


def choose_span(
    records: Iterable[PeerRecord], num_blocks: int, length: int, skip: str = ""
) -> tuple[int, int]:
    """The span a peer of `length` blocks should serve, given everyone else's records."""
    if length < 1:
        raise ValueError(f"a peer must serve at least one block, got {length}")
    length = min(length, num_blocks)
    start = choose_start(block_throughputs(records, num_blocks, skip), length)
    return start, start + length


def bottleneck(served: list[float]) -> float:
    return min(served) if served else 0.0


def move_target(
    records: list[PeerRecord], me: PeerRecord, quality: float = BALANCE_QUALITY
) -> tuple[int, int] | None:
    """The span `me` should move to, or None when staying is as good (see the module docstring)."""
    num_blocks, length = me.num_blocks, me.end - me.start
    others = block_throughputs(records, num_blocks, skip=me.peer_id)
    throughput = me.throughput if me.throughput > 0 else 1.0
    start = choose_start(others, length)
    if start == me.start:
        return None
    now = list(others)
    after = list(others)
    for block in range(me.start, me.end):
        now[block] += throughput
    for block in range(start, start + length):
        after[block] += throughput
    before, then = bottleneck(now), bottleneck(after)
    if then <= before or math.isclose(then, before):
        return None
    return (start, start + length) if before / then < quality else None


def blocks_that_fit(per_block_bytes: int, budget_bytes: int, num_blocks: int) -> int:
    """How many blocks' weights fit in `budget_bytes` (at least 1: a peer that fits none should
    not have been started, and says so when it loads)."""
    if per_block_bytes <= 0:
        return num_blocks
    return max(1, min(num_blocks, budget_bytes // per_block_bytes))


def available_memory_bytes() -> int:
    """Memory free now (the default budget of a peer that chooses its blocks)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30

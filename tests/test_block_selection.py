"""Block selection and rebalancing decisions, from peer records alone."""

from __future__ import annotations

import pytest

from discovery.records import PeerRecord, PeerState
from peer.block_selection import (
    block_throughputs,
    blocks_that_fit,
    choose_span,
    move_target,
)

NUM_BLOCKS = 8


def rec(peer_id: str, start: int, end: int, throughput: float = 100.0, **changes) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, address="127.0.0.1:1", model="m", start=start, end=end,
                      num_blocks=NUM_BLOCKS, throughput=throughput, expires_at=1e12, **changes)  # fmt: skip


def test_an_empty_swarm_is_filled_from_block_zero_then_where_it_is_thinnest():
    assert choose_span([], NUM_BLOCKS, 4) == (0, 4)
    assert choose_span([rec("a", 0, 4)], NUM_BLOCKS, 4) == (4, 8)
    assert choose_span([rec("a", 0, 4), rec("b", 4, 8)], NUM_BLOCKS, 4) == (0, 4)  # tie: lowest start
    assert choose_span([rec("a", 0, 4), rec("b", 4, 8, 50.0)], NUM_BLOCKS, 4) == (4, 8)
    assert choose_span([rec("a", 0, 5)], NUM_BLOCKS, 4) == (4, 8)  # the hole [5, 8) decides
    assert choose_span([rec("a", 0, 3)], NUM_BLOCKS, 20) == (0, NUM_BLOCKS)


def test_draining_and_other_models_peers_do_not_count():
    records = [rec("a", 0, 4, state=PeerState.DRAINING), rec("b", 4, 8)]
    assert block_throughputs(records, NUM_BLOCKS) == [0.0] * 4 + [100.0] * 4
    assert choose_span(records, NUM_BLOCKS, 4) == (0, 4)


def test_four_peers_arriving_one_by_one_cover_the_model_twice():
    records: list[PeerRecord] = []
    for name in "abcd":
        records.append(rec(name, *choose_span(records, NUM_BLOCKS, 4)))
    assert sorted((r.start, r.end) for r in records) == [(0, 4), (0, 4), (4, 8), (4, 8)]


def test_a_peer_moves_to_an_uncovered_span_but_not_for_a_small_gain():
    b, c = rec("b", 4, 8), rec("c", 4, 8)
    assert move_target([b, c], b) == (0, 4)  # [0, 4) lost its peers
    assert move_target([b], b) is None  # the only peer of [4, 8) does not leave it bare
    unbalanced = [rec("a", 0, 4, 100.0), rec("b", 4, 8, 90.0), rec("c", 4, 8, 90.0)]
    assert move_target(unbalanced, unbalanced[1]) is None  # 100 vs 180: moving gives 180/190
    thin = [rec("a", 0, 4, 40.0), rec("b", 4, 8, 90.0), rec("c", 4, 8, 90.0)]
    assert move_target(thin, thin[1]) == (0, 4)  # bottleneck 40 -> 90: quality 0.44 < 0.75


def test_memory_budget_in_blocks():
    per_block = 12_000_000  # peer.model.block_bytes, checked per family in tests/test_families.py
    assert blocks_that_fit(per_block, 3 * per_block + 1, NUM_BLOCKS) == 3
    assert blocks_that_fit(per_block, 100 * per_block, NUM_BLOCKS) == NUM_BLOCKS
    assert blocks_that_fit(per_block, 1, NUM_BLOCKS) == 1


def test_invalid_length_is_refused():
    with pytest.raises(ValueError):
        choose_span([], NUM_BLOCKS, 0)


def test_a_move_in_progress_counts_where_the_peer_goes():
    """Two peers of [4, 8) both see [0, 4) lost; the one that decides first announces its move,
    and the other then stays: both moving would leave [4, 8) bare."""
    b, c = rec("b", 4, 8), rec("c", 4, 8)
    assert move_target([b, c], b) == (0, 4) and move_target([b, c], c) == (0, 4)
    b_moving = rec("b", 4, 8, state=PeerState.DRAINING, auto_span=True, move_start=0, move_end=4)
    assert block_throughputs([b_moving], NUM_BLOCKS) == [100.0] * 4 + [0.0] * 4
    assert move_target([b_moving, c], c) is None
    assert choose_span([b_moving, c], NUM_BLOCKS, 4) == (0, 4)  # a newcomer: tie, lowest start
    # three of [4, 8): the third stays while b's move is announced, and would follow b onto [0, 4)
    # if b announced only `draining` (an older peer)
    d = rec("d", 4, 8)
    assert move_target([b_moving, c, d], d) is None
    assert move_target([rec("b", 4, 8, state=PeerState.DRAINING), c, d], d) == (0, 4)


def test_move_fields_in_records_are_validated_and_optional():
    old = rec("a", 0, 4).to_dict()
    for key in ("auto_span", "move_start", "move_end"):
        old.pop(key)
    parsed = PeerRecord.from_dict({**old, "some_future_field": 1})  # older and newer peers' records
    assert parsed.auto_span is False and parsed.moving_to is None
    moving = rec("a", 0, 4, auto_span=True, move_start=4, move_end=8)
    assert PeerRecord.from_dict(moving.to_dict()) == moving and moving.moving_to == (4, 8)
    for bad in ({"move_start": 4, "move_end": 4}, {"move_start": 0, "move_end": 9}, {"move_start": -1, "move_end": 2},
                {"move_start": 1.5, "move_end": 2}, {"auto_span": "yes"}, {"auto_span": 1}):  # fmt: skip
        with pytest.raises(ValueError):
            PeerRecord.from_dict({**moving.to_dict(), **bad})

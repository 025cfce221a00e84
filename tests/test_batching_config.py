"""The peer's own batching configuration (peer.batching_config): packed weights when the memory
budget allows them, pipeline groups for the first span of multi-hop routes under load, flags that
override both; and the scheduler splitting its sessions only from that many live sessions."""

from __future__ import annotations

import asyncio

import pytest

from peer.batching_config import (
    PIPELINE_GROUPS,
    PIPELINE_MIN_SESSIONS,
    PREPACK_SHARE,
    BatchingConfig,
    choose_pipeline_groups,
    choose_prepack,
    parse_groups,
)

MiB = 2**20


@pytest.mark.parametrize(
    ("available", "kv_budget", "expected"),
    [
        (4096 * MiB, 0, True),  # 300 MiB copy, 4 GiB free: well inside a quarter
        (1000 * MiB, 0, False),  # a quarter of 1000 MiB is less than the copy
        (4096 * MiB, 3500 * MiB, False),  # an explicit KV budget leaves too little room
    ],
)
def test_prepack_when_the_copy_fits_the_memory_budget(available, kv_budget, expected):
    prepack, why = choose_prepack(
        None, packable=True, packed_bytes=300 * MiB, available_bytes=available, kv_budget_bytes=kv_budget
    )
    assert prepack is expected, why
    assert why.startswith("auto")
    assert ("too small" in why) is (not expected)


def test_prepack_threshold_is_a_share_of_what_is_left():
    room = 2000 * MiB
    fits = int(PREPACK_SHARE * room)
    assert choose_prepack(None, packable=True, packed_bytes=fits, available_bytes=room + 500 * MiB,
                          kv_budget_bytes=500 * MiB)[0]  # fmt: skip
    assert not choose_prepack(None, packable=True, packed_bytes=fits + MiB, available_bytes=room + 500 * MiB,
                              kv_budget_bytes=500 * MiB)[0]  # fmt: skip


def test_prepack_flags_override_and_unpackable_weights_never_pack():
    assert choose_prepack(True, packable=True, packed_bytes=10**12, available_bytes=MiB) == (
        True,
        "--prepack",
    )
    assert choose_prepack(False, packable=True, packed_bytes=1, available_bytes=10**12) == (
        False,
        "--no-prepack",
    )
    for requested in (None, True):  # bf16, quantized, CUDA, or a torch without oneDNN's kernel
        prepack, why = choose_prepack(requested, packable=False, packed_bytes=1, available_bytes=10**12)
        assert prepack is False and "no packed kernel" in why


@pytest.mark.parametrize(
    ("is_first", "is_last", "prepack", "groups", "reason"),
    [
        (True, False, True, 0, "first span of multi-hop routes"),  # auto: split under load
        (True, False, False, 1, "without packed weights"),
        (True, True, True, 1, "whole model"),
        (False, False, True, 1, "later spans"),
        (False, True, True, 1, "later spans"),
    ],
)
def test_pipeline_groups_by_role(is_first, is_last, prepack, groups, reason):
    chosen, why = choose_pipeline_groups(None, is_first=is_first, is_last=is_last, prepack=prepack)
    assert chosen == groups and reason in why


def test_pipeline_group_flag_overrides_but_only_a_first_span_keeps_groups():
    assert choose_pipeline_groups(3, is_first=True, is_last=True, prepack=False) == (3, "--pipeline-groups 3")
    assert choose_pipeline_groups(1, is_first=True, is_last=False, prepack=True)[0] == 1
    groups, why = choose_pipeline_groups(2, is_first=False, is_last=True, prepack=True)
    assert groups == 1 and "only a first span" in why
    with pytest.raises(ValueError, match="pipeline-groups"):
        choose_pipeline_groups(9, is_first=True, is_last=False, prepack=True)


def test_auto_groups_split_only_under_load():
    auto = BatchingConfig(True, "auto", 0, "auto")
    assert [auto.groups_for(n) for n in (0, 1, PIPELINE_MIN_SESSIONS - 1)] == [1, 1, 1]
    assert auto.groups_for(PIPELINE_MIN_SESSIONS) == PIPELINE_GROUPS
    assert BatchingConfig(False, "x", 3, "x").groups_for(1) == 3
    assert "pipeline groups auto" in auto.describe() and "prepack (auto)" in auto.describe()
    calibrated = BatchingConfig(True, "auto", 0, "auto", copies=("skinny",))
    assert calibrated.describe().startswith("prepack (auto) using the few-rows kernel; ")


def test_parse_groups():
    assert parse_groups("auto") is None and parse_groups(" AUTO ") is None
    assert parse_groups("2") == 2
    for bad in ("0", "9", "two", ""):
        with pytest.raises(ValueError, match="pipeline-groups"):
            parse_groups(bad)


def test_scheduler_splits_its_sessions_from_the_threshold_on():
    """A first span with groups=2, split_from=3: one group for 1-2 live sessions, two from 3, one
    again once they end; sessions count from their first step until their stream ends."""
    from peer.scheduler import BatchScheduler, StepWork

    class First:
        is_first = True

    class Session:
        pass

    async def scenario():
        scheduler = BatchScheduler(First(), 64, 3.0, groups=2, split_from=3)  # its loop is not started
        loop = asyncio.get_running_loop()
        sessions = [Session() for _ in range(3)]
        seen, tasks = [], []
        for session in sessions:
            work = StepWork(session, None, [1], False, None, loop.create_future())
            tasks.append(asyncio.create_task(scheduler.submit(work)))
            await asyncio.sleep(0)
            seen.append(scheduler.groups_now)
        for session in sessions[:2]:
            scheduler.forget(session)
        seen.append(scheduler.groups_now)
        for task in tasks:
            task.cancel()
        return seen

    assert asyncio.run(scenario()) == [1, 1, 2, 1]


def test_spans_are_balanced_with_the_lm_head_counted(tmp_path):
    """`swarm up` splits the blocks so that the last span's LM head is counted as work: the slowest
    span sets a pipeline's pace (swarm.launcher.balanced_split)."""
    import json

    from swarm.launcher import balanced_split, split_blocks

    assert split_blocks(8, 2) == [(0, 4), (4, 8)]  # no head counted: equal numbers of blocks
    assert split_blocks(8, 2, head_blocks=2.9) == [(0, 5), (5, 8)]  # 5 | 3 + 2.9, not 4 | 4 + 2.9
    assert split_blocks(8, 3, head_blocks=2.9) == [(0, 3), (3, 7), (7, 8)]  # 3 | 4 | 1 + 2.9
    assert split_blocks(4, 4, head_blocks=10.0) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # every peer a block
    with pytest.raises(ValueError):
        split_blocks(2, 3, head_blocks=1.0)
    bench = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "head_dim": 64,
             "num_key_value_heads": 4, "intermediate_size": 2816, "vocab_size": 32000}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(bench))
    assert balanced_split(tmp_path, 2) == [(0, 5), (5, 8)]

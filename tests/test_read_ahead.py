"""`gateway.generation.read_ahead`: a session's next step leaves before its token's text work."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.generation import read_ahead
from tests.conftest import wait_until_async


async def counting(produced: list[int], count: int, closed: list[bool], fail_at: int | None = None):
    try:
        for i in range(count):
            await asyncio.sleep(0)  # a turn of the event loop, as a real async source takes
            if i == fail_at:
                raise ValueError(f"failed at {i}")
            produced.append(i)
            yield i
    finally:
        closed.append(True)


async def test_items_arrive_in_order_and_the_source_runs_ahead_of_a_slow_consumer():
    produced, closed, seen = [], [], []
    async with contextlib.aclosing(read_ahead(counting(produced, 6, closed), depth=2)) as items:
        async for item in items:
            await asyncio.sleep(0.01)  # the consumer's text work
            # while the consumer handled `item`, the source already made the next one(s)
            assert len(produced) >= min(6, item + 2)
            seen.append(item)
    assert seen == list(range(6))
    assert closed == [True]


async def test_the_source_runs_at_most_depth_items_ahead():
    produced, closed = [], []
    items = read_ahead(counting(produced, 100, closed), depth=3)
    assert await anext(items) == 0
    await wait_until_async(lambda: len(produced) >= 5, 5, interval=0.001)
    for _ in range(20):  # on purpose: turns of the event loop for a pump that ignored the bound to run on
        await asyncio.sleep(0)
    # 0 was handed over; 3 wait in the queue and the pump holds 1 more it cannot put yet
    assert len(produced) == 5
    await items.aclose()
    assert closed == [True], "closing stops the source"


async def test_an_error_of_the_source_reaches_the_consumer_after_the_items_before_it():
    produced, closed, seen = [], [], []
    with pytest.raises(ValueError, match="failed at 3"):
        async for item in read_ahead(counting(produced, 10, closed, fail_at=3)):
            seen.append(item)
    assert seen == [0, 1, 2]
    assert closed == [True]


async def test_cancelling_the_consumer_closes_the_source():
    produced, closed = [], []
    started = asyncio.Event()

    async def consume():  # as gateway.serving.choices.run_choice does: a client that went away cancels it
        async with contextlib.aclosing(read_ahead(counting(produced, 10**6, closed))) as items:
            async for _ in items:
                started.set()
                await asyncio.sleep(10)  # busy with the item until cancelled (never wakes on its own)

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed == [True]

"""The batching scheduler's hand-off: a lone session's decode step runs in `submit` itself when the
scheduler is idle (`BatchScheduler._can_run_now`), and gives what a pass run by the scheduler's
task gives; with two live sessions, steps go through the queue and are packed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from peer.model import BlockSpan
from peer.sampling import Sampler, SamplingParams
from peer.scheduler import BatchScheduler, StepWork

PROMPT = [5, 17, 42, 99, 3, 64]
NEW_TOKENS = 12


def _session(span: BlockSpan) -> SimpleNamespace:
    return SimpleNamespace(
        cache=span.new_cache(),
        sampler=Sampler(SamplingParams(temperature=0.0)),
        wire_dtype=torch.float32,
        history=[],
        penalty_start=0,
        in_forward=False,
    )


def _work(session, token_ids: list[int]) -> StepWork:
    return StepWork(
        session=session,
        inputs=torch.tensor(token_ids, dtype=torch.long),
        token_ids=token_ids,
        sample=True,
        allowed=None,
        future=asyncio.get_running_loop().create_future(),
    )


async def _greedy(scheduler: BatchScheduler, sessions: list) -> list[list[int]]:
    """Decode NEW_TOKENS for every session, their steps submitted together."""
    outputs = [[] for _ in sessions]
    steps = [list(PROMPT) for _ in sessions]
    for _ in range(NEW_TOKENS):
        results = await asyncio.gather(
            *(scheduler.submit(_work(session, ids)) for session, ids in zip(sessions, steps, strict=True))
        )
        for output, result in zip(outputs, results, strict=True):
            output.append(result.token_id)
        steps = [[result.token_id] for result in results]
    return outputs


async def test_a_lone_step_runs_in_submit_and_matches_queued_passes(demo_model):
    span = BlockSpan.load(demo_model, 0, 4)
    scheduler = BatchScheduler(span, 64)
    scheduler.start()
    queued = []
    put = scheduler._queue.put_nowait
    scheduler._queue.put_nowait = lambda work: (queued.append(work), put(work))[1]
    try:
        await asyncio.sleep(0)  # the task now waits for a first step
        lone = await _greedy(scheduler, [_session(span)])
        assert queued == [], "a lone session's steps went through the scheduler's task"
        assert scheduler.steps == NEW_TOKENS

        # two live sessions: each pass packs both, through the queue, and each gets the lone tokens
        steps_before = scheduler.steps
        pair = await _greedy(scheduler, [_session(span), _session(span)])
        assert pair == [lone[0], lone[0]]
        assert len(queued) >= 2 * NEW_TOKENS - 1  # the first may have run before the second arrived
        assert scheduler.steps - steps_before <= NEW_TOKENS + 1
    finally:
        await scheduler.stop()

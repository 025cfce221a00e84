"""The batching scheduler: packs the steps of every session that is waiting into one forward pass.

Concurrency contract
--------------------
* The scheduler owns the model and every KV cache while a forward pass runs: passes run one at a
  time, in its single worker thread, so caches need no locks. The one exception runs on the event
  loop's thread instead (`_inline`: a decode step of the only live session; run by `submit`
  itself when the scheduler is idle, `_can_run_now`), which blocks the loop for that pass, so no
  bookkeeping can run beside it either. Steps of different sessions that are
  waiting at the same moment run as one packed forward pass (continuous batching); a session has
  at most one step in flight because the gateway waits for each result.
* Steps arrive validated (`peer.servicer` checks them at the edge and answers INVALID_ARGUMENT);
  nothing here looks at network input again.
* One session cannot fail another's pass: what is per session after the shared matmuls (the
  checks that its logits are finite, its sampling, its prompt logprobs, its result) runs in
  isolation, and a failure there fails that step alone (`StepFailed`) while the rest of the pass
  completes. Only a failure of the shared forward itself (a bug, OOM) fails every step of the pass
  (`ForwardFailed`).
* Chunked prefill: a pass holds at most `max_batch_tokens` tokens. Steps are packed shortest
  first, so every waiting decode step gets in; a long prompt fills what is left and its rest
  waits for the next pass, interleaved with everyone's decoding instead of stalling it. What a
  step returns is built when its last chunk has run: the hidden rows of every chunk
  (`StepWork.outputs`) and, for `Step.prompt_logprobs`, the scores of every chunk's rows
  (`StepWork.scored`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from common import trace
from peer import tensor_codec
from peer.batch_window import BatchWindow
from peer.kv_cache import KVCache
from peer.model import BlockSpan
from peer.sampling import Sampler, prompt_logprobs
from protos import swarm_pb2

log = logging.getLogger("peer")

INLINE_MAX_TOKENS = 8  # a lone session's pass of at most this many tokens runs inline (`_inline`)
MERGE_WAIT_MAX_S = 0.25  # the longest a pass waits for active sessions (see BatchScheduler._gather)


class StepSession(Protocol):
    """What the scheduler reads and writes of a session (`peer.servicer.Session`)."""

    cache: KVCache
    sampler: Sampler | None
    wire_dtype: torch.dtype
    history: list[int]
    penalty_start: int
    in_forward: bool


class ForwardFailed(RuntimeError):
    """The forward pass a step was in raised (a bug or OOM): that pass's steps fail, the peer goes on."""


class StepFailed(RuntimeError):
    """One session's step failed on its own; the other steps of its pass completed.

    `bad_input`: the session's own input caused it (its hidden states or its cached history made
    its logits non-finite, its sampling parameters were refused), answered with INVALID_ARGUMENT;
    otherwise a bug on this peer, answered with INTERNAL. Either way the session's cache may hold
    what the failed step wrote, so it must not be kept for a resume."""

    def __init__(self, message: str, *, bad_input: bool):
        super().__init__(message)
        self.bad_input = bad_input


@dataclass
class StepWork:
    """One validated step of one session (`PeerServicer._prepare_step` builds it), possibly run in
    several chunks; `future` gets its `StepResult` once the last chunk has run."""

    session: StepSession
    inputs: torch.Tensor  # [T] token ids or [T, hidden]
    token_ids: list[int]
    sample: bool
    allowed: torch.Tensor | None  # last span: the token ids it may sample (None: any)
    future: asyncio.Future
    done: int = 0  # tokens already run (chunked prefill)
    outputs: list[torch.Tensor] = field(default_factory=list)  # hidden rows of earlier chunks
    # last span, `Step.prompt_logprobs`: alternatives wanted per token, and (token, logprob, top)
    # of every row scored so far (all chunks)
    prompt_logprobs: int | None = None
    scored: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    pass_id: int = 0  # later spans: the route's first span's pass this step belongs to (0: unknown)
    # the blocks this step runs: a sub-span of the peer's (`BlockSpan.narrow`); None: all of them
    span: BlockSpan | None = None

    @property
    def remaining(self) -> int:
        return len(self.token_ids) - self.done


class BatchScheduler:
    """Packs the steps that are waiting into one forward pass, run in a single worker thread."""

    def __init__(
        self,
        span: BlockSpan,
        max_batch_tokens: int,
        batch_wait_ms: float = 0.0,
        groups: int = 1,
        split_from: int = 0,
    ):
        """`groups` > 1: the first span keeps its sessions in that many groups that take turns,
        from `split_from` live sessions on (fewer share one group; `peer.batching_config`)."""
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if not 0 <= batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be in [0, 1000], got {batch_wait_ms}")
        if not 1 <= groups <= 8:
            raise ValueError(f"groups must be in [1, 8], got {groups}")
        self.span = span
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait = batch_wait_ms / 1000
        self._window = BatchWindow()
        self._queue: asyncio.Queue[StepWork] = asyncio.Queue()
        self._carry: list[StepWork] = []  # prefills with chunks still to run
        # Pipeline groups (first span only, see `_gather`): session (by object id) -> its group,
        # and the steps of other groups that wait for their own pass.
        self.groups = groups if span.is_first else 1
        self.split_from = split_from
        self._live: set[int] = set()  # sessions (by object id) that stepped and are not forgotten
        self._split = False  # whether the groups are in use now (see `groups_now`)
        self._group_of: dict[int, int] = {}
        self._deferred: list[StepWork] = []
        self._last_group = -1
        # Pass ids sent on to later spans (`StepResult.pass_id`): unique to this peer's passes.
        self._pass_ids = itertools.count(int.from_bytes(os.urandom(5), "big") << 20)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task | None = None
        self._idle = False  # `_run` waits for a first step with nothing queued (`_can_run_now`)
        self.steps = 0  # forward passes
        self.tokens = 0
        # called with (sessions, tokens, seconds, cpu_seconds) after each forward pass: wall time,
        # and the CPU time of the thread that ran it (`peer.throughput` announces from that)
        self.observe = None
        self.session_steps = 0  # finished steps of sessions; > steps when passes were shared

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @property
    def groups_now(self) -> int:
        """The groups the next pass chooses from: `groups` once `split_from` sessions are live."""
        return self.groups if self.groups > 1 and len(self._live) >= self.split_from else 1

    def _update_split(self) -> None:
        split = self.groups_now > 1
        if split and not self._split:
            self._group_of.clear()  # sessions that came and went meanwhile: balance anew
        self._split = split

    async def submit(self, work: StepWork) -> swarm_pb2.StepResult:
        self._live.add(id(work.session))
        self._window.arrived(work.session)
        if self._can_run_now(work):
            self._run_inline([(work, work.remaining)])  # resolves the future: no yield below
        else:
            self._queue.put_nowait(work)
        return await work.future

    def _can_run_now(self, work: StepWork) -> bool:
        """Whether `submit` may run `work`'s pass itself, on the event loop's thread: the pass
        `_run` would run inline (`_inline`), with the scheduler idle (waiting for a first step,
        nothing queued, carried or deferred, no pass running). It saves the two loop turns of
        the hand-off to the scheduler's task and back, a few tenths of a millisecond of every
        hop of a lone stream."""
        return (
            self._idle
            and self._queue.empty()
            and len(self._live) <= 1
            and work.remaining <= min(INLINE_MAX_TOKENS, self.max_batch_tokens)
        )

    def _pack(self, waiting: list[StepWork]) -> tuple[list[tuple[StepWork, int]], list[StepWork]]:
        """Choose (work, tokens) pieces for one pass; the rest waits. Shortest first, so decode
        steps never wait behind a long prompt; a prompt is cut to what the pass has room for."""
        pieces: list[tuple[StepWork, int]] = []
        rest: list[StepWork] = []
        room = self.max_batch_tokens
        for work in sorted(waiting, key=lambda w: w.remaining):
            if work.future.done():
                continue
            if room <= 0:
                rest.append(work)
                continue
            count = min(room, work.remaining)
            pieces.append((work, count))
            room -= count
        return pieces, rest

    def _inline(self, pieces: list[tuple[StepWork, int]]) -> bool:
        """Whether this pass runs on the event loop's thread rather than the forward thread: a
        decode step of the only live session. Nothing else can be waiting for the loop then (an
        `Info` or a new session's open waits one pass at most), and the two thread hand-offs it
        saves are ~0.2 ms of every hop of a lone stream (docs/benchmarks-batching.md)."""
        return len(pieces) == 1 and len(self._live) <= 1 and pieces[0][1] <= INLINE_MAX_TOKENS

    def forget(self, session: StepSession) -> None:
        """The session's stream ended: stop expecting its steps (see `BatchWindow`)."""
        self._window.forget(session)
        self._group_of.pop(id(session), None)
        self._live.discard(id(session))

    def _group(self, session: StepSession) -> int:
        """The session's pipeline group; a new session joins the group with the fewest."""
        key = id(session)
        if key not in self._group_of:
            sizes = [0] * self.groups
            for group in self._group_of.values():
                sizes[group] += 1
            self._group_of[key] = sizes.index(min(sizes))
        return self._group_of[key]

    async def _gather(self) -> list[StepWork]:
        """The steps for the next pass: all that are queued, plus those of active sessions that
        arrive soon (in flight through the gateway or the other peers; without the wait, a
        pipeline of peers splits the sessions into out-of-phase groups of small passes, see
        `peer.batch_window`). Every span waits up to `--batch-wait-ms` (the gateway's jitter).
        The first span also waits for each active session up to 1.5 of its usual round trip
        (capped at MERGE_WAIT_MAX_S), so a group still on the later peers is merged once and then
        stays merged: a pass reads every weight once whatever its batch, so one pass of 8 costs
        far less than two of 4. A lone stream never waits (no other session is expected)."""
        waiting, self._carry, self._deferred = [*self._carry, *self._deferred], [], []
        if not waiting:
            self._idle = True  # `submit` may run a lone step's pass itself meanwhile
            try:
                waiting.append(await self._queue.get())
            finally:
                self._idle = False
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        self._update_split()
        if self.batch_wait <= 0 and not self._split:
            return waiting
        # Only the first span merges groups: if every peer of a route waited for sessions queued
        # at the others, they would all wait for each other. Later spans wait for the rest of the
        # pass the arrived steps came with, which the gateway sends on one after the other.
        expected = self._window.expected((work.session for work in waiting), same_pass=not self.span.is_first)
        group = None
        if self._split:
            # Pipelining (`--pipeline-groups`): the sessions are kept in groups that take turns,
            # so that while one group's pass runs on a later peer this span computes the next
            # group's instead of idling. Turns go round (a long prefill's chunks must not keep
            # its group's turn while the other group's decode steps wait).
            present = {self._group(work.session) for work in waiting if not work.future.done()}
            order = [(self._last_group + step) % self.groups for step in range(1, self.groups + 1)]
            group = next((g for g in order if g in present), self._last_group)
            self._last_group = group
            expected = {key for key in expected if self._group_of.get(key) == group}
        if expected and self.batch_wait > 0:
            due = self._window.due(expected, floor=self.batch_wait) - time.perf_counter()
            wait = max(self.batch_wait, min(due, MERGE_WAIT_MAX_S))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    while expected:
                        work = await self._queue.get()
                        waiting.append(work)
                        expected.discard(id(work.session))
            while not self._queue.empty():
                waiting.append(self._queue.get_nowait())
        if group is not None:
            waiting = [work for work in waiting if not work.future.done()]  # streams gone meanwhile
            mine = [work for work in waiting if self._group(work.session) == group]
            self._deferred = [work for work in waiting if self._group(work.session) != group]
            return mine
        return waiting

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = await self._gather()
            pieces, self._carry = self._pack(waiting)
            if not pieces:
                continue
            if self._inline(pieces):
                self._run_inline(pieces)
                continue
            begin, pass_id = self._begin(pieces)
            try:
                results, cpu_seconds = await loop.run_in_executor(self._executor, self._timed_forward, pieces)
            except Exception as exc:  # a bug or OOM must fail these steps, not the peer
                self._fail(pieces, exc)
                continue
            finally:
                self._end(pieces)
            self._complete(pieces, results, begin, cpu_seconds, pass_id)

    def _run_inline(self, pieces: list[tuple[StepWork, int]]) -> None:
        """A pass on the event loop's thread (`_inline`), from `_run` or from `submit` itself
        (`_can_run_now`)."""
        begin, pass_id = self._begin(pieces)
        try:
            results, cpu_seconds = self._timed_forward(pieces)
        except Exception as exc:  # a bug or OOM must fail these steps, not the peer
            self._fail(pieces, exc)
            return
        finally:
            self._end(pieces)
        self._complete(pieces, results, begin, cpu_seconds, pass_id)

    def _begin(self, pieces: list[tuple[StepWork, int]]) -> tuple[float, int]:
        for work, _ in pieces:
            work.session.in_forward = True
        return time.perf_counter(), next(self._pass_ids)

    def _end(self, pieces: list[tuple[StepWork, int]]) -> None:
        for work, _ in pieces:
            work.session.in_forward = False

    def _fail(self, pieces: list[tuple[StepWork, int]], exc: Exception) -> None:
        log.exception("forward pass failed")
        for work, _ in pieces:
            if not work.future.done():
                work.future.set_exception(ForwardFailed(str(exc)))

    def _complete(
        self,
        pieces: list[tuple[StepWork, int]],
        results: list,
        begin: float,
        cpu_seconds: float,
        pass_id: int,
    ) -> None:
        """Count the pass and hand each step its result (or queue its next chunk)."""
        self.steps += 1
        batch_tokens = sum(count for _, count in pieces)
        self.tokens += batch_tokens
        # the announced throughput is the whole span's: a pass with sub-span steps ran fewer layers
        if self.observe is not None and all(work.span in (None, self.span) for work, _ in pieces):
            self.observe(len(pieces), batch_tokens, time.perf_counter() - begin, cpu_seconds)
        for (work, _), result in zip(pieces, results, strict=True):
            if work.future.done():
                continue
            if isinstance(result, StepFailed):  # this session alone; see `_finish`
                work.future.set_exception(result)
            elif result is None:  # more chunks to go
                self._carry.append(work)
            else:
                self.session_steps += 1
                # A later span groups sessions as the route's first span did, so that the
                # groups a pipeline keeps (`--pipeline-groups`) stay apart here too.
                result.pass_id = work.pass_id or pass_id
                self._window.stepped(work.session, cohort=result.pass_id)
                work.future.set_result(result)

    def _timed_forward(self, pieces: list[tuple[StepWork, int]]) -> tuple[list, float]:
        """`_forward` and the CPU time the running thread spent in it. Thread CPU time, not wall
        time: it excludes the time the thread waited for a core that other processes held, so
        two identical peers on one busy machine measure alike (`peer.throughput`)."""
        trace.mark("peer.forward_start")
        begin = time.thread_time()
        results = self._forward(pieces)
        cpu_seconds = time.thread_time() - begin
        trace.mark("peer.forward_end")
        return results, cpu_seconds

    @torch.inference_mode()
    def _forward(self, pieces: list[tuple[StepWork, int]]) -> list[swarm_pb2.StepResult | StepFailed | None]:
        """Run a pass. Sessions of different sub-spans run different layers, so each sub-span's
        pieces go through their own forward, one after the other (one pass in the counts)."""
        spans = {id(work.span or self.span): work.span or self.span for work, _ in pieces}
        if len(spans) == 1:
            return self._forward_span(next(iter(spans.values())), pieces)
        results: list[swarm_pb2.StepResult | StepFailed | None] = [None] * len(pieces)
        for key, span in spans.items():
            indexes = [i for i, (work, _) in enumerate(pieces) if id(work.span or self.span) == key]
            for i, result in zip(
                indexes, self._forward_span(span, [pieces[i] for i in indexes]), strict=True
            ):
                results[i] = result
        return results

    def _forward_span(
        self, span: BlockSpan, pieces: list[tuple[StepWork, int]]
    ) -> list[swarm_pb2.StepResult | StepFailed | None]:
        inputs = torch.cat([work.inputs[work.done : work.done + count] for work, count in pieces])
        lengths = [count for _, count in pieces]
        hidden = span(inputs, [work.session.cache for work, _ in pieces], lengths)
        # One LM-head matmul for every session that samples in this pass: the head is the
        # biggest weight of the last span, and reading it once per session would make its cost
        # grow linearly with the batch (at 8 sessions, ~3x the whole pass). Rows are the last token of
        # each, plus every row of this chunk whose next token is known for steps that score
        # their tokens (`Step.prompt_logprobs`: all rows but the step's last). A row's logits
        # depend on that row alone, so one session's NaN stays in its own rows.
        logits_of: dict[int, torch.Tensor] = {}
        scored_of: dict[int, torch.Tensor] = {}
        if span.is_last:
            head_rows: list[int] = []
            sample_at, score_at = [], []
            offset = 0
            for index, (work, length) in enumerate(pieces):
                if work.prompt_logprobs is not None:
                    known = min(length, work.remaining - 1)
                    score_at.append((index, len(head_rows), known))
                    head_rows.extend(range(offset, offset + known))
                offset += length
                if work.sample and work.remaining == length:
                    sample_at.append((index, len(head_rows)))
                    head_rows.append(offset - 1)
            if head_rows:
                logits = span.logits(hidden[head_rows])
                logits_of = {index: logits[at] for index, at in sample_at}
                scored_of = {index: logits[at : at + known] for index, at, known in score_at}
        results: list[swarm_pb2.StepResult | StepFailed | None] = []
        offset = 0
        for index, (work, length) in enumerate(pieces):
            rows = hidden[offset : offset + length]
            offset += length
            work.session.history.extend(work.token_ids[work.done : work.done + length])
            try:
                result = self._finish(span, work, length, rows, logits_of.get(index), scored_of.get(index))
            except StepFailed as exc:
                result = exc
            except ValueError as exc:  # the sampler refuses what it was given (see peer.sampling)
                result = StepFailed(str(exc), bad_input=True)
            except Exception as exc:  # noqa: BLE001 - a bug here fails this session's step, not the pass
                log.exception("a session's step failed after its forward pass")
                result = StepFailed(f"{type(exc).__name__}: {exc}", bad_input=False)
            results.append(result)
        return results

    def _finish(
        self,
        span: BlockSpan,
        work: StepWork,
        length: int,
        rows: torch.Tensor,
        logits: torch.Tensor | None,
        scored: torch.Tensor | None,
    ) -> swarm_pb2.StepResult | None:
        """One session's part of a pass, after the shared forward: its prompt scores, its sample
        and its `StepResult` (None while chunks remain). Raises for this session alone."""
        session = work.session
        if scored is not None:
            if not bool(torch.isfinite(scored).all()):
                raise StepFailed(
                    "the step's logits are not finite (NaN or infinity in its hidden states)", bad_input=True
                )
            following = work.token_ids[work.done + 1 : work.done + 1 + scored.shape[0]]
            for token_id, (logprob, top) in zip(
                following, prompt_logprobs(scored, following, work.prompt_logprobs), strict=True
            ):
                work.scored.append((token_id, logprob, top))
        work.done += length
        if work.remaining > 0:
            if not span.is_last:
                work.outputs.append(rows)
            return None
        result = swarm_pb2.StepResult(cache_length=session.cache.length)
        if not span.is_last:
            rows = torch.cat([*work.outputs, rows]) if work.outputs else rows
            result.hidden.CopyFrom(tensor_codec.encode(rows, session.wire_dtype))
        elif work.sample:
            sample = session.sampler.sample(  # ValueError for non-finite logits
                logits, session.history, work.allowed, penalty_start=session.penalty_start
            )
            result.token_id = sample.token_id
            result.logprob = sample.logprob
            for token_id, logprob in sample.top_logprobs:
                result.top_logprobs.add(token_id=token_id, logprob=logprob)
        for token_id, logprob, top in work.scored:
            entry = result.prompt_logprobs.add(token_id=token_id, logprob=logprob)
            for alt_id, alt_logprob in top:
                entry.top_logprobs.add(token_id=alt_id, logprob=alt_logprob)
        return result

"""The block peer: a gRPC server that holds one span of blocks and runs it for many sessions.

Concurrency contract
--------------------
* Every `Inference` stream is one session. Its handler runs on the asyncio loop, validates each
  message and hands the tensor work to the `BatchScheduler`.
* The scheduler owns the model and every KV cache while a forward pass runs: all torch work happens
  in its single worker thread, so caches need no locks. Steps of different sessions that are
  waiting at the same moment run as one packed forward pass (continuous batching); a session has
  at most one step in flight because the gateway waits for each result.
* Session bookkeeping (open, close, truncate) happens on the loop, never while that session's step
  is in flight. The KV budget, idle sessions and eviction live in `peer.memory.SessionTable`.
* Chunked prefill: a pass holds at most `max_batch_tokens` tokens. Steps are packed shortest
  first, so every waiting decode step gets in; a long prompt fills what is left and its rest
  waits for the next pass, interleaved with everyone's decoding instead of stalling it. What a
  step returns is built when its last chunk has run: the hidden rows of every chunk (`_Work.outputs`)
  and, for `Step.prompt_logprobs`, the scores of every chunk's rows (`_Work.scored`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from peer import tensor_codec
from peer.batch_window import BatchWindow
from peer.kv_cache import KVCache
from peer.memory import BudgetExhausted, SessionTable
from peer.metrics import attach_metrics, bind_request_id
from peer.model import BlockSpan
from peer.sampling import MAX_TOP_LOGPROBS, Sampler, SamplingParams, prompt_logprobs
from protos import swarm_pb2, swarm_pb2_grpc

log = logging.getLogger("peer")

VERSION = "0.1.0"
WITHDRAW_TIMEOUT_S = 2.0
MERGE_WAIT_MAX_S = 0.25  # the longest a pass waits for active sessions (see BatchScheduler._gather)


@dataclass
class PeerConfig:
    model_dir: Path
    model_id: str
    start: int
    end: int
    host: str = "127.0.0.1"
    port: int = 0
    announce_host: str | None = None  # address other machines reach this peer at
    dht_bootstrap: list[tuple[str, int]] = field(default_factory=list)
    dht_port: int = 0
    dtype: torch.dtype = torch.float32
    quant: str = "none"
    device: str = "cpu"
    wire_dtype: torch.dtype | None = None  # dtype of hidden states we send; None = compute dtype
    cache_tokens: int = 0  # KV budget in tokens over all sessions; 0 = derive from free memory
    cache_bytes: int = 0  # the same budget in bytes (used when cache_tokens is 0)
    open_wait: float = 5.0  # seconds an open waits for cache room before RESOURCE_EXHAUSTED
    idle_ttl: float = 300.0  # seconds a closed session's cache is kept for resumption (0: never)
    # tokens per forward pass; longer prefills are chunked. Every decoding stream waits for a pass:
    # 512 tokens of the bench model take ~0.5 s on one CPU core, 256 half that, for the same tokens/s
    # at 16 streams (docs/benchmarks-batching.md)
    max_batch_tokens: int = 256
    batch_wait_ms: float = 3.0  # how long a pass waits for steps of active sessions still in flight
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    prepack: bool = False  # a oneDNN-packed copy of fp32 CPU weights for batched passes (peer.gemm)
    pipeline_groups: int = 1  # first span: sessions take turns in this many groups (BatchScheduler._gather)
    heartbeat: float = 5.0
    ttl: float = 15.0
    drain_timeout: float = 30.0
    metrics_port: int | None = None  # HTTP port of /metrics: None = off, 0 = any free port
    peer_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class StepError(Exception):
    """A step the client got wrong; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Session:
    session_id: str
    cache: KVCache
    sampler: Sampler | None
    max_length: int
    wire_dtype: torch.dtype
    history: list[int] = field(default_factory=list)  # token ids the cache holds, for penalties
    penalty_start: int = 0  # presence/frequency penalties count history[penalty_start:] (the prompt length)
    reserved: int = 0  # cache tokens the budget holds for this session (see peer.memory)
    idle_since: float = 0.0
    in_forward: bool = False  # a forward pass on this cache is running in the worker thread


@dataclass
class _Work:
    session: Session
    inputs: torch.Tensor  # [T] token ids or [T, hidden]
    token_ids: list[int]
    sample: bool
    allowed: list[int]
    future: asyncio.Future
    done: int = 0  # tokens already run (chunked prefill)
    outputs: list[torch.Tensor] = field(default_factory=list)  # hidden rows of earlier chunks
    # last span, `Step.prompt_logprobs`: alternatives wanted per token, and (token, logprob, top)
    # of every row scored so far (all chunks)
    prompt_logprobs: int | None = None
    scored: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    pass_id: int = 0  # later spans: the route's first span's pass this step belongs to (0: unknown)

    @property
    def remaining(self) -> int:
        return len(self.token_ids) - self.done


class BatchScheduler:
    """Packs the steps that are waiting into one forward pass, run in a single worker thread."""

    def __init__(self, span: BlockSpan, max_batch_tokens: int, batch_wait_ms: float = 0.0, groups: int = 1):
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
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._carry: list[_Work] = []  # prefills with chunks still to run
        # Pipeline groups (first span only, see `_gather`): session (by object id) -> its group,
        # and the steps of other groups that wait for their own pass.
        self.groups = groups if span.is_first else 1
        self._group_of: dict[int, int] = {}
        self._deferred: list[_Work] = []
        self._last_group = -1
        # Pass ids sent on to later spans (`StepResult.pass_id`): unique to this peer's passes.
        self._pass_ids = itertools.count(int.from_bytes(os.urandom(5), "big") << 20)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task | None = None
        self.steps = 0  # forward passes
        self.tokens = 0
        self.observe = None  # called with (sessions, tokens, seconds) after each forward pass
        self.session_steps = 0  # finished steps of sessions; > steps when passes were shared

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, work: _Work) -> swarm_pb2.StepResult:
        self._window.arrived(work.session)
        self._queue.put_nowait(work)
        return await work.future

    def _pack(self, waiting: list[_Work]) -> tuple[list[tuple[_Work, int]], list[_Work]]:
        """Choose (work, tokens) pieces for one pass; the rest waits. Shortest first, so decode
        steps never wait behind a long prompt; a prompt is cut to what the pass has room for."""
        pieces: list[tuple[_Work, int]] = []
        rest: list[_Work] = []
        room = self.max_batch_tokens
        for work in sorted(waiting, key=lambda w: w.remaining):
            if work.future.done():
                continue
            cache = work.session.cache
            if cache.max_capacity is not None and cache.length + work.remaining > cache.max_capacity:
                # caught here so one session's overflow fails its own step, not the whole pack
                work.future.set_exception(
                    StepError(grpc.StatusCode.INVALID_ARGUMENT, "step exceeds the session's max_length")
                )
                continue
            if room <= 0:
                rest.append(work)
                continue
            count = min(room, work.remaining)
            pieces.append((work, count))
            room -= count
        return pieces, rest

    def forget(self, session: Session) -> None:
        """The session's stream ended: stop expecting its steps (see `BatchWindow`)."""
        self._window.forget(session)
        self._group_of.pop(id(session), None)

    def _group(self, session: Session) -> int:
        """The session's pipeline group; a new session joins the group with the fewest."""
        key = id(session)
        if key not in self._group_of:
            sizes = [0] * self.groups
            for group in self._group_of.values():
                sizes[group] += 1
            self._group_of[key] = sizes.index(min(sizes))
        return self._group_of[key]

    async def _gather(self) -> list[_Work]:
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
            waiting.append(await self._queue.get())
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        if self.batch_wait <= 0 and self.groups == 1:
            return waiting
        # Only the first span merges groups: if every peer of a route waited for sessions queued
        # at the others, they would all wait for each other. Later spans wait for the rest of the
        # pass the arrived steps came with, which the gateway sends on one after the other.
        expected = self._window.expected((work.session for work in waiting), same_pass=not self.span.is_first)
        group = None
        if self.groups > 1:
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
            begin = time.perf_counter()
            for work, _ in pieces:
                work.session.in_forward = True
            pass_id = next(self._pass_ids)
            try:
                results = await loop.run_in_executor(self._executor, self._forward, pieces)
            except Exception as exc:  # a bug or OOM must fail these steps, not the peer
                log.exception("forward pass failed")
                for work, _ in pieces:
                    if not work.future.done():
                        work.future.set_exception(StepError(grpc.StatusCode.INTERNAL, f"forward failed: {exc}"))
                continue
            finally:
                for work, _ in pieces:
                    work.session.in_forward = False
            self.steps += 1
            batch_tokens = sum(count for _, count in pieces)
            self.tokens += batch_tokens
            if self.observe is not None:
                self.observe(len(pieces), batch_tokens, time.perf_counter() - begin)
            for (work, _), result in zip(pieces, results, strict=True):
                if work.future.done():
                    continue
                if result is None:  # more chunks to go
                    self._carry.append(work)
                else:
                    self.session_steps += 1
                    # A later span groups sessions as the route's first span did, so that the
                    # groups a pipeline keeps (`--pipeline-groups`) stay apart here too.
                    result.pass_id = work.pass_id or pass_id
                    self._window.stepped(work.session, cohort=result.pass_id)
                    work.future.set_result(result)

    @torch.inference_mode()
    def _forward(self, pieces: list[tuple[_Work, int]]) -> list[swarm_pb2.StepResult | None]:
        span = self.span
        inputs = torch.cat([work.inputs[work.done : work.done + count] for work, count in pieces])
        lengths = [count for _, count in pieces]
        hidden = span(inputs, [work.session.cache for work, _ in pieces], lengths)
        # One LM-head matmul for every session that samples in this pass: the head is the
        # biggest weight of the last span, and reading it once per session made its cost grow
        # linearly with the batch (8 sessions: ~3x the whole pass). Rows are the last token of
        # each, plus every row of this chunk whose next token is known for steps that score
        # their tokens (`Step.prompt_logprobs`: all rows but the step's last).
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
        results: list[swarm_pb2.StepResult | None] = []
        offset = 0
        for index, (work, length) in enumerate(pieces):
            session = work.session
            session.history.extend(work.token_ids[work.done : work.done + length])
            rows = hidden[offset : offset + length]
            offset += length
            if index in scored_of:
                scores = scored_of[index]
                following = work.token_ids[work.done + 1 : work.done + 1 + scores.shape[0]]
                for token_id, (logprob, top) in zip(
                    following, prompt_logprobs(scores, following, work.prompt_logprobs), strict=True
                ):
                    work.scored.append((token_id, logprob, top))
            work.done += length
            if work.remaining > 0:
                if not span.is_last:
                    work.outputs.append(rows)
                results.append(None)
                continue
            result = swarm_pb2.StepResult(cache_length=session.cache.length)
            if not span.is_last:
                rows = torch.cat([*work.outputs, rows]) if work.outputs else rows
                result.hidden.CopyFrom(tensor_codec.encode(rows, session.wire_dtype))
            elif work.sample:
                sample = session.sampler.sample(
                    logits_of[index], session.history, work.allowed or None, penalty_start=session.penalty_start
                )
                result.token_id = sample.token_id
                result.logprob = sample.logprob
                for token_id, logprob in sample.top_logprobs:
                    result.top_logprobs.add(token_id=token_id, logprob=logprob)
            for token_id, logprob, top in work.scored:
                entry = result.prompt_logprobs.add(token_id=token_id, logprob=logprob)
                for alt_id, alt_logprob in top:
                    entry.top_logprobs.add(token_id=alt_id, logprob=alt_logprob)
            results.append(result)
        return results


class PeerServicer(swarm_pb2_grpc.PeerServicer):
    def __init__(self, config: PeerConfig, span: BlockSpan, scheduler: BatchScheduler, cache_tokens: int):
        self.config = config
        self.span = span
        self.scheduler = scheduler
        self.cache_tokens = cache_tokens
        self.table = SessionTable(cache_tokens, idle_ttl=config.idle_ttl, open_wait=config.open_wait)
        self.draining = False
        self.throughput = 0.0
        self.all_closed = asyncio.Event()
        self.all_closed.set()

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def sessions(self) -> dict[int, Session]:
        """Live sessions (those with an open stream)."""
        return self.table.live

    @property
    def free_cache_tokens(self) -> int:
        return self.table.free_tokens

    async def _open(self, request: swarm_pb2.OpenSession) -> tuple[Session, int]:
        """Admit a session within the KV budget; returns it and the tokens its cache holds."""
        cfg = self.config
        if self.draining:
            raise StepError(grpc.StatusCode.UNAVAILABLE, "peer is shutting down; open the session elsewhere")
        if (request.start_block, request.end_block) != (cfg.start, cfg.end):
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this peer serves blocks [{cfg.start}, {cfg.end}), not [{request.start_block}, {request.end_block})",
            )
        max_positions = self.span.config.max_position_embeddings
        if not 0 < request.max_length <= max_positions:
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT, f"max_length must be in [1, {max_positions}], got {request.max_length}"
            )
        # The client's choice wins; else this peer's --wire-dtype; else its compute dtype. Whatever
        # arrives is converted to the compute dtype in _prepare_step, so mixed swarms just work.
        wire_dtype = self.config.wire_dtype or self.span.dtype
        if request.wire_dtype:
            if request.wire_dtype not in tensor_codec.DTYPES:
                raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown wire_dtype {request.wire_dtype!r}")
            wire_dtype = tensor_codec.DTYPES[request.wire_dtype]
        sampler = None
        if self.span.is_last:
            try:
                sampler = Sampler(_sampling_params(request.sampling, self.span.config.vocab_size))
            except ValueError as exc:
                raise StepError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        session_id = request.session_id or uuid.uuid4().hex

        def make() -> Session:
            return Session(
                session_id=session_id,
                cache=self.span.new_cache(max_capacity=request.max_length),
                sampler=sampler,
                max_length=request.max_length,
                wire_dtype=wire_dtype,
                penalty_start=max(0, request.sampling.penalty_start),
            )

        resume = request.resume and bool(request.session_id)
        try:
            session, resumed = await self.table.admit(request.max_length, session_id, resume, make)
        except BudgetExhausted as exc:
            raise StepError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        held = 0
        if resumed:
            # Keep only the prefix the caller's sequence shares with what the cache holds.
            held = _common_prefix(session.history, request.resume_tokens)
            held = min(held, session.cache.length, request.max_length - 1)
            session.cache.truncate(held)
            del session.history[held:]
            session.cache.max_capacity = max(request.max_length, session.cache.capacity)
            session.sampler = sampler
            session.max_length = request.max_length
            session.wire_dtype = wire_dtype
            session.penalty_start = max(0, request.sampling.penalty_start)
        self.all_closed.clear()
        log.info(
            "session opened",
            extra={"session": session_id, "max_length": request.max_length, "resumed": resumed, "held": held},
        )
        return session, held

    def _close(self, session: Session, keep: bool = True) -> None:
        # The cache itself is freed when the last reference goes: a forward pass already running
        # in the worker thread may still hold this session.
        self.table.release(session, keep=keep and not self.draining)
        self.scheduler.forget(session)
        log.info("session closed", extra={"session": session.session_id, "tokens": session.cache.length})
        if not self.table.live:
            self.all_closed.set()

    def _prepare_step(self, session: Session, step: swarm_pb2.Step) -> _Work:
        span = self.span
        token_ids = list(step.token_ids)
        count = len(token_ids)
        if count == 0:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "a step needs at least one token id")
        if not 0 <= step.position <= session.cache.length:
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"position {step.position} is past the {session.cache.length} tokens in cache",
            )
        if step.position + count > session.max_length:
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"step would hold {step.position + count} tokens, past the session's max_length {session.max_length}",
            )
        vocab = span.config.vocab_size
        if any(not 0 <= token < vocab for token in token_ids):
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"token ids must be in [0, {vocab})")
        if step.sample and not span.is_last:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "only the last span samples")
        scoring = None
        if step.HasField("prompt_logprobs"):
            if not span.is_last:
                raise StepError(
                    grpc.StatusCode.INVALID_ARGUMENT, "only the last span returns prompt logprobs"
                )
            if not 0 <= step.prompt_logprobs <= MAX_TOP_LOGPROBS:
                raise StepError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {step.prompt_logprobs}",
                )
            scoring = step.prompt_logprobs
        if span.is_first:
            if step.HasField("hidden"):
                raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "the first span takes token ids, not hidden states")
            inputs = torch.tensor(token_ids, dtype=torch.long)
        else:
            if not step.HasField("hidden"):
                raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "this span needs hidden states")
            try:
                inputs = tensor_codec.decode(step.hidden)
            except tensor_codec.CodecError as exc:
                raise StepError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            expected = (count, span.config.hidden_size)
            if tuple(inputs.shape) != expected:
                raise StepError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"hidden states must have shape {list(expected)}, got {list(inputs.shape)}",
                )
            inputs = inputs.to(span.dtype)
        if any(not 0 <= token < vocab for token in step.allowed_token_ids):
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"allowed token ids must be in [0, {vocab})")
        if step.position < session.cache.length:
            session.cache.truncate(step.position)
            del session.history[step.position :]
        return _Work(
            session=session,
            inputs=inputs,
            token_ids=token_ids,
            sample=step.sample,
            allowed=list(step.allowed_token_ids),
            future=asyncio.get_running_loop().create_future(),
            prompt_logprobs=scoring,
            pass_id=step.pass_id,
        )

    # -- RPCs --------------------------------------------------------------------------------
    async def Inference(self, request_iterator, context: grpc.aio.ServicerContext):
        session: Session | None = None
        bind_request_id(context)  # log lines of this stream carry the gateway's request id
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("kind")
                try:
                    if kind == "open":
                        if session is not None:
                            raise StepError(grpc.StatusCode.FAILED_PRECONDITION, "this stream already has a session")
                        session, held = await self._open(request.open)
                        yield swarm_pb2.InferenceResponse(
                            opened=swarm_pb2.Opened(peer_id=self.config.peer_id, cache_length=held)
                        )
                    elif kind == "step":
                        if session is None:
                            raise StepError(grpc.StatusCode.FAILED_PRECONDITION, "open a session before stepping")
                        result = await self.scheduler.submit(self._prepare_step(session, request.step))
                        result.draining = self.draining  # asks the gateway to move this session
                        yield swarm_pb2.InferenceResponse(result=result)
                    elif kind == "close":
                        break
                    else:
                        raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "empty request")
                except StepError as exc:
                    await context.abort(exc.code, exc.message)
        finally:
            if session is not None:
                # Kept idle whether the stream closed or broke: a resume compares token ids, so
                # a cache the caller is unsure of is still safe to offer.
                self._close(session)

    async def Info(self, request, context):
        return swarm_pb2.InfoResponse(
            peer_id=self.config.peer_id,
            model=self.config.model_id,
            start_block=self.config.start,
            end_block=self.config.end,
            num_blocks=self.span.config.num_hidden_layers,
            dtype=tensor_codec.DTYPE_NAMES.get(self.span.dtype, str(self.span.dtype)),
            quant=self.config.quant,
            live_sessions=len(self.sessions),
            free_cache_tokens=self.free_cache_tokens,
            throughput=self.throughput,
            version=VERSION,
            state="draining" if self.draining else "online",
            idle_sessions=len(self.table.idle),
            cache_budget_tokens=self.cache_tokens,
            tokens_processed=self.scheduler.tokens,
            forward_passes=self.scheduler.steps,
            steps=self.scheduler.session_steps,
            evictions=self.table.evictions,
        )


def _common_prefix(a: list[int], b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _sampling_params(message: swarm_pb2.SamplingParams, vocab_size: int) -> SamplingParams:
    bias = {int(token): float(value) for token, value in message.logit_bias.items()}
    if any(not 0 <= token < vocab_size for token in bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    return SamplingParams(
        temperature=message.temperature,
        top_p=message.top_p if message.top_p > 0 else 1.0,
        top_k=message.top_k,
        min_p=message.min_p,
        repetition_penalty=message.repetition_penalty if message.repetition_penalty > 0 else 1.0,
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        logit_bias=bias,
        seed=message.seed if message.HasField("seed") else None,
        logprobs=message.logprobs,
        top_logprobs=message.top_logprobs,
    )


def cache_budget_tokens(span: BlockSpan, cache_tokens: int = 0, cache_bytes: int = 0) -> int:
    """The KV budget in tokens: `--cache-tokens`, else `--cache-bytes`, else from free memory."""
    if cache_tokens:
        return cache_tokens
    if cache_bytes:
        return max(1, cache_bytes // span.new_cache(capacity=1).bytes_per_token)
    return default_cache_tokens(span)


def default_cache_tokens(span: BlockSpan) -> int:
    """Half of the memory that is free now, in tokens of this span's KV cache."""
    bytes_per_token = span.new_cache(capacity=1).bytes_per_token
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = 4 << 30
    return max(4096, pages // 2 // max(1, bytes_per_token))


@torch.inference_mode()
def measure_throughput(span: BlockSpan, steps: int = 8) -> float:
    """Decode tokens/s of this span at batch 1, as announced in the DHT for route planning."""
    cache = span.new_cache()
    hidden = span.config.hidden_size
    make_input = (
        (lambda: torch.zeros(1, dtype=torch.long)) if span.is_first else (lambda: torch.zeros(1, hidden, dtype=span.dtype))
    )
    span(make_input(), [cache], [1])  # warm-up
    begin = time.perf_counter()
    for _ in range(steps):
        out = span(make_input(), [cache], [1])
        if span.is_last:
            span.logits(out)
    return steps / max(1e-9, time.perf_counter() - begin)


class PeerServer:
    """Loads the span, serves gRPC, announces in the DHT; `stop()` drains and withdraws."""

    def __init__(self, config: PeerConfig):
        self.config = config
        self.server: grpc.aio.Server | None = None
        self.servicer: PeerServicer | None = None
        self.scheduler: BatchScheduler | None = None
        self.dht = None
        self.announcer = None
        self.metrics = None
        self.port = 0

    async def start(self) -> None:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        loop = asyncio.get_running_loop()
        span = await loop.run_in_executor(
            None, lambda: BlockSpan.load(
                cfg.model_dir, cfg.start, cfg.end, dtype=cfg.dtype, device=cfg.device, quant=cfg.quant,
                prepack=cfg.prepack,
            )
        )
        if not (0 <= cfg.start < cfg.end <= span.config.num_hidden_layers):
            raise ValueError(f"blocks [{cfg.start}, {cfg.end}) are outside the model's {span.config.num_hidden_layers}")
        cache_tokens = cache_budget_tokens(span, cfg.cache_tokens, cfg.cache_bytes)
        self.scheduler = BatchScheduler(span, cfg.max_batch_tokens, cfg.batch_wait_ms, cfg.pipeline_groups)
        self.scheduler.start()
        self.servicer = PeerServicer(cfg, span, self.scheduler, cache_tokens)
        self.servicer.throughput = await loop.run_in_executor(None, measure_throughput, span)
        self.metrics = attach_metrics(self)  # /metrics on --metrics-port, and the scheduler's hook
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        )
        swarm_pb2_grpc.add_PeerServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        await self.server.start()
        log.info(
            "peer %s serving %s blocks [%d, %d) on %s:%d (%s, quant %s, %.1f MB weights/block, %.1f tok/s, "
            "cache budget %d tokens)",
            cfg.peer_id, cfg.model_id, cfg.start, cfg.end, cfg.host, self.port, span.dtype, cfg.quant,
            span.weight_bytes()["per_block"] / 1e6, self.servicer.throughput, cache_tokens,
        )  # fmt: skip
        if cfg.dht_bootstrap is not None:
            await self._join_dht()

    @property
    def address(self) -> str:
        host = self.config.announce_host or self.config.host
        return f"{host}:{self.port}"

    def record(self):
        from discovery.records import PeerRecord

        servicer = self.servicer
        return PeerRecord(
            peer_id=self.config.peer_id,
            address=self.address,
            model=self.config.model_id,
            start=self.config.start,
            end=self.config.end,
            num_blocks=servicer.span.config.num_hidden_layers,
            dtype=tensor_codec.DTYPE_NAMES.get(servicer.span.dtype, "float32"),
            quant=self.config.quant,
            throughput=servicer.throughput,
            free_cache_tokens=servicer.free_cache_tokens,
            live_sessions=len(servicer.sessions),
            state="draining" if servicer.draining else "online",
            version=VERSION,
            expires_at=time.time() + self.config.ttl,
            metrics_port=self.metrics.port if self.metrics else 0,
        )

    async def _join_dht(self) -> None:
        from discovery.announcer import Announcer
        from discovery.dht import SwarmDHT

        self.dht = SwarmDHT()
        await self.dht.start(self.config.host, self.config.dht_port, self.config.dht_bootstrap)
        self.announcer = Announcer(self.dht, self.record, heartbeat=self.config.heartbeat, ttl=self.config.ttl)
        await self.announcer.start()

    async def stop(self) -> None:
        """Graceful: refuse new sessions and announce "draining" in the DHT at once; flag every
        step result so gateways move live sessions elsewhere (they replay them on a replacement);
        wait until those sessions close or the drain timeout runs out; withdraw; exit."""
        if self.servicer is not None:
            self.servicer.draining = True
            self.servicer.table.drop_idle()
        if self.announcer is not None:
            try:
                await asyncio.wait_for(self.announcer.announce_now(), WITHDRAW_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the DHT may be gone; draining goes on
                log.warning("could not announce draining: %s", exc)
        if self.servicer is not None and self.servicer.sessions:
            log.info("draining %d live session(s) for up to %.0f s", len(self.servicer.sessions), self.config.drain_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.servicer.all_closed.wait(), self.config.drain_timeout)
        if self.announcer is not None:
            # Best effort and bounded: with parts of the swarm gone, a withdraw waits on dead
            # nodes; the record's own expiry removes it anyway.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.announcer.stop(withdraw=True), WITHDRAW_TIMEOUT_S)
        log.info("withdrawn and drained; stopping the gRPC server")
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.dht is not None:
            self.dht.stop()
        if self.metrics is not None:
            self.metrics.close()
        log.info("peer stopped")


async def run_peer(config: PeerConfig) -> None:
    """Process entry point: serve until SIGTERM or SIGINT, then stop gracefully."""
    server = PeerServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"PEER_READY {server.address}", flush=True)  # launchers and tests wait for this line
    await stop.wait()
    log.info("stopping peer %s", config.peer_id)
    await server.stop()

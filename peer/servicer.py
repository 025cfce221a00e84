"""The gRPC servicer: one `Inference` stream per session, and `Info`.

Concurrency contract
--------------------
* Every `Inference` stream is one session. Its handler runs on the asyncio loop, validates each
  message and hands the tensor work to the `BatchScheduler` (`peer.scheduler`), which owns the
  model and the caches while a pass runs.
* Validation happens here, once: whatever comes from the network (span, max_length, wire dtype,
  sampling parameters, token ids, positions, hidden states) is checked before it reaches the
  scheduler, and a bad value is answered with INVALID_ARGUMENT on this stream only. The scheduler
  and the model trust what they get, so one session's bad step never fails another's pass.
* Session bookkeeping (open, close, truncate) happens on the loop, never while that session's step
  is in flight. The KV budget, idle sessions and eviction live in `peer.memory.SessionTable`.
* No client holds the budget for nothing: a session that is not stepped within
  `first_step_timeout` seconds of its `opened` reply is closed (DEADLINE_EXCEEDED), and one client
  host (`context.peer()`) holds at most `max_sessions_per_client` sessions, opening or live
  (RESOURCE_EXHAUSTED past it).
* A session id is a capability: whoever knows it can resume its cache. Logs show a tag
  (`peer.memory.session_tag`), never the id; only a session whose client chose an id of at least
  MIN_RESUMABLE_ID_CHARS characters (the gateway's are 32 hex digits) is kept for a resume, and a
  resume reattaches only the idle cache under exactly that id.
* Push (`Step.forward`, `Peer.Push`; protos/swarm.proto): a session's steps may come on its own
  stream (from the gateway) or through `Push` (from the previous hop); either way its result is
  written to its own stream. `Session.lock` keeps one step of a session in `_prepare_step` +
  the scheduler at a time (a stale push that the gateway gave up on may still be running when the
  gateway's retry of that step arrives: the retry waits, then rewinds the cache), and
  `Session.writing` keeps the two writers of its stream apart. A pushed step that fails after it
  was accepted is answered on the stream with `StepResult.error_code` instead of ending it.
* Decode loop (`Step.loop`): the last hop of a looping chain starts pushing the next step back to
  the first hop (`_loop_back`) and writes its own answer (`looped`) while it holds its stream's
  `writing` lock, so the next step's answer, which comes back to this very stream, cannot overtake
  it. It does not wait for the push to be accepted before answering: the answers of a pass go out
  before the span's next pass begins, not during it (where the event loop's work would hold the
  GIL against the forward thread). A push that is refused or fails is answered afterwards, as the
  next step's answer with `forward_error` (`_loop_refused`). The first hop takes such a step only
  while its session's `loop_id` (set by every step the gateway sends on the stream, cleared by
  `Halt`) names that loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from common import trace
from common.logs import REQUEST_ID_HEADER, set_request_id
from discovery.records import PeerRecord
from peer import tensor_codec
from peer.forwarding import Forwarder, PushFailed, Sent, ack_for, entries_of
from peer.kv_cache import KVCache
from peer.memory import BudgetExhausted, SessionTable, session_tag
from peer.model import BlockSpan
from peer.sampling import MAX_TOP_LOGPROBS, Sampler, SamplingParams
from peer.scheduler import BatchScheduler, ForwardFailed, StepFailed, StepWork
from protos import swarm_pb2, swarm_pb2_grpc

log = logging.getLogger("peer")

MIN_RESUMABLE_ID_CHARS = 16  # a shorter session id could be guessed: such a session is never resumed
MAX_SESSION_ID_CHARS = 128


class StepError(Exception):
    """A step the client got wrong; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Session:
    """One `Inference` stream's state; its cache outlives the stream while it is kept idle."""

    session_id: str
    cache: KVCache
    sampler: Sampler | None
    max_length: int
    wire_dtype: torch.dtype
    resumable: bool = False  # the client chose an id long enough to resume by (kept idle on close)
    client: str = ""  # host of the stream's client, for --max-sessions-per-client
    history: list[int] = field(default_factory=list)  # token ids the cache holds, for penalties
    penalty_start: int = 0  # presence/frequency penalties count history[penalty_start:] (the prompt length)
    reserved: int = 0  # cache tokens the budget holds for this session (see peer.memory)
    idle_since: float = 0.0
    in_forward: bool = False  # a forward pass on this cache is running in the worker thread
    # push (see the module docstring): the id the previous hop names this session by, its stream
    # (results of pushed steps are written there), and the two locks
    push_id: str = ""
    stream: grpc.aio.ServicerContext | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)
    first_step_timer: asyncio.Timeout | None = None  # the stream's wait for a first step
    pushed_to: bool = False  # a step came through Push: the stream's first-step wait is over
    keep: bool = True  # keep the cache for a resume when the stream ends (not after a failed step)
    loop_id: int = 0  # the decode loop whose pushed-back steps this first hop takes (0: none)
    span: BlockSpan | None = None  # the blocks this session runs (a sub-span of the peer's, or all)


class PeerServicer(swarm_pb2_grpc.PeerServicer):
    """`describe` returns what this peer is (`peer.identity.describe`, given by `PeerServer`); `Info`
    answers from it. `draining` and `throughput` are set by the server and read by `describe`."""

    def __init__(
        self,
        span: BlockSpan,
        scheduler: BatchScheduler,
        *,
        peer_id: str,
        cache_tokens: int,
        describe: Callable[[], PeerRecord],
        wire_dtype: torch.dtype | None = None,
        idle_ttl: float = 300.0,
        open_wait: float = 5.0,
        first_step_timeout: float = 30.0,
        max_sessions_per_client: int = 1024,
        forwarder: Forwarder | None = None,
    ):
        if first_step_timeout < 0:
            raise ValueError(f"first_step_timeout must be >= 0 (0: off), got {first_step_timeout}")
        if max_sessions_per_client < 1:
            raise ValueError(f"max_sessions_per_client must be >= 1, got {max_sessions_per_client}")
        self.span = span
        self.scheduler = scheduler
        self.peer_id = peer_id
        self.cache_tokens = cache_tokens
        self.describe = describe
        self.wire_dtype = wire_dtype  # hidden states sent when the client names none; None = compute dtype
        self.table = SessionTable(cache_tokens, idle_ttl=idle_ttl, open_wait=open_wait)
        self.first_step_timeout = first_step_timeout
        self.max_sessions_per_client = max_sessions_per_client
        self.per_client: dict[str, int] = {}  # client host -> its sessions, opening or live
        self.draining = False
        self.throughput = 0.0
        self.moves = 0  # times the peer moved to other blocks (peer.balancer), for /metrics
        self.batching = ""  # the batching configuration and why (set by the server, shown in Info)
        self.all_closed = asyncio.Event()
        self.all_closed.set()
        self.forwarder = forwarder or Forwarder()  # pushes to next hops (peer.forwarding)
        self.push_targets: dict[str, Session] = {}  # Opened.push_id -> live session
        self.pushes_received = 0
        self.push_requests_received = 0  # requests those came in (`PushRequest.more` batches them)
        self.looped_steps = 0  # decode-loop steps this last hop pushed back to a first hop, accepted
        self._pushing: set[asyncio.Task] = set()
        self._views: dict[tuple[int, int], BlockSpan] = {}  # sub-spans that sessions run (`_sub_span`)
        self._views_of = span

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def sessions(self) -> dict[int, Session]:
        """Live sessions (those with an open stream)."""
        return self.table.live

    @property
    def free_cache_tokens(self) -> int:
        return self.table.free_tokens

    async def _open(self, request: swarm_pb2.OpenSession, client: str) -> tuple[Session, int]:
        """Admit a session within the KV budget and the client's share; returns it and the tokens
        its cache holds."""
        span = self.span
        if self.draining:
            raise StepError(grpc.StatusCode.UNAVAILABLE, "peer is shutting down; open the session elsewhere")
        if len(request.session_id) > MAX_SESSION_ID_CHARS:
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"session_id must be at most {MAX_SESSION_ID_CHARS} characters",
            )
        if not span.start <= request.start_block < request.end_block <= span.end:
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this peer serves blocks [{span.start}, {span.end}); a session may open all of them or a "
                f"non-empty part, not [{request.start_block}, {request.end_block})",
            )
        view = self._sub_span(request.start_block, request.end_block)
        max_positions = self.span.config.max_position_embeddings
        if not 0 < request.max_length <= max_positions:
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_length must be in [1, {max_positions}], got {request.max_length}",
            )
        # The client's choice wins; else this peer's --wire-dtype; else its compute dtype. Whatever
        # arrives is converted to the compute dtype in _prepare_step, so mixed swarms just work.
        wire_dtype = self.wire_dtype or self.span.dtype
        if request.wire_dtype:
            if request.wire_dtype not in tensor_codec.DTYPES:
                raise StepError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"unknown wire_dtype {request.wire_dtype!r}"
                )
            wire_dtype = tensor_codec.DTYPES[request.wire_dtype]
        sampler = None
        if view.is_last:
            try:
                sampler = Sampler(SamplingParams.from_message(request.sampling, self.span.config.vocab_size))
            except ValueError as exc:
                raise StepError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        # Only an id the client chose, long enough not to be guessed, names a resumable cache;
        # the others get an id of their own that nobody else knows, and are not kept when closed.
        resumable = len(request.session_id) >= MIN_RESUMABLE_ID_CHARS
        session_id = request.session_id if resumable else uuid.uuid4().hex
        resume = request.resume and resumable
        kept = self.table.idle.get(session_id)
        if kept is not None and kept.span is not view:
            resume = False  # its cache holds other blocks' layers: start afresh (the caller replays)

        def make() -> Session:
            return Session(
                session_id=session_id,
                cache=view.new_cache(max_capacity=request.max_length, unit_layers=span.num_layers),
                span=view,
                sampler=sampler,
                max_length=request.max_length,
                wire_dtype=wire_dtype,
                resumable=resumable,
                penalty_start=max(0, request.sampling.penalty_start),
            )

        opened = self.per_client.get(client, 0)
        if opened >= self.max_sessions_per_client:
            raise StepError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this client already has {opened} sessions open on this peer, the most one client may hold "
                "(--max-sessions-per-client); close some first",
            )
        self.per_client[client] = opened + 1  # an open that waits for room counts too
        try:
            session, resumed = await self.table.admit(
                self._budget_tokens(request.max_length, view), session_id, resume, make,
                lambda kept: kept.cache.budget_tokens(request.max_length, self.scheduler.max_batch_tokens),
            )  # fmt: skip
        except BudgetExhausted as exc:
            self._uncount(client)
            raise StepError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except BaseException:  # the stream was cancelled while it waited for room
            self._uncount(client)
            raise
        session.client = client
        session.push_id = secrets.token_hex(16)
        self.push_targets[session.push_id] = session
        held = 0
        if resumed and session.span is not view:
            # kept meanwhile by a stream of other blocks: its cache is of no use here; an empty one
            # of these blocks instead (held 0 below: the caller replays), the rest set as for a resume
            session.cache = view.new_cache(max_capacity=request.max_length, unit_layers=span.num_layers)
            session.span = view
            session.history.clear()
        if resumed:
            # Keep only the prefix the caller's sequence shares with what the cache holds.
            held = _common_prefix(session.history, request.resume_tokens)
            held = min(held, session.cache.length, request.max_length - 1)
            if not session.cache.can_truncate(held):  # window layers dropped keys: replay it all
                held = 0
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
            extra={
                "session": session_tag(session_id),
                "max_length": request.max_length,
                "resumed": resumed,
                "held": held,
            },
        )
        return session, held

    def _budget_tokens(self, max_length: int, view: BlockSpan) -> int:
        """What a session of `max_length` tokens on the blocks of `view` reserves
        (`KVCache.budget_tokens`): window layers count their trimmed store, bounded by the
        scheduler's pass size for prefill chunks; a sub-span counts its own layers only, in units
        of the whole span's token (so a session of half the blocks costs half)."""
        probe = view.new_cache(capacity=1, max_capacity=max_length, unit_layers=self.span.num_layers)
        return probe.budget_tokens(max_length, self.scheduler.max_batch_tokens)

    def _sub_span(self, start: int, end: int) -> BlockSpan:
        """The span a session of blocks [start, end) runs, shared by every session of those blocks
        (the scheduler packs the sessions of one span into one forward; `BlockSpan.narrow`)."""
        if self._views_of is not self.span:  # the peer moved (peer.balancer): views of the old span go
            self._views, self._views_of = {}, self.span
        key = (start, end)
        if key not in self._views:
            self._views[key] = self.span.narrow(start, end)
        return self._views[key]

    def _close(self, session: Session, keep: bool = True) -> None:
        # The cache itself is freed when the last reference goes: a forward pass already running
        # in the worker thread may still hold this session.
        self.table.release(session, keep=keep and session.keep and session.resumable and not self.draining)
        self.push_targets.pop(session.push_id, None)
        session.stream = None
        self.scheduler.forget(session)
        self._uncount(session.client)
        log.info(
            "session closed",
            extra={"session": session_tag(session.session_id), "tokens": session.cache.length},
        )
        if not self.table.live:
            self.all_closed.set()

    def _uncount(self, client: str) -> None:
        left = self.per_client.pop(client, 0) - 1
        if left > 0:
            self.per_client[client] = left

    def _prepare_step(self, session: Session, step: swarm_pb2.Step) -> StepWork:
        """Check a step against the session and the span (StepError: INVALID_ARGUMENT), rewind the
        cache to its position, and build the scheduler's work item."""
        span = session.span or self.span
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
                raise StepError(
                    grpc.StatusCode.INVALID_ARGUMENT, "the first span takes token ids, not hidden states"
                )
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
            # In the compute dtype: fp32 values past fp16's range become infinite here. A NaN row
            # would only poison this session (rows never mix), but it is the caller's error.
            if not bool(torch.isfinite(inputs).all()):
                raise StepError(
                    grpc.StatusCode.INVALID_ARGUMENT, "hidden states must be finite (got NaN or infinity)"
                )
        allowed = _allowed_tokens(step, vocab)
        if step.position < session.cache.length:
            if not session.cache.can_truncate(step.position):
                raise StepError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"cannot rewind to position {step.position}: sliding-window layers no longer hold "
                    "the keys it needs; replay the session from position 0",
                )
            session.cache.truncate(step.position)
            del session.history[step.position :]
        return StepWork(
            session=session,
            inputs=inputs,
            token_ids=token_ids,
            sample=step.sample,
            allowed=allowed,
            future=asyncio.get_running_loop().create_future(),
            prompt_logprobs=scoring,
            pass_id=step.pass_id,
            span=session.span,
        )

    # -- RPCs --------------------------------------------------------------------------------
    async def Inference(self, request_iterator, context: grpc.aio.ServicerContext):
        session: Session | None = None
        keep = True  # keep the cache for a resume when the stream ends
        first_step_due: float | None = None  # loop time by which an opened session must step
        bind_request_id(context)  # log lines of this stream carry the gateway's request id
        client = client_host(context.peer())
        # context.read()/write() rather than iterating `request_iterator` and yielding: no async
        # generator between gRPC and this loop, and no timeout scope once the session has stepped
        # (docs/benchmarks-batching.md, the per-hop cost)
        try:
            while True:
                try:
                    if first_step_due is None or session.pushed_to:
                        request = await context.read()
                    else:
                        # a first step that comes through Push ends this wait (`_accept_push`)
                        async with asyncio.timeout_at(first_step_due) as timer:
                            session.first_step_timer = timer
                            request = await context.read()
                        session.first_step_timer = None
                except TimeoutError:
                    # Opened and never stepped: its reservation would hold the budget for nothing.
                    log.info(
                        "session not stepped in time", extra={"session": session_tag(session.session_id)}
                    )
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no step within {self.first_step_timeout:g} s of the open "
                        "(--first-step-timeout): the session was closed and its cache room released",
                    )
                if request is grpc.aio.EOF:
                    break
                kind = request.WhichOneof("kind")
                try:
                    if kind == "open":
                        if session is not None:
                            raise StepError(
                                grpc.StatusCode.FAILED_PRECONDITION, "this stream already has a session"
                            )
                        session, held = await self._open(request.open, client)
                        session.stream = context
                        if self.first_step_timeout > 0:
                            first_step_due = asyncio.get_running_loop().time() + self.first_step_timeout
                        await context.write(
                            swarm_pb2.InferenceResponse(
                                opened=swarm_pb2.Opened(
                                    peer_id=self.peer_id, cache_length=held, push_id=session.push_id
                                )
                            )
                        )
                    elif kind == "step":
                        if session is None:
                            raise StepError(
                                grpc.StatusCode.FAILED_PRECONDITION, "open a session before stepping"
                            )
                        first_step_due = None
                        trace.mark("peer.step_in")
                        step = request.step
                        own, onward = _split(step)
                        # the gateway's own step starts or ends a decode loop here (see Step.loop)
                        session.loop_id = step.loop.id if step.HasField("loop") else 0
                        async with session.lock:
                            result = await self.scheduler.submit(self._prepare_step(session, own))
                        result.draining = self.draining  # asks the gateway to move this session
                        result.seq = step.seq
                        if onward is not None:
                            await self._forward(step, onward, result, session)
                        await self._answer(session, context, step, result, last=onward is None, wait=False)
                    elif kind == "halt":
                        if session is not None:
                            session.loop_id = 0
                    elif kind == "close":
                        break
                    else:
                        raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "empty request")
                except StepError as exc:
                    await context.abort(exc.code, exc.message)
                except StepFailed as exc:  # this session's step alone; its pass went on
                    keep = False  # its cache may hold what the failed step wrote
                    code = grpc.StatusCode.INVALID_ARGUMENT if exc.bad_input else grpc.StatusCode.INTERNAL
                    await context.abort(code, f"step failed: {exc}")
                except ForwardFailed as exc:
                    await context.abort(grpc.StatusCode.INTERNAL, f"forward failed: {exc}")
        finally:
            if session is not None:
                # Kept idle whether the stream closed or broke: a resume compares token ids, so
                # a cache the caller is unsure of is still safe to offer.
                self._close(session, keep=keep)

    async def Push(self, request_iterator, context: grpc.aio.ServicerContext):
        """Steps from a previous hop of push chains (one stream per pushing peer, any sessions):
        each is validated and queued, then acknowledged in order (`PushAck.code` 0); one that
        cannot be accepted is acked with its status, and the stream goes on. A request may carry
        a pass's steps (`PushRequest.more`), answered by one ack. Results go to the gateway on
        each session's own stream (`_finish_push`)."""
        while True:
            request = await context.read()
            trace.mark("peer.push_in")
            if request is grpc.aio.EOF:
                return
            self.push_requests_received += 1
            verdicts = []
            for push_id, step in entries_of(request):
                try:
                    await self._accept_push(push_id, step)
                    verdicts.append(swarm_pb2.PushVerdict())
                except StepError as exc:
                    verdicts.append(swarm_pb2.PushVerdict(code=exc.code.value[0], message=exc.message))
            trace.mark("peer.push_accepted")
            await context.write(ack_for(verdicts))

    async def _accept_push(self, push_id: str, step: swarm_pb2.Step) -> None:
        """Validate and queue a pushed step (StepError when refused). The session's lock is held
        from here until the scheduler has run it; it is free unless a step the gateway gave up
        on still runs (then this stream's later pushes wait for that one step too)."""
        session = self.push_targets.get(push_id)
        if session is None:
            raise StepError(
                grpc.StatusCode.NOT_FOUND, "no live session has this push_id (closed, or not opened here)"
            )
        own, onward = _split(step)
        # only a decode loop pushes to a route's first hop, and only the loop its gateway runs now
        if (session.span or self.span).is_first and (not step.loop.id or step.loop.id != session.loop_id):
            raise StepError(
                grpc.StatusCode.ABORTED,
                "this session runs no such decode loop (the gateway halted it or sent a step since)",
            )
        await session.lock.acquire()
        try:
            if session.stream is None:
                raise StepError(grpc.StatusCode.NOT_FOUND, "the session closed")
            work = self._prepare_step(session, own)
        except BaseException:
            session.lock.release()
            raise
        self.pushes_received += 1  # accepted pushes only, comparable with the sender's count
        if not session.pushed_to:
            session.pushed_to = True
            if session.first_step_timer is not None:
                session.first_step_timer.reschedule(None)
        task = asyncio.get_running_loop().create_task(self._finish_push(session, work, step, onward))
        self._pushing.add(task)  # a reference, so the task is not collected while it runs
        task.add_done_callback(self._pushing.discard)

    async def _finish_push(
        self, session: Session, work: StepWork, step: swarm_pb2.Step, onward: swarm_pb2.Step | None
    ) -> None:
        try:
            try:
                result = await self.scheduler.submit(work)
            finally:
                session.lock.release()
            result.draining = self.draining
            result.seq = step.seq
            if onward is not None:
                await self._forward(step, onward, result, session)
        except StepFailed as exc:
            session.keep = False  # its cache may hold what the failed step wrote
            code = grpc.StatusCode.INVALID_ARGUMENT if exc.bad_input else grpc.StatusCode.INTERNAL
            result = _failed(step.seq, code, f"step failed: {exc}")
        except ForwardFailed as exc:
            result = _failed(step.seq, grpc.StatusCode.INTERNAL, f"forward failed: {exc}")
        stream = session.stream
        if stream is None:  # the gateway closed the session meanwhile
            return
        try:
            await self._answer(session, stream, step, result, last=onward is None and not result.error_code)
        except Exception as exc:  # noqa: BLE001 - the stream ended; the gateway sees that itself
            log.debug("could not answer a pushed step: %s", exc)

    async def _forward(
        self, step: swarm_pb2.Step, onward: swarm_pb2.Step, result: swarm_pb2.StepResult, session: Session
    ) -> None:
        """Send this hop's output to `step.forward[0]`. Delivered: `result` becomes an ack (no
        hidden states). Not: `result` keeps them and names the next hop's failure, so the gateway
        carries this step on itself (relay) without running this hop again. A push reported failed
        may still have arrived (a connection that broke after the write), so the session's decode
        loop ends here: the copy's loop step, if one comes back, is refused (`_accept_push`)."""
        onward.hidden.CopyFrom(result.hidden)
        onward.pass_id = result.pass_id
        timeout = step.forward_timeout_ms / 1000.0 if step.forward_timeout_ms > 0 else None
        try:
            await self.forwarder.push(step.forward[0], onward, timeout)
        except PushFailed as exc:
            log.info("could not push to the next hop %s: %s", exc.address, exc)
            _push_failed(result, exc)
            session.loop_id = 0
            return
        result.ClearField("hidden")
        result.forwarded = True

    async def _answer(
        self,
        session: Session,
        stream: grpc.aio.ServicerContext,
        step: swarm_pb2.Step,
        result: swarm_pb2.StepResult,
        last: bool,
        wait: bool = True,
    ) -> None:
        """Write `result` on the session's stream; on a decode loop's last hop (`last`), start the
        next step first (see the module docstring) and then see it accepted: inline, or with
        `wait` False in a task (the stream's own handler must go on reading)."""
        sent = None
        async with session.writing:
            if last:
                sent = await self._loop_back(step, result)
                if sent is not None:
                    # let the pass's other sessions add their steps first: the link sends them as
                    # one request (`peer.forwarding._Link`) before these answers are written
                    await asyncio.sleep(0)
            trace.mark("peer.result_out")
            await stream.write(swarm_pb2.InferenceResponse(result=result))
        if sent is None:
            return
        settle = self._loop_refused(session, stream, step, sent)
        if wait:
            await settle
        else:
            task = asyncio.get_running_loop().create_task(settle)
            self._pushing.add(task)
            task.add_done_callback(self._pushing.discard)

    async def _loop_back(self, step: swarm_pb2.Step, result: swarm_pb2.StepResult) -> Sent | None:
        """Decode loop, the last hop: start pushing the step after `step` (the token just sampled,
        at the next position) to the route's first hop, unless the loop is over (no budget left, a
        stop id sampled); `result.looped` says so. None: no push."""
        if not step.HasField("loop") or not step.sample or not step.loop.hops:
            return None
        loop = step.loop
        if loop.remaining <= 0 or result.token_id in loop.stop_ids:
            return None
        following = swarm_pb2.Step(
            token_ids=[result.token_id],
            position=step.position + len(step.token_ids),
            sample=True,
            forward=loop.hops[1:],
            seq=step.seq + 1,
            forward_timeout_ms=step.forward_timeout_ms,
        )
        following.loop.CopyFrom(loop)
        following.loop.remaining = loop.remaining - 1
        try:
            sent = await self.forwarder.send(loop.hops[0], following)
        except PushFailed as exc:
            _push_failed(result, exc)
            return None
        result.looped = True
        return sent

    async def _loop_refused(
        self, session: Session, stream: grpc.aio.ServicerContext, step: swarm_pb2.Step, sent: Sent
    ) -> None:
        """Wait for the first hop to accept the loop's next step; when it does not, answer that
        step here (`seq` + 1, `forward_error`, no token): the gateway then sends it itself."""
        timeout = step.forward_timeout_ms / 1000.0 if step.forward_timeout_ms > 0 else None
        try:
            await self.forwarder.accepted(sent, timeout)
        except PushFailed as exc:
            if exc.code != grpc.StatusCode.ABORTED:  # else the gateway halted the loop
                log.info("could not push a decode loop's next step to %s: %s", exc.address, exc)
            notice = swarm_pb2.StepResult(seq=step.seq + 1, loop_refused=True)
            _push_failed(notice, exc)
            if session.stream is None:
                return
            try:
                async with session.writing:
                    await stream.write(swarm_pb2.InferenceResponse(result=notice))
            except Exception as write_error:  # noqa: BLE001 - the stream ended; the gateway sees that
                log.debug("could not answer a refused loop step: %s", write_error)
            return
        self.looped_steps += 1

    async def Info(self, request, context):
        record = self.describe()
        return swarm_pb2.InfoResponse(
            peer_id=record.peer_id,
            model=record.model,
            start_block=record.start,
            end_block=record.end,
            num_blocks=record.num_blocks,
            dtype=record.dtype,
            quant=record.quant,
            live_sessions=record.live_sessions,
            free_cache_tokens=record.free_cache_tokens,
            throughput=record.throughput,
            version=record.version,
            state=record.state.value,
            idle_sessions=len(self.table.idle),
            cache_budget_tokens=self.cache_tokens,
            tokens_processed=self.scheduler.tokens,
            forward_passes=self.scheduler.steps,
            steps=self.scheduler.session_steps,
            evictions=self.table.evictions,
            prepacked=self.span_prepacked,
            pipeline_groups=self.scheduler.groups_now,
            batching=self.batching,
            pushed_steps=self.forwarder.pushed,
            pushes_received=self.pushes_received,
            push_requests_received=self.push_requests_received,
            looped_steps=self.looped_steps,
            next_rtt_ms=self.forwarder.nearest(),
        )

    @property
    def span_prepacked(self) -> bool:
        """Whether the span keeps packed weights (`peer.gemm.calibrate` registers them)."""
        return any(name.endswith("packed_weight") for name, _ in self.span.named_buffers())


def bind_request_id(context: grpc.aio.ServicerContext) -> str:
    """Bind the gateway's `x-request-id` (gRPC metadata) to this RPC's log lines."""
    incoming = None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER:
            incoming = value if isinstance(value, str) else value.decode("latin-1")
            break
    return set_request_id(incoming)


def client_host(peer: str) -> str:
    """The host of a gRPC peer string (`context.peer()`: "ipv4:10.0.0.5:51234",
    "ipv6:[::1]:51234", possibly percent-encoded), which --max-sessions-per-client counts by;
    the whole string for other transports (unix sockets)."""
    kind, _, rest = urllib.parse.unquote(peer or "").partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rpartition(":")[0].strip("[]")
    return peer or "unknown"


LAST_SPAN_FIELDS = ("sample", "allowed_token_ids", "allowed_token_mask", "prompt_logprobs")


def _split(step: swarm_pb2.Step) -> tuple[swarm_pb2.Step, swarm_pb2.Step | None]:
    """A step with `forward`: what this hop runs (no last-span fields) and what goes on to the
    next hop (everything but the hidden states and pass id, which this hop's result gives).
    Without `forward`: the step itself, and None."""
    if not step.forward:
        return step, None
    own = swarm_pb2.Step(token_ids=step.token_ids, position=step.position, pass_id=step.pass_id, seq=step.seq)
    if step.HasField("hidden"):
        own.hidden.CopyFrom(step.hidden)
    onward = swarm_pb2.Step(
        token_ids=step.token_ids,
        position=step.position,
        forward=step.forward[1:],
        seq=step.seq,
        forward_timeout_ms=step.forward_timeout_ms,
    )
    if step.HasField("loop"):
        onward.loop.CopyFrom(step.loop)
    for name in LAST_SPAN_FIELDS:
        if name == "prompt_logprobs" and not step.HasField(name):
            continue
        value = getattr(step, name)
        if name == "allowed_token_ids":
            onward.allowed_token_ids.extend(value)
        else:
            setattr(onward, name, value)
    return own, onward


def _push_failed(result: swarm_pb2.StepResult, exc: PushFailed) -> None:
    """Name in `result` the push that failed (`StepResult.forward_error`): which hop, and its status."""
    result.forward_error = f"{exc.address}: {exc.code.name}: {exc.message}"
    result.forward_error_code = exc.code.value[0]


def _failed(seq: int, code: grpc.StatusCode, message: str) -> swarm_pb2.StepResult:
    return swarm_pb2.StepResult(seq=seq, error_code=code.value[0], error_message=message)


def _common_prefix(a: list[int], b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _allowed_tokens(step: swarm_pb2.Step, vocab: int) -> torch.Tensor | None:
    """The ids the last span may sample this step (`allowed_token_ids` or `allowed_token_mask`),
    as an index tensor; None: any token."""
    mask = step.allowed_token_mask
    if mask and step.allowed_token_ids:
        raise StepError(
            grpc.StatusCode.INVALID_ARGUMENT, "set allowed_token_ids or allowed_token_mask, not both"
        )
    if mask:
        if len(mask) != (vocab + 7) // 8:
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"allowed_token_mask must be {(vocab + 7) // 8} bytes for a vocabulary of {vocab}, got {len(mask)}",
            )
        bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
        if bits[vocab:].any():
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"allowed_token_mask sets bits past the vocabulary ({vocab})",
            )
        ids = np.flatnonzero(bits)
        if ids.size == 0:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "allowed_token_mask allows no token")
        return torch.from_numpy(ids).long()
    if not step.allowed_token_ids:
        return None
    ids = torch.tensor(list(step.allowed_token_ids), dtype=torch.long)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"allowed token ids must be in [0, {vocab})")
    return ids

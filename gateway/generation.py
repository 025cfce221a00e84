"""Drive one generation through a route of peers.

The gateway holds one `Inference` stream per hop. Each step sends token ids to the first span and
gets a sampled token back from the last span. In between, hidden states either go peer to peer
(push, the default: the gateway sends the step to the first hop only, each hop pushes its output
to the next and acks on its own stream) or through the gateway (relay: each span's hidden states,
still encoded, never decoded here, are sent on to the next). The runner keeps every token it has
sent, so it can replay them on a replacement peer after a failure.

Push and relay mix per edge: a step runs as chains of pushing hops (`_chain_end`); a hop that
cannot reach the next answers with its hidden states and the error (`StepResult.forward_error`),
the gateway carries them on itself, and relays that edge from then on. Replays (a failover's
rebuild) push too, but a chain never crosses the boundary where the rebuilt hops end (the hop
after it takes only the step's rows). Steps checked by the verifier go by relay: the check
compares every hop's hidden states.

Decode loop (`Step.loop`, docs/self-organizing.md): a decode step whose chain is the whole route
asks the last hop to push the next step straight back to the first hop, with a budget and the stop
ids. From then on the gateway only reads: each `step` of the loop's token finds its step already
running and waits for its answers as for any chain (`_loop_next`), so a token no longer crosses the
gateway between two steps. The loop ends when its budget is spent, a stop id is sampled, the first
hop refuses it (the gateway `Halt`ed it to move a draining hop), or a hop fails; the gateway then
sends the next step itself. Its length is drawn up front so that the verifier's next checked step
(relayed) comes right after it. Closing the runner ends a loop too: a closed session refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from common import trace
from common.peer_client import ChannelPool, PeerError, PeerSession
from gateway.answer_checks import malformed
from gateway.failure_policy import BadAnswer, Failover, FailoverEvent, Verdict
from gateway.routing import Hop, NoRouteError, Route, plan_route
from protos import swarm_pb2

log = logging.getLogger("gateway.generation")


@dataclass
class TokenEvent:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]
    # set on a choice's last token: "stop" (an end-of-sequence token that ends it) or "length"
    finish_reason: str | None = None


@dataclass
class PromptLogprobs:
    """What the model gave each prompt token after the first (`GenerationParams.prompt_logprobs`):
    `tokens[i]` scores prompt token i+1 (its id, logprob and the best alternatives there)."""

    tokens: list[TokenEvent]


@dataclass
class LoopPlan:
    """What a decode loop may run without the gateway (`Step.loop`): up to `remaining` steps after
    the one that starts it, ending early after a sampled id in `stop_ids`."""

    remaining: int
    stop_ids: tuple[int, ...] = ()


@dataclass
class GenerationParams:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: swarm_pb2.SamplingParams
    eos_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Constrained decoding (`gateway.constrained.Constraint`): `allowed_bits()` before each step goes
    # to the last span as `Step.allowed_token_mask`, `advance(token)` after it. EOS then always ends,
    # and so does an output that is complete with nothing but EOS to follow (`finished`).
    constraint: Any = None
    # Cache reuse across turns: the peers' session id, and whether to resume what they kept.
    session_id: str = ""
    resume: bool = False
    # Score the prompt (`Step.prompt_logprobs`, for an echo with logprobs): this many alternatives
    # per token; `generate` then yields one `PromptLogprobs` before any token. The whole prompt
    # runs (never resumed), so every token is scored; a failover during the prefill replays it
    # with the same request. With max_new_tokens == 0 nothing is sampled.
    prompt_logprobs: int | None = None

    @property
    def max_length(self) -> int:
        """Tokens the route's caches may hold for this generation (the sessions' reservation)."""
        return len(self.prompt_ids) + self.max_new_tokens


class _LoopBroken(Exception):
    """The last hop could not start the loop's step on the first (`StepResult.looped`): its notice."""

    def __init__(self, notice: swarm_pb2.StepResult):
        super().__init__(notice.forward_error)
        self.notice = notice


class _HopFailure(Exception):
    """A step failed at hop `index` of the current route."""

    def __init__(self, index: int, error: PeerError):
        super().__init__(str(error))
        self.index = index
        self.error = error


def tail_rows(hidden: swarm_pb2.Tensor, rows: int) -> swarm_pb2.Tensor:
    """The last `rows` rows of a [T, hidden] tensor, sliced as bytes (the gateway has no torch)."""
    total = hidden.shape[0]
    if rows == total:
        return hidden
    row_bytes = len(hidden.data) // total
    return swarm_pb2.Tensor(
        data=hidden.data[(total - rows) * row_bytes :], dtype=hidden.dtype, shape=[rows, *hidden.shape[1:]]
    )


class RouteRunner:
    """Open sessions on every hop of a route and push steps through them in order.

    Failover (when a `Failover` is given; the verdict on each failure is `gateway.failure_policy`'s): the runner keeps every token id the whole route
    has processed (`history`). When a hop fails (gRPC error, broken stream, or no answer within
    the step deadline), its peer is banned, a replacement for exactly that hop's blocks is planned
    from a fresh DHT lookup (possibly split over several peers) and opened, and the step is
    retried. The replacement's KV cache is rebuilt by *replaying* the history on the retry:

    * every hop from the first up to the end of the replacement steps with ``position=0`` and all
      tokens so far (history + the step's tokens): the replacement needs the previous hop's hidden
      states for the whole history, and the gateway keeps no hidden states (they would cost
      hidden_size x 4 bytes per token per hop), so the hops before it recompute them. A peer
      truncates its cache to ``position`` first, so this overwrites rather than duplicates.
    * hops after the replacement keep their caches and get only the step's rows (its new tokens).

    Cost of one failover: one prefill of ``len(history)`` tokens over the blocks
    ``[0, end of the failed hop)`` (a failed last hop costs one full-model prefill, a failed first
    hop a prefill of its span only), plus a fresh DHT lookup and the session opens. Sampling
    stays exact: the last span seeds its sampler per position, so a replayed last span samples
    the same token that the lost one would have.

    A peer that is draining flags its step results; the runner then moves that hop the same way
    at its own pace (the rebuild happens on the next step), and stays put if no replacement
    exists (the peer finishes the session within its drain timeout).

    Bounded: a search for a replacement gives up after `Failover.timeout` seconds and raises
    `NoRouteError`, so a stream without a replacement ends within step_timeout + that budget.

    Answers are checked (`gateway.answer_checks`; `answer_shape` = the model's hidden size and
    vocabulary, 0 = unchecked): a malformed one fails its hop over like an error, and convicts the
    peer. With a `Verifier` some steps are also re-executed on replicas (`gateway.verification`),
    and a hop whose peer is convicted, here or by another runner, fails over at its next step.
    """

    def __init__(
        self,
        pool: ChannelPool,
        route: Route,
        step_timeout: float,
        failover: Failover | None = None,
        wire_dtype: str = "",
        verifier=None,  # gateway.verification.Verifier (imported there: it drives runners)
        answer_shape: tuple[int, int] = (0, 0),
        push: bool = True,
        decode_loop: bool = True,
    ):
        self.pool = pool
        self.verifier = verifier if failover is not None else None
        self.hidden_size, self.vocab_size = answer_shape
        self.wire_dtype = wire_dtype  # "" = each peer sends in its compute dtype
        self.route = route
        self.step_timeout = step_timeout
        self.failover = failover
        self.sessions: list[PeerSession | None] = []
        self.history: list[int] = []  # token ids every hop of the route holds in cache
        self._rebuild_upto = -1  # hops [0, this] replay the history on the next step
        self._unmeasured: list[FailoverEvent] = []  # pause known once the next step ends
        self._max_length = 0
        self._sampling = swarm_pb2.SamplingParams()
        self._request_id = ""
        self._session_id = ""
        self._resume_tokens: list[int] = []
        self._next_migration = 0.0
        # peers that failed this runner -> when: not retried unless readmitted since (they answer again)
        self._failed: dict[str, float] = {}
        self._closing: set[asyncio.Task] = set()
        self.push = push  # hidden states go peer to peer; False: through the gateway (--relay)
        self._relayed: set[tuple[str, str]] = set()  # (peer, next peer) edges that could not push
        self._seq = 0  # numbers steps (`Step.seq`), so a stale answer is told from the current one
        self.pushed_steps = 0  # steps in which at least one hop pushed to the next
        # decode loop: the last hop pushed the step after the last one to the first hop (it runs
        # already, for the token `_loop_token`); `_loop_ok` False once a loop push failed for
        # another reason than a halt; `_halted`: a Halt was sent, no loop starts until the hop
        # that asked for it has moved
        self._loop_next = False
        self._loop_token = -1
        self._loop_ok = decode_loop
        self._halted = False
        self._check_due = False  # the verifier picked the step after the current loop
        self.looped_steps = 0  # steps the gateway did not send (the last hop pushed them)

    @property
    def tokens(self) -> list[int]:
        """Every token the route's caches hold, in order (recorded in the pin for the next turn)."""
        return self.history

    @property
    def _end_block(self) -> int:
        return self.route[-1].end

    @property
    def sampling(self) -> swarm_pb2.SamplingParams:
        """The last span's sampling parameters (a check re-executes with the same)."""
        return self._sampling

    @property
    def request_id(self) -> str:
        return self._request_id

    def malformed(
        self, result: swarm_pb2.StepResult, hop: Hop, rows: int, sample: bool, allowed_mask: bytes | None
    ) -> str | None:
        """Why `result` of `hop` for a step of `rows` tokens is not an answer (None: it is)."""
        return malformed(
            result,
            rows=rows,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            last=hop.end == self._end_block,
            sampled=sample,
            wire_dtype=self.wire_dtype,
            allowed_mask=allowed_mask,
        )

    async def open(
        self,
        max_length: int,
        sampling: swarm_pb2.SamplingParams,
        request_id: str,
        *,
        session_id: str = "",
        resume_tokens: list[int] | None = None,
    ) -> int:
        """Open the route's sessions; returns the position to step from (0 unless resuming).

        With `resume_tokens` (the sequence about to run) each peer reattaches the cache it kept for
        `session_id` and says how much of that sequence it still holds; the route resumes at the
        smallest such length (every peer truncates to the position of the next step), so a peer
        that evicted its cache, or a replacement opened by a failover, gets the rest replayed.
        """
        self._max_length, self._sampling, self._request_id = max_length, sampling, request_id
        self._session_id = session_id or uuid.uuid4().hex
        self._resume_tokens = list(resume_tokens or [])
        try:
            results = await asyncio.gather(
                *(self._open_hop(hop, self.step_timeout) for hop in self.route), return_exceptions=True
            )
            self.sessions = [result if isinstance(result, PeerSession) else None for result in results]
            failed = [(i, result) for i, result in enumerate(results) if isinstance(result, BaseException)]
            if failed:
                await self._recover_opens(failed)
            held = min((session.cache_length for session in self.sessions if session is not None), default=0)
            self.history = self._resume_tokens[:held]
            return len(self.history)
        finally:
            self._resume_tokens = []  # later replacements start from nothing

    async def _recover_opens(self, failed: list[tuple[int, BaseException]]) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + (self.failover.timeout if self.failover else 0.0)
        try:
            for index, error in reversed(failed):  # from the end, so earlier indexes stay valid
                if not isinstance(error, PeerError):
                    raise error
                await self._recover(index, error, deadline)
        except BaseException:
            await self.close()
            raise
        self._measured(loop.time() - began)

    async def _open_hop(self, hop: Hop, timeout: float) -> PeerSession:
        session = PeerSession(self.pool, hop.address)
        message = swarm_pb2.OpenSession(
            session_id=self._session_id,
            start_block=hop.start,
            end_block=hop.end,
            max_length=self._max_length,
            request_id=self._request_id,
            wire_dtype=self.wire_dtype,
        )
        if hop.end == self._end_block:
            message.sampling.CopyFrom(self._sampling)
        if self._resume_tokens:
            message.resume = True
            message.resume_tokens.extend(self._resume_tokens)
        try:
            opened = await self._with_deadline(
                hop, session.open(message, (("x-request-id", self._request_id),)), timeout
            )
            session.cache_length = opened.cache_length if self._resume_tokens else 0
            self._count(session, hop)
        except BaseException:
            self._close_later(session)
            raise
        return session

    async def step(
        self,
        token_ids: list[int],
        sample: bool = True,
        allowed_mask: bytes | None = None,
        prompt_logprobs: int | None = None,
        plan: LoopPlan | None = None,
    ) -> swarm_pb2.StepResult:
        """One step through the route; the last span's result. With `prompt_logprobs` the result's
        `prompt_logprobs` scores `token_ids[1:]` (also when a failover replayed more). With `plan`
        (a decode step) the step may start a decode loop; while one runs, the step of its token is
        already under way and this only waits for its answers."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = None
        check = None
        looped, self._loop_next = self._loop_next, False
        if looped and list(token_ids) != [self._loop_token]:
            raise RuntimeError(
                f"the route's decode loop already runs token {self._loop_token}, not {token_ids}"
            )
        if (
            not looped
            and self.verifier is not None
            and self._rebuild_upto < 0
            and prompt_logprobs is None
            and (self._check_due or self.verifier.pick())
        ):
            self._check_due = False
            check = self.verifier.start(self, list(token_ids), sample, allowed_mask)
        chain_loop = None
        if not looped and check is None and self._may_loop(plan, sample, allowed_mask, prompt_logprobs):
            chain_loop = self._loop_for(plan)
        try:
            while True:
                try:
                    results = await self._pass(
                        list(token_ids), sample, allowed_mask, prompt_logprobs, push=check is None,
                        chain_loop=chain_loop, looped=looped,
                    )  # fmt: skip
                    if check is not None:
                        # The check ran beside the step on other sessions; its verdict comes before
                        # the token is released: a checked step never hands on an answer that failed.
                        check, guilty = None, await self.verifier.judge(self, check, results)
                        if guilty is not None:
                            raise _HopFailure(*guilty)
                    break
                except _LoopBroken as broken:  # the step never started: the gateway sends it
                    looped = False
                    self._loop_failed(broken.notice)
                except _HopFailure as failure:
                    looped = False  # the retry is the gateway's own step, after a replay
                    if check is not None:  # the route changes: a check of the old one proves nothing
                        check.task.cancel()
                        check = None
                    if deadline is None:
                        deadline = loop.time() + (self.failover.timeout if self.failover else 0.0)
                    await self._recover(failure.index, failure.error, deadline)
        finally:
            if check is not None:
                check.task.cancel()
        self.history.extend(token_ids)
        self._measured(loop.time() - began)
        self.looped_steps += looped
        if self._loop_went_on(results[-1], expected=chain_loop is not None or looped):
            await self._halt()  # a stray loop: the first hop refuses its steps from now on
        if self.failover is not None:
            draining = [
                i
                for i, (result, session) in enumerate(zip(results, self.sessions, strict=True))
                if result.draining or (session is not None and session.draining)
            ]
            if draining and loop.time() >= self._next_migration:
                if self._loop_next:  # its next step is under way: stop the loop, move once it has
                    await self._halt()
                else:
                    self._next_migration = loop.time() + 1.0  # a lookup per token would be wasteful
                    for index in reversed(draining):
                        await self._migrate(index)
                    self._halted = False  # loops may start again (on the new route)
        return results[-1]

    def _may_loop(
        self, plan: LoopPlan | None, sample: bool, allowed_mask: bytes | None, prompt_logprobs: int | None
    ) -> bool:
        """Whether a step may start a decode loop: a plain sampled decode step with budget left,
        pushing, on a route the last loop did not fail on, with no replay pending, whose first
        push chain is the whole route (no edge relayed)."""
        return (
            plan is not None
            and plan.remaining > 0
            and sample
            and not allowed_mask
            and prompt_logprobs is None
            and self.push
            and self._loop_ok
            and not self._halted
            and self._rebuild_upto < 0
            and self._chain_end(0, -1) == len(self.route) - 1
        )

    def _loop_for(self, plan: LoopPlan) -> swarm_pb2.Loop | None:
        """The decode loop a step starts (`_pass` adds the hops when its chain is the whole route),
        as long as the verifier's next check lets it: the step after the loop is the checked one."""
        remaining = plan.remaining
        if self.verifier is not None:
            run = self.verifier.unpicked_run(remaining)
            if run < remaining:
                self._check_due, remaining = True, run
        if remaining <= 0:
            return None
        return swarm_pb2.Loop(remaining=remaining, stop_ids=plan.stop_ids)

    def _loop_went_on(self, result: swarm_pb2.StepResult, expected: bool) -> bool:
        """Note from the last hop's answer whether the loop runs the next step already. `expected`:
        this step ran in a loop or started one. A loop is only followed while its chain is whole:
        after a push that its hop reported failed (the edge is relayed now), the step may still
        have reached the next hop, whose loop is a stray. True: such a stray, to be halted."""
        whole = self._chain_end(0, -1) == len(self.route) - 1
        self._loop_next = result.looped and expected and whole
        self._loop_token = result.token_id
        if result.looped and not self._loop_next:
            log.info("a decode loop the route no longer runs (an edge is relayed): halting it")
            return True
        if not result.looped and result.forward_error_code:  # it could not even start the push
            self._loop_failed(result)
        return False

    def _loop_failed(self, answer: swarm_pb2.StepResult) -> None:
        """The last hop could not push the loop's step: unless the gateway halted it (ABORTED), the
        last hop cannot reach the first or the first will not take it, so no loops on this route."""
        if answer.forward_error_code != grpc.StatusCode.ABORTED.value[0] and self._loop_ok:
            log.info(
                "decode loop stopped (%s); the gateway sends each step from now on", answer.forward_error
            )
            self._loop_ok = False

    async def _halt(self) -> None:
        """Ask the first hop to stop the running loop; the answers that follow say when it has."""
        if self._halted or not self.sessions or self.sessions[0] is None:
            return
        self._halted = True
        with contextlib.suppress(PeerError):
            await self._with_deadline(self.route[0], self.sessions[0].halt())

    async def _pass(
        self,
        token_ids: list[int],
        sample: bool,
        allowed_mask: bytes | None = None,
        prompt_logprobs: int | None = None,
        push: bool = True,
        chain_loop: swarm_pb2.Loop | None = None,
        looped: bool = False,
    ) -> list[swarm_pb2.StepResult]:
        """One step through every hop; hops up to `_rebuild_upto` replay the whole history.
        `chain_loop`: start a decode loop when the first chain is the whole route. `looped`: the
        last hop already pushed this step to the first (a loop runs): send nothing, read the answers."""
        position = len(self.history)
        everything = self.history + token_ids
        upto = self._rebuild_upto
        last = len(self.route) - 1
        self._seq += 1
        seq = self._seq
        convicted = self.failover.convicted() if self.failover is not None else {}
        for i, hop in enumerate(self.route):
            if hop.peer_id in convicted:
                reason = convicted[hop.peer_id]
                raise _HopFailure(i, BadAnswer(hop.address, reason, "the peer was convicted; moving off it"))
        hidden = None
        results: list[swarm_pb2.StepResult] = []
        pushed = False
        i = 0
        while i <= last:
            rebuild = i <= upto
            end = self._chain_end(i, upto) if push and self.push else i
            step = swarm_pb2.Step(
                token_ids=everything if rebuild else token_ids,
                position=0 if rebuild else position,
                sample=sample and end == last,
                seq=seq,
            )
            if allowed_mask and end == last:
                step.allowed_token_mask = allowed_mask
            if prompt_logprobs is not None and end == last:
                step.prompt_logprobs = prompt_logprobs
            if results:
                step.pass_id = results[-1].pass_id  # the first span's grouping, for later spans
            if hidden is not None:
                step.hidden.CopyFrom(
                    hidden if rebuild or i != upto + 1 else tail_rows(hidden, len(token_ids))
                )
            for k in range(i + 1, end + 1):
                step.forward.add(address=self.route[k].address, push_id=self.sessions[k].push_id)
            if chain_loop is not None and i == 0 and end == last and not rebuild:
                step.loop.CopyFrom(chain_loop)
                step.loop.id = seq  # unique in this runner; the first hop takes this loop's steps only
                for k in range(end + 1):
                    step.loop.hops.add(address=self.route[k].address, push_id=self.sessions[k].push_id)
            if end > i or step.HasField("loop"):
                # below the step deadline: a hop that cannot reach the next says so before the
                # gateway would blame it for the silence (see Step.forward_timeout_ms)
                step.forward_timeout_ms = max(1, int(self.step_timeout * 500))
            if not (looped and i == 0):  # else the last hop pushed it to the first already
                try:
                    session = self.sessions[i]
                    if session is None:
                        raise PeerError(self.route[i].address, None, "session is not open")
                    trace.mark("gateway.send")
                    await self._with_deadline(self.route[i], session.send(step))
                except PeerError as exc:
                    raise _HopFailure(i, exc) from exc
            notices = looped and i == 0  # the last hop may answer a refused loop step
            if end == i:
                try:
                    while True:
                        answer = await self._with_deadline(self.route[i], self.sessions[i].receive(seq))
                        if not self._stray(i, end, answer, notices):
                            break
                    answers = {i: answer}
                except PeerError as exc:
                    raise _HopFailure(i, exc) from exc
            else:
                answers = await self._chain_answers(i, end, seq, notices)
            notice = answers.get(last) if looped and i == 0 else None
            if notice is not None and notice.loop_refused:  # the last hop's, not a token
                raise _LoopBroken(notice)
            for k in range(i, end + 1):
                result = answers.get(k)
                if result is None:  # an ack still on its way (it pushed: the last hop answered); the
                    # next read of this stream skips it as stale, noting a `draining` flag in it
                    pushed = True
                    results.append(swarm_pb2.StepResult())
                    continue
                if k < end and result.forwarded:
                    pushed = True
                    results.append(result)
                    continue
                if k < end:  # it could not push: carry its hidden states on from here (relay)
                    self._relay_edge(k, result)
                hop = self.route[k]
                rows = len(step.token_ids)
                problem = self.malformed(result, hop, rows, step.sample and k == end, allowed_mask)
                if problem is not None:
                    raise _HopFailure(k, BadAnswer(hop.address, "malformed", problem))
                results.append(result)
                hidden = result.hidden
                i = k + 1
                break
            if prompt_logprobs is not None and end == last and rebuild and position:
                del results[-1].prompt_logprobs[:position]  # a replay scored the history too
        self._rebuild_upto = -1
        if pushed:
            self.pushed_steps += 1
        trace.mark("gateway.result")
        return results

    def _stray(self, k: int, end: int, answer: swarm_pb2.StepResult, notices: bool) -> bool:
        """Whether hop `k`'s answer to this step's `seq` belongs to a copy of it the gateway did
        not send: a push its hop reported failed that reached the next hop anyway, and the decode
        loop that copy started. Such a copy says it pushed (`forwarded`) where the gateway asked
        the hop to answer itself, or is the last hop's notice of a loop step the first hop refused
        (`loop_refused`) where no loop runs. Skipped: the hop's own answer follows."""
        return (k == end and answer.forwarded) or (answer.loop_refused and not notices)

    async def _chain_answers(
        self, first: int, end: int, seq: int, notices: bool = False
    ) -> dict[int, swarm_pb2.StepResult]:
        """Wait for the answers of push chain [first, end] to step `seq`: done when the last hop's
        arrives (the acks of the hops before it may come later, and are skipped), or when a hop
        could not push (the chain stops there). A hop that fails is blamed; when nothing arrives
        for a step deadline, the first hop still silent is (a hop that cannot reach the next
        says so within `Step.forward_timeout_ms`, before that deadline)."""
        answers: dict[int, swarm_pb2.StepResult] = {}
        waiting = set(range(first, end + 1))
        while True:
            reads = {self.sessions[k].reading(): k for k in waiting}
            done, _ = await asyncio.wait(
                reads, timeout=self.step_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                k = min(waiting)
                raise _HopFailure(
                    k, PeerError(self.route[k].address, None, f"no answer within {self.step_timeout:.1f} s")
                )
            for task in sorted(done, key=reads.__getitem__):
                k = reads[task]
                session = self.sessions[k]
                try:
                    result = session.result_of(await session.consume(task), seq)
                except PeerError as exc:
                    raise _HopFailure(k, exc) from exc
                if result is None or self._stray(k, end, result, notices):
                    continue  # stale: an answer to a step given up on, or to a copy (`_stray`)
                answers[k] = result
                waiting.discard(k)
                if k == end or not result.forwarded:
                    return answers

    def _chain_end(self, i: int, upto: int) -> int:
        """The last hop of the push chain that starts at hop `i`: hops are added while each can
        push to the next (open, not an edge that failed to push) and all replay or all do not."""
        end = i
        if self.sessions[i] is None or not self.sessions[i].push_id:  # a peer that predates push
            return end
        while end + 1 < len(self.route):
            nxt = end + 1
            session = self.sessions[nxt]
            if session is None or not session.push_id or (nxt <= upto) != (i <= upto):
                break
            if (self.route[end].peer_id, self.route[nxt].peer_id) in self._relayed:
                break
            end = nxt
        return end

    def _relay_edge(self, index: int, result: swarm_pb2.StepResult) -> None:
        """Hop `index` could not push to the next: relay that edge from now on."""
        edge = (self.route[index].peer_id, self.route[index + 1].peer_id)
        if edge not in self._relayed:
            code = grpc.StatusCode.UNKNOWN
            for candidate in grpc.StatusCode:
                if candidate.value[0] == result.forward_error_code:
                    code = candidate
            log.info("peer %s cannot push to %s (%s: %s); relaying that edge", edge[0], edge[1], code.name,
                     result.forward_error)  # fmt: skip
            self._relayed.add(edge)

    async def _recover(self, index: int, error: PeerError, deadline: float) -> None:
        """Replace hop `index` after `error`, waiting for a replacement until `deadline`."""
        policy = self.failover
        hop = self.route[index]
        if policy is None:
            raise error
        verdict = policy.peer_failed(hop.peer_id, error)
        if verdict is Verdict.REQUEST_FAULT:
            raise error
        full = verdict is Verdict.PEER_BUSY
        log.warning("hop %d (peer %s, blocks [%d, %d)) failed: %s; failing over", index, hop.peer_id, hop.start,
                    hop.end, error)  # fmt: skip
        self._failed[hop.peer_id] = time.monotonic()
        self._discard(index)
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:  # first the records already known (no lookup to wait for), then fresh lookups
                part, sessions = await self._open_replacement(hop, deadline, fresh=attempt > 0)
                break
            except (NoRouteError, PeerError) as exc:
                if attempt == 0 and isinstance(exc, PeerError) and loop.time() < deadline:
                    # A known peer failed to open (most often one that died since: its record
                    # outlives it). Opens to dead peers fail fast, while a fresh lookup waits a
                    # DHT timeout for every dead node it meets (seconds), so try the other
                    # known peers first; each failure is excluded, so this ends.
                    continue
                attempt += 1
                if attempt == 1:
                    continue
                if full:  # no other replica has room either: the client retries later (503)
                    raise error from exc
                if loop.time() + policy.retry_interval >= deadline:
                    policy.gave_up()
                    raise NoRouteError(
                        f"peer {hop.peer_id} failed and no replacement for blocks [{hop.start}, {hop.end}) "
                        f"came within {policy.timeout:.1f} s ({exc})"
                    ) from exc
                await asyncio.sleep(policy.retry_interval)
        self._splice(index, part, sessions, FailoverEvent(index, hop.peer_id, "failed", 0.0, ()))

    async def _migrate(self, index: int) -> None:
        """Move hop `index` off a draining peer if a replacement exists now; else stay."""
        hop = self.route[index]
        self.failover.peer_leaving(hop.peer_id)
        self._failed[hop.peer_id] = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.step_timeout
        try:
            try:
                part, sessions = await self._open_replacement(hop, deadline, fresh=False)
            except (NoRouteError, PeerError):
                part, sessions = await self._open_replacement(hop, deadline, fresh=True)
        except (NoRouteError, PeerError) as exc:
            log.info(
                "peer %s is draining and has no replacement yet (%s); staying until it ends", hop.peer_id, exc
            )
            return
        self._discard(index)
        self._splice(index, part, sessions, FailoverEvent(index, hop.peer_id, "draining", 0.0, ()))

    async def _open_replacement(
        self, hop: Hop, deadline: float, fresh: bool = True
    ) -> tuple[Route, list[PeerSession]]:
        policy = self.failover
        loop = asyncio.get_running_loop()
        remaining = max(0.1, deadline - loop.time())
        if fresh:
            records = await policy.records(timeout=remaining)
            candidates = [records]
        else:
            # Known records may be past their expiry (a peer that died a minute ago): prefer
            # the unexpired ones, which are far more likely to be alive.
            records = policy.known()
            now = time.time()
            candidates = [[r for r in records if not r.is_expired(now)], records]
        part = None
        # Bans keep new sessions off flaky peers; a stream about to die rather retries a peer
        # that someone else banned (a slow step on a busy machine) than one that failed it.
        for exclude, pool in itertools.product(
            (policy.excluded() | self._failed_peers(), self._failed_peers()), candidates
        ):
            part = plan_route(
                pool, policy.num_blocks, start=hop.start, end=hop.end, exclude=exclude,
                min_free_tokens=self._max_length, local_load=policy.local_load, rtt=policy.rtt,
            )  # fmt: skip
            if part is not None:
                break
        if part is None:
            seen = [
                f"{r.peer_id}[{r.start},{r.end}){r.state}"
                for r in records
                if r.start < hop.end and r.end > hop.start
            ]
            log.info("no replacement for [%d, %d) among %s; excluded %s (fresh=%s)", hop.start, hop.end, seen,
                     sorted(policy.excluded() | self._failed_peers()), fresh)  # fmt: skip
            raise NoRouteError(f"no live peer covers blocks [{hop.start}, {hop.end})")
        timeout = min(self.step_timeout, max(0.1, deadline - loop.time()))
        results = await asyncio.gather(*(self._open_hop(h, timeout) for h in part), return_exceptions=True)
        errors = [(h, r) for h, r in zip(part, results, strict=True) if isinstance(r, BaseException)]
        if errors:
            for result in results:
                if isinstance(result, PeerSession):
                    self._close_later(result)
            for failed_hop, error in errors:
                if not isinstance(error, PeerError):
                    raise error
                policy.peer_failed(failed_hop.peer_id, error)
                self._failed[failed_hop.peer_id] = time.monotonic()
            raise errors[0][1]
        return part, list(results)

    def _failed_peers(self) -> set[str]:
        """Peers this runner must not retry: those that failed it and were not readmitted since (a
        stalled peer that answers again is the only replacement left when its replica stalls next)."""
        policy = self.failover
        return {
            peer
            for peer, when in self._failed.items()
            if policy is None or not policy.readmitted_since(peer, when)
        }

    def _splice(self, index: int, part: Route, sessions: list[PeerSession], event: FailoverEvent) -> None:
        """Put `part` in place of hop `index`; it and every hop before it replay on the next step."""
        grown = len(part) - 1
        upto = self._rebuild_upto + grown if self._rebuild_upto >= index else self._rebuild_upto
        self._rebuild_upto = max(upto, index + grown)
        self.route = (*self.route[:index], *part, *self.route[index + 1 :])
        self.sessions = [*self.sessions[:index], *sessions, *self.sessions[index + 1 :]]
        self._halted = False  # a halt was for the old route: loops may start on the new one
        event.replacement = tuple(h.peer_id for h in part)
        if self.failover is not None:
            self.failover.replaced(event)
        self._unmeasured.append(event)
        log.info("hop %d (peer %s) now served by %s", index, event.peer_id, ", ".join(event.replacement))

    def _measured(self, pause: float) -> None:
        """The step that carried out the pending failovers took `pause` seconds: record it."""
        events, self._unmeasured = self._unmeasured, []
        for event in events:
            event.pause_s = pause
            if self.failover is not None:
                self.failover.measured(event)

    def _count(self, session: PeerSession, hop: Hop) -> None:
        """Count an opened session in the gateway's own load view (see routing.edge_cost)."""
        if self.failover is not None:
            self.failover.opened(hop.peer_id)
            session.load_key = hop.peer_id

    def _uncount(self, session: PeerSession) -> None:
        key = getattr(session, "load_key", None)
        if key is not None and self.failover is not None:
            session.load_key = None
            self.failover.closed(key)

    def _discard(self, index: int) -> None:
        session = self.sessions[index]
        self.sessions[index] = None
        if session is not None:
            self._close_later(session)

    def _close_later(self, session: PeerSession) -> None:
        """Close without waiting: the peer may be hung, and the stream must not wait for it."""

        self._uncount(session)

        async def close() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), 2.0)

        task = asyncio.ensure_future(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _with_deadline(self, hop: Hop, awaitable, timeout: float | None = None):
        timeout = self.step_timeout if timeout is None else timeout
        try:
            # asyncio.timeout, not wait_for: wait_for makes a task per call, i.e. per hop per token
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError as exc:
            raise PeerError(hop.address, None, f"no answer within {timeout:.1f} s") from exc

    async def close(self) -> None:
        sessions, self.sessions = [s for s in self.sessions if s is not None], []
        for session in sessions:
            self._uncount(session)
        try:
            await asyncio.gather(*(session.close() for session in sessions), return_exceptions=True)
        finally:
            # When the request was cancelled (a client that went away), gather's tasks may be
            # cancelled before they ever ran: cancel every RPC synchronously so no peer keeps
            # the session's cache.
            for session in sessions:
                session.abort()


async def generate(
    runner: RouteRunner, params: GenerationParams
) -> AsyncIterator[TokenEvent | PromptLogprobs]:
    """Prefill the prompt, then decode until EOS or max_new_tokens (0: prefill only). With
    `params.prompt_logprobs` the first event is a `PromptLogprobs`; every other is a `TokenEvent`,
    the last of which says why the choice ended (`TokenEvent.finish_reason`). The caller stops
    early by closing the generator (use `contextlib.aclosing`); the runner's sessions close either
    way."""
    try:
        sampling = params.sampling
        if not sampling.penalty_start:
            # OpenAI's presence/frequency penalties count generated tokens only: the last span
            # skips the prompt's tokens when it counts (see swarm.proto, SamplingParams).
            sampling = swarm_pb2.SamplingParams()
            sampling.CopyFrom(params.sampling)
            sampling.penalty_start = len(params.prompt_ids)
        if sampling.temperature > 0 and not sampling.HasField("seed"):
            # A seed of the gateway's, drawn like the peer's own would be: a replay on a
            # replacement (failover) or a replica (a check) then samples the very same tokens.
            sampling = _copy(sampling)
            sampling.seed = secrets.randbits(63)
        scoring = params.prompt_logprobs
        # at least one token must run; scoring the prompt needs all of it to run
        resume = params.prompt_ids[:-1] if params.resume and scoring is None else None
        start = await runner.open(
            params.max_length, sampling, params.request_id, session_id=params.session_id, resume_tokens=resume
        )
        if start:
            log.debug(
                "request %s resumes at token %d of %d", params.request_id, start, len(params.prompt_ids)
            )
        constraint = params.constraint
        # a decode loop may run until the budget is spent or an end of sequence is sampled, from
        # the prefill on; a constraint masks every step, so its steps go one by one
        stop_ids = () if params.ignore_eos else tuple(params.eos_token_ids)
        result = await runner.step(
            params.prompt_ids[start:],
            sample=params.max_new_tokens > 0,
            allowed_mask=constraint and constraint.allowed_bits(),
            prompt_logprobs=scoring,
            plan=LoopPlan(params.max_new_tokens - 1, stop_ids) if constraint is None else None,
        )
        if scoring is not None:
            yield PromptLogprobs(
                [
                    TokenEvent(
                        item.token_id,
                        item.logprob,
                        [(alt.token_id, alt.logprob) for alt in item.top_logprobs],
                    )
                    for item in result.prompt_logprobs
                ]
            )
        for produced in range(1, params.max_new_tokens + 1):
            event = TokenEvent(
                token_id=result.token_id,
                logprob=result.logprob,
                top_logprobs=[(item.token_id, item.logprob) for item in result.top_logprobs],
            )
            if constraint is not None:
                constraint.advance(event.token_id)
            # EOS ends a choice unless ignore_eos; constrained output always ends on it
            is_eos = event.token_id in params.eos_token_ids
            if is_eos and (not params.ignore_eos or constraint is not None):
                event.finish_reason = "stop"
            elif constraint is not None and constraint.finished:
                event.finish_reason = "stop"  # complete: no step is spent sampling the EOS
            elif produced == params.max_new_tokens:
                # a constrained output that is complete on its last allowed token has stopped
                event.finish_reason = "stop" if constraint is not None and constraint.complete else "length"
            yield event
            if event.finish_reason:
                return
            result = await runner.step(
                [event.token_id],
                allowed_mask=constraint and constraint.allowed_bits(),
                plan=LoopPlan(params.max_new_tokens - produced - 1, stop_ids) if constraint is None else None,
            )
    finally:
        await runner.close()


def _copy(message: swarm_pb2.SamplingParams) -> swarm_pb2.SamplingParams:
    copy = swarm_pb2.SamplingParams()
    copy.CopyFrom(message)
    return copy


class _Raised:
    """An exception of the source, carried through the queue of `read_ahead`."""

    def __init__(self, error: BaseException):
        self.error = error


async def read_ahead(source: AsyncIterator[Any], depth: int = 2) -> AsyncIterator[Any]:
    """Iterate `source` in a task of its own, up to `depth` items ahead of the consumer.

    Why: with `generate` as the source, the next step of a session goes to the first peer as soon
    as its token is known, and the token's text work (detokenizing, stop sequences, the SSE chunk)
    happens while the peers compute. Done in line, that work sat between a peer's answer and the
    next step of every stream the gateway serves: the first span's next pass waits for the last
    session of the group, so at 16 streams ~16 ms per round was text work in the critical path.

    Closing this generator (or an error) cancels the task, which closes `source`: `generate` then
    closes its route. If the consumer stops early (a stop sequence), the source may have run up to
    `depth` steps more; the route's caches hold those tokens, and `RouteRunner.tokens` says so.
    """
    queue: asyncio.Queue = asyncio.Queue(maxsize=depth)
    finished = object()

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put(item)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            await queue.put(_Raised(exc))
        else:
            await queue.put(finished)

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is finished:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await source.aclose()

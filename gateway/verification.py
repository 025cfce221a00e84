"""Re-execution checks: a fraction of steps runs again on a replica, and a peer that lies is convicted.

Why and how (docs/verification.md has the whole argument):

* **Which steps.** Each step of a generation is checked with probability `--verify-fraction`, on
  one hop of its route drawn uniformly (the last span only when the step samples).
* **How a replica gets the KV prefix.** As failover does: by replay from token ids. The check
  opens fresh sessions on a *check chain*: the route's own peers before hop `i`, then a replica of
  hop `i`'s span (another peer announcing exactly those blocks at the same precision), and steps
  the whole sequence (history + the step's tokens) from position 0. The gateway keeps no hidden
  states, so the hops before `i` recompute them; the check costs one prefill of the sequence over
  blocks `[0, end of hop i)`. The route's own sessions are not touched.
* **Off the critical path.** The check needs only token ids, so it starts with the step and runs
  on other sessions at the same time; the step waits for it only at its end, before the token
  is released: a checked step never hands the client an answer that failed its check.
* **Comparing.** At every boundary up to hop `i` the route's answer for the step's rows is
  compared with the check's: hidden states within the larger tolerance of the two peers' records
  (`PeerRecord.check_tolerance`, by precision), a sampled token exactly (same seed: the last span
  seeds per position) or as a near tie within that margin. Before hop `i` the check asked the
  same peer the same question, so a difference there is a peer contradicting itself.
* **Who lies.** At the first boundary `k` where they differ, a referee (a third peer of that
  span, fed the check's own input for it) answers too; whichever side it contradicts is
  convicted (`FailurePolicy.convict`: banned for `--verify-ban` seconds, no probation). Without a
  referee's verdict, a peer that contradicted itself (k < i: asked twice, answered twice
  differently) is convicted; two peers that disagree with nobody to tell them apart are recorded
  as inconclusive and nobody is banned.
* **Failover.** When the route's peer is convicted, the step is retried after the hop fails over
  (`RouteRunner` replays the history on the replacement): the client loses no token, and the
  replay also rebuilds the caches after it. Every other runner moves its hops off a convicted
  peer at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.peer_client import ChannelPool, PeerError, PeerSession
from discovery.records import TOLERANCES, PeerRecord, PeerState
from gateway.answer_checks import hidden_distance, tokens_agree
from gateway.failure_policy import BadAnswer, Failover
from gateway.metrics import record_answer_check
from gateway.routing import Hop, Route
from protos import swarm_pb2

if TYPE_CHECKING:
    from gateway.generation import RouteRunner

log = logging.getLogger("gateway.verification")

CHECK_TOP_LOGPROBS = 5  # alternatives the check's last span returns, to recognise a near tie


@dataclass
class Check:
    """One step's re-execution: hop `index` of the route, checked against `chain[-1]`."""

    index: int
    chain: Route  # the route's hops [0, index) then the replica of hop `index`
    sequence: list[int]  # every token of the step's sequence (history + the step's tokens)
    rows: int  # the step's own tokens: the rows compared
    sample: bool
    allowed_mask: bytes | None
    task: asyncio.Task


def _draws(runner: RouteRunner, hop: Hop, sample: bool) -> bool:
    """Whether `hop`'s answer to a step is a random draw (a sampled token at a temperature)."""
    return sample and hop.end == runner.route[-1].end and runner.sampling.temperature > 0


class Verifier:
    """One per gateway: picks the steps to check, runs the checks, and judges disagreements."""

    def __init__(self, fraction: float, rng: random.Random | None = None):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"verify fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self.rng = rng or random.Random()

    def pick(self) -> bool:
        return self.fraction > 0 and self.rng.random() < self.fraction

    def unpicked_run(self, limit: int) -> int:
        """How many steps in a row `pick` would pass over, at most `limit`: one draw for a run of
        steps (geometric, as `limit` calls of `pick` would give), for a decode loop that fixes its
        length before it starts. Below `limit`: the step after the run is to be checked."""
        if self.fraction <= 0:
            return limit
        if self.fraction >= 1:
            return 0
        run = math.log(1.0 - self.rng.random()) / math.log(1.0 - self.fraction)
        return int(min(run, limit))

    # -- starting a check -------------------------------------------------------------------------
    def start(
        self, runner: RouteRunner, token_ids: list[int], sample: bool, allowed_mask: bytes | None
    ) -> Check | None:
        """Start re-executing the step about to run on `runner`'s route; None when no replica."""
        route = runner.route
        failover = runner.failover
        choices = [i for i, hop in enumerate(route) if sample or hop.end != failover.num_blocks]
        if not choices:
            return None
        index = self.rng.choice(choices)
        hop = route[index]
        sequence = runner.history + token_ids
        replica = self._other_peer(failover, hop, {hop.peer_id}, len(sequence), _draws(runner, hop, sample))
        if replica is None:
            self._outcome(failover, "no_replica")
            return None
        chain = (*route[:index], replica)
        task = asyncio.ensure_future(
            run_chain(runner.pool, chain, sequence, runner, sample=sample, allowed_mask=allowed_mask)
        )
        # a check dropped with its step (a failover, a client gone) leaves no unread exception
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return Check(index, chain, sequence, len(token_ids), sample, allowed_mask, task)

    def _other_peer(
        self, failover: Failover, hop: Hop, avoid: set[str], tokens: int, draws: bool = False
    ) -> Hop | None:
        """A peer serving `hop`'s blocks (all of its span or a part) at its precision, not banned
        and not in `avoid`, as a hop on those blocks. `draws`: it samples a random token, which
        only a peer of the same version draws alike from the same seed (`peer.sampling`)."""
        records = failover.known()
        own = _record(records, hop.peer_id)
        excluded = failover.excluded() | avoid
        candidates = [
            r
            for r in records
            if r.start <= hop.start < hop.end <= r.end
            and r.peer_id not in excluded
            and r.state == PeerState.ONLINE
            and r.free_cache_tokens >= tokens
            and (own is None or r.precision == own.precision)
            and (not draws or own is None or r.version == own.version)
        ]
        if not candidates:
            return None
        record = self.rng.choice(candidates)
        return Hop(record.peer_id, record.address, hop.start, hop.end)

    # -- judging ------------------------------------------------------------------------------------
    async def judge(
        self, runner: RouteRunner, check: Check, results: list[swarm_pb2.StepResult]
    ) -> tuple[int, BadAnswer] | None:
        """Compare the route's `results` for the step with the check's; returns the hop to fail
        over and why when the route's peer there is convicted, else None."""
        failover = runner.failover
        try:
            answers = await check.task
        except PeerError as exc:
            # A peer that fails a check is at fault like one that fails a route (banned, on
            # probation): a check that fails proves nothing about the route's answer.
            self._blame_failure(failover, check.chain, exc)
            self._outcome(failover, "failed")
            return None
        if not isinstance(answers, list):  # a check answer that was malformed: its sender convicted
            self._outcome(failover, "failed")
            return self._route_hop_of(runner, answers)
        records = failover.known()
        for k in range(check.index + 1):
            ours, theirs = results[k], answers[k]
            peers = (runner.route[k].peer_id, check.chain[k].peer_id)
            if self._agree(records, peers, ours, theirs, check):
                continue
            return await self._settle(runner, check, k, results, answers, records)
        self._outcome(failover, "agreed")
        return None

    async def _settle(
        self,
        runner: RouteRunner,
        check: Check,
        k: int,
        results: list[swarm_pb2.StepResult],
        answers: list[swarm_pb2.StepResult],
        records: list[PeerRecord],
    ) -> tuple[int, BadAnswer] | None:
        """The route and the check disagree first at hop `k`: ask a referee, convict the liar."""
        failover = runner.failover
        route_hop, check_hop = runner.route[k], check.chain[k]
        ours, theirs = results[k], answers[k]
        log.warning(
            "check of blocks [%d, %d): peer %s and peer %s disagree", route_hop.start, route_hop.end,
            route_hop.peer_id, check_hop.peer_id,
        )  # fmt: skip
        referee = self._other_peer(
            failover, route_hop, {route_hop.peer_id, check_hop.peer_id}, len(check.sequence),
            _draws(runner, route_hop, check.sample),
        )  # fmt: skip
        verdict = None
        if referee is not None:
            feed = answers[k - 1].hidden if k else None
            try:
                said = await run_chain(
                    runner.pool, (referee,), check.sequence, runner, sample=check.sample,
                    allowed_mask=check.allowed_mask, hidden=feed,
                )  # fmt: skip
            except PeerError as exc:
                self._blame_failure(failover, (referee,), exc)
                said = None
            if isinstance(said, list):
                peers = (referee.peer_id,)
                with_check = self._agree(records, (*peers, check_hop.peer_id), said[0], theirs, check)
                with_route = self._agree(records, (*peers, route_hop.peer_id), said[0], ours, check)
                if with_check and not with_route:
                    verdict = route_hop
                elif with_route and not with_check:
                    verdict = check_hop
        if verdict is None and route_hop.peer_id == check_hop.peer_id:
            verdict = route_hop  # the same peer gave two answers to one question
        if verdict is None:
            self._outcome(failover, "inconclusive")
            return None
        self._outcome(failover, "convicted")
        failover.policy.convict(verdict.peer_id, verdict.address, "disagreed")
        if verdict.peer_id != route_hop.peer_id:
            return None  # the replica lied; the route's answer stands
        return k, BadAnswer(route_hop.address, "disagreed", f"blocks [{route_hop.start}, {route_hop.end}) "
                            "differ from their re-execution on other peers")  # fmt: skip

    def _agree(
        self,
        records: list[PeerRecord],
        peers: tuple[str, ...],
        a: swarm_pb2.StepResult,
        b: swarm_pb2.StepResult,
        check: Check,
    ) -> bool:
        tolerance = max(_tolerance(records, peer) for peer in peers)
        if not a.HasField("hidden") and not b.HasField("hidden"):  # the last span: sampled tokens
            return not check.sample or tokens_agree(a, b, tolerance) or tokens_agree(b, a, tolerance)
        return hidden_distance(a.hidden, b.hidden, check.rows) <= tolerance

    def _route_hop_of(self, runner: RouteRunner, convicted: BadAnswer) -> tuple[int, BadAnswer] | None:
        """A check answer convicted a peer that the route uses too: that hop fails over."""
        for index, hop in enumerate(runner.route):
            if hop.address == convicted.address:
                return index, convicted
        return None

    @staticmethod
    def _blame_failure(failover: Failover, chain: Route, error: PeerError) -> None:
        for hop in chain:
            if hop.address == error.address:
                failover.peer_failed(hop.peer_id, error)

    @staticmethod
    def _outcome(failover: Failover, outcome: str) -> None:
        stats = failover.policy.stats.checks
        stats[outcome] = stats.get(outcome, 0) + 1
        record_answer_check(outcome)


def _record(records: list[PeerRecord], peer_id: str) -> PeerRecord | None:
    return next((r for r in records if r.peer_id == peer_id), None)


def _tolerance(records: list[PeerRecord], peer_id: str) -> float:
    """The peer's tolerance; a peer whose record is gone gets the loosest (never a false conviction)."""
    record = _record(records, peer_id)
    return record.check_tolerance if record is not None else max(TOLERANCES.values())


async def run_chain(
    pool: ChannelPool,
    chain: Route,
    sequence: list[int],
    runner: RouteRunner,
    *,
    sample: bool,
    allowed_mask: bytes | None,
    hidden: swarm_pb2.Tensor | None = None,
) -> list[swarm_pb2.StepResult] | BadAnswer:
    """Open fresh sessions on `chain` and step `sequence` through it from position 0; every hop's
    result. `hidden`: the first hop's input when it is not the model's first span. A malformed
    answer convicts its sender and is returned as its `BadAnswer`."""
    failover = runner.failover
    sessions: list[PeerSession] = []
    sampling = swarm_pb2.SamplingParams()
    sampling.CopyFrom(runner.sampling)
    sampling.logprobs = True
    sampling.top_logprobs = max(sampling.top_logprobs, CHECK_TOP_LOGPROBS)
    try:
        results = []
        for hop in chain:
            session = PeerSession(pool, hop.address)
            sessions.append(session)
            last = hop.end == failover.num_blocks
            # an empty session id: the peer makes one up and keeps nothing for a resume
            message = swarm_pb2.OpenSession(
                start_block=hop.start, end_block=hop.end, max_length=len(sequence),
                request_id=runner.request_id, wire_dtype=runner.wire_dtype,
            )  # fmt: skip
            if last:
                message.sampling.CopyFrom(sampling)
            step = swarm_pb2.Step(token_ids=sequence, position=0, sample=sample and last)
            if allowed_mask and last and sample:
                step.allowed_token_mask = allowed_mask
            if results:
                step.hidden.CopyFrom(results[-1].hidden)
                step.pass_id = results[-1].pass_id
            elif hidden is not None:
                step.hidden.CopyFrom(hidden)
            async with asyncio.timeout(runner.step_timeout * 2):
                await session.open(message, (("x-request-id", runner.request_id),))
                result = await session.step(step)
            problem = runner.malformed(result, hop, len(sequence), sample, allowed_mask)
            if problem is not None:
                bad = BadAnswer(hop.address, "malformed", problem)
                failover.policy.convict(hop.peer_id, hop.address, "malformed")
                return bad
            results.append(result)
        return results
    except TimeoutError as exc:
        raise PeerError(chain[len(sessions) - 1].address, None, "no answer to a check in time") from exc
    finally:
        for session in sessions:
            with contextlib.suppress(Exception):
                session.abort()

"""Drive one generation through a route of peers.

The gateway holds one `Inference` stream per hop. Each step sends token ids to the first span,
passes each span's hidden states (still encoded, never decoded here) to the next, and gets a
sampled token back from the last span. The runner keeps every token it has sent, so it can replay
them on a replacement peer after a failure.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.routing import BanList, Hop, Route, plan_route
from peer.client import ChannelPool, PeerError, PeerSession
from protos import swarm_pb2
from swarm.dht import PeerRecord

log = logging.getLogger("gateway.generation")


class NoRouteError(Exception):
    """No chain of live peers covers the model's blocks right now."""


@dataclass
class TokenEvent:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


@dataclass
class GenerationParams:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: swarm_pb2.SamplingParams
    eos_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Cache reuse across turns: the peers' session id, and whether to resume what they kept.
    session_id: str = ""
    resume: bool = False


class RouteRunner:
    """Open sessions on every hop of a route and push steps through them in order."""

    def __init__(self, pool: ChannelPool, route: Route, step_timeout: float):
        self.pool = pool
        self.route = route
        self.step_timeout = step_timeout
        self.sessions: list[PeerSession] = []
        self.position = 0
        self.tokens: list[int] = []  # every token the route's caches hold, in order

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
        that evicted its cache simply gets the rest replayed.
        """
        session_id = session_id or uuid.uuid4().hex
        metadata = (("x-request-id", request_id),)
        held: list[int] = []

        async def open_hop(hop: Hop, is_last: bool) -> PeerSession:
            session = PeerSession(self.pool, hop.address)
            message = swarm_pb2.OpenSession(
                session_id=session_id,
                start_block=hop.start,
                end_block=hop.end,
                max_length=max_length,
                request_id=request_id,
            )
            if is_last:
                message.sampling.CopyFrom(sampling)
            if resume_tokens:
                message.resume = True
                message.resume_tokens.extend(resume_tokens)
            opened = await self._with_deadline(hop, session.open(message, metadata))
            held.append(opened.cache_length if resume_tokens else 0)
            return session

        last = len(self.route) - 1
        results = await asyncio.gather(
            *(open_hop(hop, i == last) for i, hop in enumerate(self.route)), return_exceptions=True
        )
        self.sessions = [result for result in results if isinstance(result, PeerSession)]
        for result in results:
            if isinstance(result, BaseException):
                await self.close()
                raise result
        self.position = min(held, default=0)
        self.tokens = list(resume_tokens[: self.position]) if resume_tokens else []
        return self.position

    async def step(self, token_ids: list[int], sample: bool = True) -> swarm_pb2.StepResult:
        hidden = None
        result = None
        for hop, session in zip(self.route, self.sessions, strict=True):
            step = swarm_pb2.Step(token_ids=token_ids, position=self.position, sample=sample and hop is self.route[-1])
            if hidden is not None:
                step.hidden.CopyFrom(hidden)
            result = await self._with_deadline(hop, session.step(step))
            hidden = result.hidden
        del self.tokens[self.position :]
        self.tokens.extend(token_ids)
        self.position += len(token_ids)
        return result

    async def _with_deadline(self, hop: Hop, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self.step_timeout)
        except TimeoutError as exc:
            raise PeerError(hop.address, None, f"no answer within {self.step_timeout:.1f} s") from exc

    async def close(self) -> None:
        sessions, self.sessions = self.sessions, []
        await asyncio.gather(*(session.close() for session in sessions), return_exceptions=True)


class Swarm:
    """What the gateway knows of the swarm: DHT lookups (cached briefly), bans, route planning."""

    def __init__(self, dht, pool: ChannelPool, *, refresh: float = 1.0, ban_duration: float = 30.0):
        self.dht = dht
        self.pool = pool
        self.refresh = refresh
        self.bans = BanList(ban_duration)
        self._cache: dict[str, tuple[float, list[PeerRecord]]] = {}

    async def peers(self, model: str, fresh: bool = False) -> list[PeerRecord]:
        loop = asyncio.get_running_loop()
        cached = self._cache.get(model)
        if cached and not fresh and loop.time() - cached[0] < self.refresh:
            return cached[1]
        records = await self.dht.peers(model) if self.dht is not None else []
        self._cache[model] = (loop.time(), records)
        return records

    async def plan(self, model: str, num_blocks: int, min_free_tokens: int = 0) -> Route:
        exclude = self.bans.banned()
        records = await self.peers(model)
        route = plan_route(records, num_blocks, exclude=exclude, min_free_tokens=min_free_tokens)
        if route is None:  # the cache may be stale: a peer may have joined since
            records = await self.peers(model, fresh=True)
            route = plan_route(records, num_blocks, exclude=exclude, min_free_tokens=min_free_tokens)
        if route is None:
            raise NoRouteError(f"no live peers cover all {num_blocks} blocks of {model}")
        return route

    def peers_at(self, address: str) -> set[str]:
        """Ids of the peers last seen at `address` (to ban the one that failed)."""
        return {
            record.peer_id for _, records in self._cache.values() for record in records if record.address == address
        }

    def is_live(self, route: Route, records: list[PeerRecord]) -> bool:
        banned = self.bans.banned()
        live = {record.peer_id for record in records if record.state == "online"}
        return all(hop.peer_id in live and hop.peer_id not in banned for hop in route)


async def generate(
    runner: RouteRunner, params: GenerationParams, max_length: int
) -> AsyncIterator[TokenEvent]:
    """Prefill the prompt, then decode until EOS or max_new_tokens. The caller stops early by
    closing the generator (use `contextlib.aclosing`); the runner's sessions close either way."""
    try:
        resume = params.prompt_ids[:-1] if params.resume else None  # at least one token must run
        start = await runner.open(
            max_length, params.sampling, params.request_id, session_id=params.session_id, resume_tokens=resume
        )
        if start:
            log.debug(
                "request %s resumes at token %d of %d", params.request_id, start, len(params.prompt_ids)
            )
        result = await runner.step(params.prompt_ids[start:])
        for produced in range(1, params.max_new_tokens + 1):
            event = TokenEvent(
                token_id=result.token_id,
                logprob=result.logprob,
                top_logprobs=[(item.token_id, item.logprob) for item in result.top_logprobs],
            )
            yield event
            finished = event.token_id in params.eos_token_ids and not params.ignore_eos
            if finished or produced == params.max_new_tokens:
                return
            result = await runner.step([event.token_id])
    finally:
        await runner.close()

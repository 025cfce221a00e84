"""The one place that decides what a peer's failure means: retry elsewhere, ban, or tell the client.

Every failure of a peer reaches the gateway as a `PeerError` (a gRPC status, a broken stream, or
a missed step deadline). `FailurePolicy.judge` sorts it into one of three verdicts:

* `Verdict.REQUEST_FAULT` (INVALID_ARGUMENT): the request itself is wrong; another peer would say
  the same, so nothing is retried, nobody is banned, and the client gets a 400.
* `Verdict.PEER_BUSY` (RESOURCE_EXHAUSTED): a healthy peer with no cache room. Another replica
  is tried, nobody is banned; when none has room the client gets a 503 to retry shortly.
* `Verdict.PEER_FAULT` (anything else: an error status, a broken stream, a missed step
  deadline, or a `BadAnswer`: an answer the gateway rejected): the peer is banned (new sessions avoid it) and the hop is replaced and replayed
  (`gateway.generation.RouteRunner`). A first ban is lifted as soon as the peer answers an `Info`
  probe (`readmit`, every second, and at once when a model would otherwise have no route): a
  peer that stalled for a moment is back when it answers, instead of 30 s later.
  A `BadAnswer` (a malformed result, or one that failed a re-execution check,
  `gateway.verification`) *convicts* the peer instead: banned for `conviction_ban` seconds with no
  probation, since a peer that lies still answers `Info`.

`RouteRunner` talks to the swarm only through `Failover`, the policy bound to one model and the
gateway's swarm view: what to exclude, which records are candidates, the gateway's own load on
each peer, and the counters. `FailureStats` is shared by every runner of a gateway (`/health`, the
chaos benchmark).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from common.peer_client import PeerError
from gateway import errors
from gateway.metrics import record_conviction, record_failover
from gateway.routing import NoRouteError

if TYPE_CHECKING:
    from discovery.records import PeerRecord
    from gateway.swarm_view import SwarmView

log = logging.getLogger("gateway.failure_policy")


class BadAnswer(PeerError):
    """A peer answered, but the gateway rejects the answer: `reason` is "malformed" (wrong shape,
    NaN, a token outside the vocabulary: `gateway.answer_checks`) or "disagreed" (a re-execution on
    a replica gave another answer and the referee sided with it: `gateway.verification`)."""

    def __init__(self, address: str, reason: str, message: str):
        super().__init__(address, None, f"{reason} answer: {message}")
        self.reason = reason


class Verdict(enum.Enum):
    REQUEST_FAULT = "request_fault"
    PEER_BUSY = "peer_busy"
    PEER_FAULT = "peer_fault"


@dataclass
class _Ban:
    until: float
    address: str
    probation: bool  # lifted as soon as the peer answers an `Info` probe
    convicted: str = ""  # BadAnswer.reason when the peer's answers were rejected: never on probation


class BanList:
    """Peers that failed recently; they are skipped until their ban runs out or, on probation,
    until they answer a health probe.

    A peer that hung for a moment (a stalled process, a GC pause, a busy link) is healthy again
    as soon as it answers, and a swarm with two replicas must not lose a span for the whole ban
    because each stalled once. So a first failure is on probation: `FailurePolicy.readmit` lifts
    it when `Info` answers. A peer that fails again within `duration` of being readmitted keeps its
    whole ban (a peer that answers `Info` but fails its steps must not flap in and out).
    """

    def __init__(self, duration: float = 30.0, clock=time.monotonic):
        self.duration = duration
        self._clock = clock
        self._bans: dict[str, _Ban] = {}
        self._readmitted: dict[str, float] = {}  # peer id -> when it was last readmitted

    def ban(self, peer_id: str, address: str = "") -> None:
        now = self._clock()
        repeat = now - self._readmitted.get(peer_id, -math.inf) < self.duration
        log.warning(
            "banning peer %s for %.0f s%s", peer_id, self.duration, "" if repeat else " or until it answers"
        )
        self._bans[peer_id] = _Ban(now + self.duration, address, probation=not repeat)

    def convict(self, peer_id: str, address: str, reason: str, duration: float) -> None:
        """Ban a peer whose answers were rejected (`BadAnswer`) for `duration` seconds, with no
        probation: a peer that lies answers `Info` like an honest one."""
        if self.convictions().get(peer_id) is None:
            log.warning("peer %s convicted (%s answer); banned for %.0f s", peer_id, reason, duration)
        self._bans[peer_id] = _Ban(self._clock() + duration, address, probation=False, convicted=reason)

    def convictions(self) -> dict[str, str]:
        """Peer id -> reason, for the convicted peers whose ban runs."""
        self.banned()
        return {peer: ban.convicted for peer, ban in self._bans.items() if ban.convicted}

    def banned(self) -> set[str]:
        now = self._clock()
        self._bans = {peer: ban for peer, ban in self._bans.items() if ban.until > now}
        return set(self._bans)

    def probation(self, everyone: bool = False) -> dict[str, str]:
        """Peer id -> address of the bans a probe may lift (`everyone`: all of them)."""
        self.banned()
        return {
            peer: ban.address
            for peer, ban in self._bans.items()
            if ban.address and not ban.convicted and (everyone or ban.probation)
        }

    def readmitted_since(self, peer_id: str, when: float) -> bool:
        """Whether `peer_id` was readmitted after `when` (this list's clock) and is not banned again."""
        return self._readmitted.get(peer_id, -math.inf) > when and peer_id not in self.banned()

    def lift(self, peer_id: str) -> None:
        if self._bans.pop(peer_id, None) is not None:
            log.info("peer %s answers again; readmitted", peer_id)
            self._readmitted[peer_id] = self._clock()


@dataclass
class FailoverEvent:
    hop_index: int
    peer_id: str
    reason: str  # "failed" (error, broken stream, deadline) or "draining" (peer asked to move)
    pause_s: float = 0.0  # extra time the step that hit the failure took, as the client saw it
    replacement: tuple[str, ...] = ()  # peer ids now serving the hop's span


@dataclass
class FailureStats:
    """Counters shared by all runners of one gateway (a single event loop: no locks needed)."""

    failovers: int = 0  # hops replaced after a failure
    migrations: int = 0  # hops moved away from a draining peer
    exhausted: int = 0  # streams that ended because no replacement came within the budget
    pauses_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))
    convictions: dict[str, int] = field(default_factory=dict)  # BadAnswer.reason -> peers convicted
    checks: dict[str, int] = field(default_factory=dict)  # re-execution check outcome -> count
    started: float = field(default_factory=time.time)

    def record(self, event: FailoverEvent) -> None:
        if event.reason == "draining":
            self.migrations += 1
        else:
            self.failovers += 1
        self.pauses_ms.append(round(event.pause_s * 1000, 1))

    def to_dict(self) -> dict:
        pauses = list(self.pauses_ms)
        return {
            "failovers": self.failovers,
            "migrations": self.migrations,
            "exhausted": self.exhausted,
            "pause_ms_p50": statistics.median(pauses) if pauses else None,
            "pause_ms_max": max(pauses) if pauses else None,
            "pauses_ms": pauses[-200:],
            "convictions": dict(self.convictions),
            "checks": dict(self.checks),
        }


class FailurePolicy:
    """One per gateway: the verdict on a failure, the bans it leads to, what the client sees.

    `replace_timeout` bounds the search for a replacement after a failure (a hung peer is first
    detected by the step deadline, so a stream with no replacement ends within step_timeout +
    replace_timeout); `retry_interval` spaces fresh DHT lookups during that search.
    """

    def __init__(
        self,
        ban_duration: float = 30.0,
        replace_timeout: float = 5.0,
        retry_interval: float = 0.25,
        probe: Callable[[str], Awaitable[bool]] | None = None,
        conviction_ban: float = 3600.0,
    ):
        self.bans = BanList(ban_duration)
        self.conviction_ban = conviction_ban
        self.probe = probe  # address -> whether the peer answers a health probe now
        self.replace_timeout = replace_timeout
        self.retry_interval = retry_interval
        self.stats = FailureStats()

    @staticmethod
    def judge(error: PeerError) -> Verdict:
        if error.code == grpc.StatusCode.INVALID_ARGUMENT:
            return Verdict.REQUEST_FAULT
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Verdict.PEER_BUSY
        return Verdict.PEER_FAULT

    def peer_failed(self, peer_id: str, error: PeerError) -> Verdict:
        """Judge `error` from `peer_id` and ban the peer when it is at fault."""
        verdict = self.judge(error)
        if isinstance(error, BadAnswer):
            self.convict(peer_id, error.address, error.reason)
        elif verdict is Verdict.PEER_FAULT:
            self.bans.ban(peer_id, error.address)
        return verdict

    def convict(self, peer_id: str, address: str, reason: str) -> None:
        """Ban `peer_id` for its answers (see `BanList.convict`); counted once per conviction."""
        if peer_id not in self.bans.convictions():
            self.stats.convictions[reason] = self.stats.convictions.get(reason, 0) + 1
            record_conviction(reason)
        self.bans.convict(peer_id, address, reason, self.conviction_ban)

    async def readmit(self, everyone: bool = False) -> set[str]:
        """Probe banned peers (those on probation; `everyone`: all) and lift the bans of those
        that answer; returns their ids."""
        candidates = self.bans.probation(everyone)
        if not candidates or self.probe is None:
            return set()
        answers = await asyncio.gather(*(self.probe(address) for address in candidates.values()))
        back = {peer for peer, answered in zip(candidates, answers, strict=True) if answered}
        for peer in back:
            self.bans.lift(peer)
        return back

    def peer_leaving(self, peer_id: str) -> None:
        """A draining peer: no new sessions there either, though it did nothing wrong."""
        self.bans.ban(peer_id)

    def excluded(self) -> set[str]:
        return self.bans.banned()

    def client_error(self, error: PeerError | NoRouteError) -> errors.OpenAIError:
        """What the client sees when a generation ends on `error` (after any failover)."""
        if isinstance(error, NoRouteError):
            return errors.unavailable(f"{error}; retry when peers join", retry_after=5)
        verdict = self.judge(error)
        if verdict is Verdict.REQUEST_FAULT:
            return errors.invalid_request(error.message)
        if verdict is Verdict.PEER_BUSY:
            return errors.unavailable(
                "the swarm has no free cache for this request; retry shortly", retry_after=2
            )
        return errors.unavailable("a peer of the route failed; retry", retry_after=1)

    def bind(self, swarm: SwarmView, model: str, num_blocks: int) -> Failover:
        return Failover(self, swarm, model, num_blocks)


class Failover:
    """The narrow view a `RouteRunner` has of the swarm: the policy bound to one model."""

    def __init__(self, policy: FailurePolicy, swarm: SwarmView, model: str, num_blocks: int):
        self.policy = policy
        self.swarm = swarm
        self.model = model
        self.num_blocks = num_blocks

    @property
    def timeout(self) -> float:
        return self.policy.replace_timeout

    @property
    def retry_interval(self) -> float:
        return self.policy.retry_interval

    def peer_failed(self, peer_id: str, error: PeerError) -> Verdict:
        return self.policy.peer_failed(peer_id, error)

    def peer_leaving(self, peer_id: str) -> None:
        self.policy.peer_leaving(peer_id)

    def excluded(self) -> set[str]:
        return self.policy.excluded()

    def convicted(self) -> dict[str, str]:
        """Peers whose answers were rejected (id -> reason): runners move their hops off them."""
        return self.policy.bans.convictions()

    def readmitted_since(self, peer_id: str, when: float) -> bool:
        return self.policy.bans.readmitted_since(peer_id, when)

    async def records(self, timeout: float) -> list[PeerRecord]:
        """A fresh lookup of the model's peers (the last records seen if it takes too long)."""
        return await self.swarm.peers(self.model, fresh=True, timeout=timeout)

    def known(self) -> list[PeerRecord]:
        """Every peer seen recently, without a lookup (see `SwarmView.known`)."""
        return self.swarm.known(self.model)

    @property
    def local_load(self):
        return self.swarm.load()

    @property
    def rtt(self) -> dict[str, float]:
        """Measured round trips by peer address (`gateway.rtt`), for planning replacements."""
        return self.swarm.rtt

    def opened(self, peer_id: str) -> None:
        self.swarm.opened(peer_id)

    def closed(self, peer_id: str) -> None:
        self.swarm.closed(peer_id)

    def replaced(self, event: FailoverEvent) -> None:
        record_failover("peer_failed" if event.reason == "failed" else event.reason)

    def measured(self, event: FailoverEvent) -> None:
        self.policy.stats.record(event)

    def gave_up(self) -> None:
        self.policy.stats.exhausted += 1

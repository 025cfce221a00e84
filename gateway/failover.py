"""What a `RouteRunner` needs to replace a failed hop mid-stream, and the figures it leaves behind.

`FailoverPolicy` ties a runner to the swarm view (DHT records, bans) of one model and bounds how
long a runner may look for a replacement. `FailoverStats` is shared by every runner of a gateway:
it counts failovers and remembers the pause each one caused, for `/health` and the chaos benchmark.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from gateway.generation import Swarm

# A peer that answers INVALID_ARGUMENT says the request itself is wrong: another peer would say
# the same, so that is reported to the client instead of failing over.
NOT_RETRYABLE = frozenset({grpc.StatusCode.INVALID_ARGUMENT})


@dataclass
class FailoverEvent:
    hop_index: int
    peer_id: str
    reason: str  # "failed" (error, broken stream, deadline) or "draining" (peer asked to move)
    pause_s: float  # extra time the step that hit the failure took, as the client saw it
    replacement: tuple[str, ...]  # peer ids now serving the hop's span


@dataclass
class FailoverStats:
    """Counters shared by all runners of one gateway (a single event loop: no locks needed)."""

    failovers: int = 0  # hops replaced after a failure
    migrations: int = 0  # hops moved away from a draining peer
    exhausted: int = 0  # streams that ended because no replacement came within the budget
    pauses_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))
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
        }


@dataclass
class FailoverPolicy:
    """How a runner finds replacements: which model, the swarm view, and the time budget.

    `timeout` bounds the search that follows a detected failure (a hung peer is detected by the
    step deadline first, so a stream with no replacement ends within step_timeout + timeout).
    """

    swarm: Swarm
    model: str
    num_blocks: int
    timeout: float = 5.0
    stats: FailoverStats = field(default_factory=FailoverStats)
    retry_interval: float = 0.25  # between fresh DHT lookups while no replacement is found

"""Which sessions' steps a forward pass should wait for (the batching window).

A session has one step in flight at a time: after this peer answers it, the step goes through the
gateway (and the other peers of the route) and comes back as the session's next step. Without a
wait, a pass starts at the first arrival and runs whatever is queued: sessions that come back a
little later (the gateway handles their streams one after the other) or that are still on the other
peer of a pipeline form a second group, and the groups stay out of phase for the rest of the
generation. Measured on the 2-peer bench swarm at 8 streams: 2.6 and 3.7 session steps per pass.

`BatchWindow` tracks which sessions are active (answered here lately, stream still open, next step
not back yet); the scheduler waits for those, bounded (see `BatchScheduler._gather`). Once merged,
the sessions stay in phase, so later passes wait only for the gateway's jitter. A single stream
never waits: when its step arrives, no other session is expected.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

ACTIVE_S = 5.0  # a session silent for longer than this is not expected back soon
EMA = 0.5  # weight of the newest round-trip sample


@dataclass
class _Track:
    done_at: float = 0.0  # when this peer last answered the session's step (0: in flight/never)
    round_trip: float | None = None  # smoothed seconds from our answer to its next step


class BatchWindow:
    """Per-session round-trip estimates, keyed by the session object's id."""

    def __init__(self) -> None:
        self._tracks: dict[int, _Track] = {}

    def arrived(self, session: object, now: float | None = None) -> None:
        """A step of `session` was submitted; learn its round trip (kept for diagnosis)."""
        now = time.perf_counter() if now is None else now
        track = self._tracks.setdefault(id(session), _Track())
        if track.done_at:
            sample = now - track.done_at
            track.round_trip = (
                sample if track.round_trip is None else EMA * sample + (1 - EMA) * track.round_trip
            )
        track.done_at = 0.0

    def stepped(self, session: object, now: float | None = None) -> None:
        """This peer answered a step of `session`."""
        track = self._tracks.setdefault(id(session), _Track())
        track.done_at = time.perf_counter() if now is None else now

    def forget(self, session: object) -> None:
        self._tracks.pop(id(session), None)

    def expected(self, present: Iterable[object], now: float | None = None) -> set[int]:
        """Ids of the active sessions not in `present`: answered here lately, step not back yet."""
        now = time.perf_counter() if now is None else now
        skip = {id(session) for session in present}
        return {
            key
            for key, track in self._tracks.items()
            if key not in skip and track.done_at and now - track.done_at < ACTIVE_S
        }

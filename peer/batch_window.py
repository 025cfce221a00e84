"""Which sessions' steps a forward pass should briefly wait for (the batching window).

A session has one step in flight at a time: after this peer answers it, the step goes through the
gateway (and the other peers of the route) and comes back as the session's next step. Sessions
that finished in the same pass come back at slightly different times (the gateway handles their
streams one after the other), so a pass that starts at the first arrival runs one or two of them
and the rest wait for the next pass: the batch fragments, and in a pipeline of peers the pieces
stay out of phase for the rest of the generation (measured: 2.5 sessions per pass at 8 streams).

`BatchWindow` learns each session's round trip (time from our answer to its next step) and
predicts when it returns. The scheduler waits, at most `--batch-wait-ms`, only for sessions
predicted to arrive inside that wait: a session busy on another peer for longer is not waited
for, so out-of-phase groups cost nothing and a single stream never waits.
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
        """A step of `session` was submitted; learn its round trip."""
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

    def expected(self, present: Iterable[object], wait: float, now: float | None = None) -> set[int]:
        """Ids of the sessions not in `present` predicted to send a step within `wait` seconds."""
        now = time.perf_counter() if now is None else now
        skip = {id(session) for session in present}
        return {
            key
            for key, track in self._tracks.items()
            if key not in skip
            and track.done_at
            and track.round_trip is not None
            and now - track.done_at < ACTIVE_S
            and track.done_at + track.round_trip <= now + wait
        }

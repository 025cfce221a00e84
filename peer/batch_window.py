"""Which sessions' steps a forward pass should wait for (the batching window).

A session has one step in flight at a time: after this peer answers it, the step goes through the
gateway (and the other peers of the route) and comes back as the session's next step. Without a
wait, a pass starts at the first arrival and runs whatever is queued: sessions that come back a
little later (the gateway handles their streams one after the other) or that are still on the other
peer of a pipeline form a second group, and the groups stay out of phase for the rest of the
generation (8 streams on the 2-peer bench swarm then share a pass 2.6 and 3.7 at a time, not 8).

`BatchWindow` tracks which sessions are active (answered here lately, stream still open, next step
not back yet); the scheduler waits for those, bounded (see `BatchScheduler._gather`). Once merged,
the sessions stay in phase, so later passes wait only for the gateway's jitter. A single stream
never waits: when its step arrives, no other session is expected.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

ACTIVE_S = 5.0  # a session silent for longer than this is not expected back soon
LATE = 1.5  # wait for a session up to this many of its usual round trips after our answer


class BatchWindow:
    """When this peer last answered each session whose next step is not back yet (by object id)."""

    def __init__(self) -> None:
        self._answered: dict[int, float] = {}
        self._round_trip: dict[int, float] = {}  # smoothed seconds from our answer to the next step
        self._cohort: dict[int, int] = {}  # the route's first-span pass its last step was in (pass_id)

    def arrived(self, session: object, now: float | None = None) -> None:
        """A step of `session` was submitted: it is no longer awaited; learn its round trip."""
        at = self._answered.pop(id(session), None)
        if at is not None:
            sample = (time.perf_counter() if now is None else now) - at
            previous = self._round_trip.get(id(session))
            self._round_trip[id(session)] = sample if previous is None else 0.5 * (sample + previous)

    def stepped(self, session: object, now: float | None = None, cohort: int = 0) -> None:
        """This peer answered a step of `session` that belonged to the route's first-span pass
        `cohort` (`StepResult.pass_id`): its next step is awaited."""
        self._answered[id(session)] = time.perf_counter() if now is None else now
        self._cohort[id(session)] = cohort

    def forget(self, session: object) -> None:
        """The session's stream ended."""
        self._answered.pop(id(session), None)
        self._round_trip.pop(id(session), None)
        self._cohort.pop(id(session), None)

    def due(self, keys: Iterable[int], floor: float) -> float:
        """perf_counter time by which the sessions `keys` should be back: each at most LATE of its
        round trip after our answer (`floor` seconds after our answer when not known yet)."""
        return max(
            (self._answered.get(key, 0.0) + LATE * self._round_trip.get(key, floor) for key in keys),
            default=0.0,
        )

    def expected(
        self, present: Iterable[object], now: float | None = None, same_pass: bool = False
    ) -> set[int]:
        """Ids of the active sessions not in `present`: answered here lately, step not back yet.
        `same_pass`: only those answered in the same pass as one of `present` (they travel
        together, so they are due now; sessions of other passes may be queued at another peer)."""
        now = time.perf_counter() if now is None else now
        present = list(present)
        skip = {id(session) for session in present}
        cohorts = {self._cohort.get(key) for key in skip} if same_pass else None
        return {
            key
            for key, at in self._answered.items()
            if key not in skip
            and now - at < ACTIVE_S
            and (cohorts is None or self._cohort.get(key) in cohorts)
        }

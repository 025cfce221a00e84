"""The throughput a peer announces: a start-up profile in CPU time, scaled by its real passes.

Gateways plan routes by it (`gateway.routing`), so two identical peers must announce about the
same figure. One wall-clock measurement at start was not enough: a peer measured while its
neighbours were loading their weights announced 108 tok/s, its identical twin 716, and every
stream went to the twin. Fitting a line to the wall time of recent real passes (the next attempt)
still left identical twins 1.0-2.5x apart on this shared machine (load 3-15 on 2 cores): wall time
counts every moment the forward thread waited for a core that another process held, and that
differs from peer to peer and from minute to minute. So:

* **Time is the CPU time of the thread that runs the pass** (`time.thread_time`, taken in that
  thread: `BatchScheduler._timed_forward`, and here for the profile). Waiting for a core costs no
  CPU time, so contention from other processes leaves it alone (a little remains: caches and
  memory bandwidth are shared). What is announced is the peer's own speed, what it costs to run a
  pass given a core; how busy the peer is travels separately (`live_sessions`, the gateway's own
  load), and a host that is oversubscribed for good is not seen here. With `--threads` > 1 the
  intra-op workers' time is not counted, only the calling thread's share: figures compare between
  peers of one thread count.
* **At start** (`measure_pass_profile`) the peer times a decode pass of 1 and of 16 sessions
  several times, interleaved, through the scheduler's own pass code, and keeps a low quantile
  of each. Two points give a linear cost model of one pass, ``seconds = fixed + per_token * tokens``.
* **Real passes scale the profile as they come** (`ThroughputMeter`): each decode pass gives the
  ratio of its CPU time to what the profile predicts for its size; the scale is a low quantile
  (`PASS_QUANTILE`) of the ratios of the last `max_samples` passes, for the reason the profile
  keeps its fastest rounds, shrunk towards 1 while there are few
  (``1 + (q - 1) * n / (n + PRIOR_PASSES)``), so the first passes move the figure a little
  and later ones fully. Real passes cost somewhat more than the profile's (their caches are
  longer, their inputs come off the wire), and a twin that has served a few passes must not
  announce a different figure from one that has served many. (Fitting a fresh line to the real
  passes was the previous design: its slope, from passes of mostly one size, wandered, and a peer
  that had too few passes jumped between the profile and the fit.) Passes are kept by count, not
  by age: a CPU-time ratio does not go stale when the peer idles.
* The announced figure is batch-1 decode tokens/s, ``1 / (scale * profile.seconds(1))``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from peer.model import BlockSpan
from peer.sampling import Sampler, SamplingParams
from peer.scheduler import BatchScheduler, StepWork

PROFILE_TOKENS = 16  # the second point of the start-up profile
PROFILE_CONTEXT = 32  # tokens already in each profiled session's cache
PROFILE_SPREAD_S = 1.0  # the profile's rounds are spread over this long (see `measure_pass_profile`)
# The low quantile of real passes' ratios that scales the profile (see `ThroughputMeter.scale`).
PASS_QUANTILE = 0.1
# How many passes weigh as much as the start-up profile: with n passes seen, the scale has moved
# n / (n + PRIOR_PASSES) of the way from 1 to their ratio.
PRIOR_PASSES = 4


@dataclass(frozen=True)
class PassProfile:
    """CPU seconds one forward pass of this span takes for `tokens` tokens."""

    fixed: float
    per_token: float

    def seconds(self, tokens: int) -> float:
        return self.fixed + self.per_token * max(1, tokens)

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds(1)


@dataclass
class _ProfileSession:
    """A session as the scheduler sees one (`peer.scheduler.StepSession`), for the profile only."""

    cache: object
    sampler: Sampler
    wire_dtype: torch.dtype
    history: list[int] = field(default_factory=list)
    penalty_start: int = 0
    in_forward: bool = False


class PassTimer:
    """Times decode passes of 1 and of `PROFILE_TOKENS` sessions of `span` in CPU time, each
    session `PROFILE_CONTEXT` tokens into its sequence (see `measure_pass_profile`). Not thread
    safe: one caller at a time, on a thread where no other pass of the span runs."""

    def __init__(self, span: BlockSpan):
        self.span = span
        self._scheduler = BatchScheduler(span, max_batch_tokens=PROFILE_TOKENS * PROFILE_CONTEXT)
        self._scheduler._executor.shutdown(wait=False)  # only its pass code is used, on the caller's thread
        self._sessions = [
            _ProfileSession(
                span.new_cache(capacity=PROFILE_CONTEXT + 1),
                Sampler(SamplingParams(temperature=0.0)),
                span.dtype,
            )  # fmt: skip
            for _ in range(PROFILE_TOKENS)
        ]
        self._scheduler._timed_forward([self._work(s, PROFILE_CONTEXT, False) for s in self._sessions])

    def _work(self, session: _ProfileSession, tokens: int, sample: bool) -> tuple[StepWork, int]:
        span = self.span
        # Distinct, seeded inputs per session: identical rows would all route to the same experts,
        # and a MoE pass of 16 sessions would be timed at the cost of k experts instead of the
        # many that 16 different tokens reach (so the profile, and routes, would undercount it).
        generator = torch.Generator().manual_seed(id(session) % (1 << 31) + tokens)
        inputs = (
            torch.randint(0, span.config.vocab_size, (tokens,), generator=generator)
            if span.is_first
            else torch.randn(tokens, span.config.hidden_size, generator=generator).to(
                dtype=span.dtype, device=span.device
            )
        )
        return StepWork(session, inputs, [0] * tokens, sample=sample, allowed=None, future=None), tokens

    def run(self, count: int) -> float:
        """CPU seconds of one decode pass of `count` sessions."""
        for session in self._sessions[:count]:
            session.cache.truncate(PROFILE_CONTEXT)
            session.history.clear()
        pieces = [self._work(session, 1, self.span.is_last) for session in self._sessions[:count]]
        return self._scheduler._timed_forward(pieces)[1]

    def pair(self) -> tuple[float, float]:
        """One round: a pass of 1 and one of `PROFILE_TOKENS`, back to back, so that whatever slows
        one point (a neighbour thrashing the caches) slows both."""
        return self.run(1), self.run(PROFILE_TOKENS)


def profile_of(one: float, many: float) -> PassProfile:
    """The line through a pass of 1 session taking `one` s and one of `PROFILE_TOKENS` taking `many`."""
    per_token = max(0.0, (many - one) / (PROFILE_TOKENS - 1))
    return PassProfile(fixed=max(one - per_token, 1e-6), per_token=per_token)


def measure_pass_profile(
    span: BlockSpan, rounds: int = 24, spread_s: float = PROFILE_SPREAD_S, timer: PassTimer | None = None
) -> PassProfile:
    """The fastest of `rounds` rounds of `PassTimer.pair` (module doc), spread over `spread_s`.

    Each pass runs through the scheduler's own pass code (`BatchScheduler._timed_forward`): the
    blocks and, per session, what real passes do after them (sampling on the last span, encoding
    the hidden states on the others), over caches that hold some context, as real decode steps'
    do. On the small demo model a profile of bare passes over empty caches underestimated a pass
    of 4 sessions 1.3x and one of 1 session 1.1x, so twins serving different batch sizes scaled
    their profiles apart. The fastest of the rounds: CPU time still grows with contention (a
    busy hyperthread sibling, caches and memory bandwidth shared with other processes: two twins
    profiled side by side on this machine at load 8 were 1.3-1.5x apart at the 25th percentile of
    their rounds), and it only ever grows. The rounds are spread over `spread_s` seconds, so that
    a burst of contention (the twin loading its weights beside this one) does not cover them all;
    the peer goes on taking a round now and then while idle (`ThroughputMeter.refine`).
    """
    timer = timer or PassTimer(span)
    timer.pair()  # warm-up: first calls allocate
    pairs = []
    for _ in range(rounds):
        pairs.append(timer.pair())
        time.sleep(spread_s / rounds)
    return profile_of(min(a for a, _ in pairs), min(b for _, b in pairs))


def _quantile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class ThroughputMeter:
    """Batch-1 decode tokens/s: the start-up profile scaled by the CPU time of real passes.

    Called from the event loop only (the scheduler's `observe` hook runs there)."""

    def __init__(self, profile: PassProfile, *, max_samples: int = 64):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.profile = profile
        self._passes: deque[tuple[int, float]] = deque(maxlen=max_samples)  # (tokens, CPU seconds)
        self._best = (profile.seconds(1), profile.seconds(PROFILE_TOKENS))  # fastest rounds so far

    def observe(self, sessions: int, tokens: int, cpu_seconds: float) -> None:
        # Decode passes only (one token per session): a prefill's tokens cost far less each than a
        # decoding session's (which samples), so a peer that happened to get more prefills would
        # scale differently from its identical twin.
        if tokens < 1 or cpu_seconds <= 0 or tokens != sessions:
            return
        self._passes.append((tokens, cpu_seconds))

    def refine(self, one: float, many: float) -> None:
        """A later profile round (`PassTimer.pair`), taken while the peer was idle: the profile
        keeps the fastest of all its rounds. A profile taken at start, while the peer's
        neighbours loaded their weights, can be 1.5x slow; a few quiet moments later it is not."""
        self._best = (min(self._best[0], one), min(self._best[1], many))
        self.profile = profile_of(*self._best)

    @property
    def passes(self) -> int:
        return len(self._passes)

    @property
    def scale(self) -> float:
        """How much more than the profile's prediction real passes cost (module doc)."""
        n = len(self._passes)
        if n == 0:
            return 1.0
        ratios = [seconds / self.profile.seconds(tokens) for tokens, seconds in self._passes]
        return 1.0 + (_quantile(ratios, PASS_QUANTILE) - 1.0) * n / (n + PRIOR_PASSES)

    @property
    def tokens_per_second(self) -> float:
        return self.profile.tokens_per_second / self.scale

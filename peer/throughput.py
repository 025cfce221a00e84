"""The throughput a peer announces: measured at start, then kept true by its real forward passes.

Gateways plan routes by it (`gateway.routing`), so two identical peers must announce about the
same figure. One measurement at start-up is not enough: a peer measured while its neighbours were
loading their weights announced 108 tok/s, its identical twin 716, and every stream went to the
twin. So:

* At start (`measure_pass_profile`) the peer times a decode pass of 1 and of 16 sessions several times
  and keeps the fastest of each: contention only ever adds time, so the minimum is the figure
  least disturbed by whatever else ran. Two points give a linear cost model of one pass,
  ``seconds = fixed + per_token * tokens``.
* Every real pass (`ThroughputMeter.observe`, the scheduler's hook) is kept for `window_s`
  seconds, and the same linear model is fitted to them robustly (Theil-Sen). So the figure is
  what passes cost now, on this machine with whatever else runs on it, and a peer busy with
  batched passes is measured as well as an idle one: the fit separates the cost of the batch
  from the cost of a pass. (Scaling the start-up profile by the median observed/predicted ratio
  was tried first: its slope, taken from two noisy points, differed 3x between two identical
  peers, and with it their figures.)
* The announced figure is batch-1 decode tokens/s, ``1 / (fixed + per_token)``. It is the peer's
  speed, not its load: routes weigh load separately (`live_sessions`).

With too few passes in the window the start-up profile stands again, so a burst of contention
long past does not mark a peer slow forever.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peer.model import BlockSpan

PROFILE_TOKENS = 16  # the second point of the start-up profile
MIN_SAMPLES = 8  # passes in the window before they override the start-up profile
# The fixed cost is a low quantile of what passes cost beyond their tokens, not the median:
# contention only ever adds time, and on a busy machine (load 12 on 2 cores) the median of two
# identical peers' passes differed 2.7x while their fast quarter agreed.
FIXED_QUANTILE = 0.25


@dataclass(frozen=True)
class PassProfile:
    """Seconds one forward pass of this span takes for `tokens` tokens, at start-up."""

    fixed: float
    per_token: float

    def seconds(self, tokens: int) -> float:
        return self.fixed + self.per_token * max(1, tokens)

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds(1)


@torch.inference_mode()
def measure_pass_profile(span: BlockSpan, rounds: int = 24) -> PassProfile:
    """Fastest of `rounds` timings of a decode pass of 1 and of `PROFILE_TOKENS` sessions (module doc)."""
    hidden = span.config.hidden_size

    def run(sessions: int) -> float:
        # One decode token per session, each with its own cache: a pass as the scheduler packs it.
        # Distinct, seeded inputs: identical rows would all route to the same experts, and a MoE
        # pass of 16 sessions would be timed at the cost of k experts instead of the many that
        # 16 different tokens reach (so the fitted slope, and routes, would undercount the MoE).
        generator = torch.Generator().manual_seed(sessions)
        inputs = (
            torch.randint(0, span.config.vocab_size, (sessions,), generator=generator)
            if span.is_first
            else torch.randn(sessions, hidden, generator=generator).to(dtype=span.dtype, device=span.device)
        )
        caches = [span.new_cache(capacity=4) for _ in range(sessions)]
        begin = time.perf_counter()
        out = span(inputs, caches, [1] * sessions)
        if span.is_last:
            span.logits(out)
        return time.perf_counter() - begin

    run(1), run(PROFILE_TOKENS)  # warm-up: first calls allocate
    # Interleaved, so that a burst of contention slows both points alike.
    pairs = [(run(1), run(PROFILE_TOKENS)) for _ in range(rounds)]
    one = min(a for a, _ in pairs)
    many = min(b for _, b in pairs)
    per_token = max(0.0, (many - one) / (PROFILE_TOKENS - 1))
    return PassProfile(fixed=max(one - per_token, 1e-6), per_token=per_token)


class ThroughputMeter:
    """Batch-1 decode tokens/s fitted to the real passes of the last `window_s` seconds.

    Called from the event loop only (the scheduler's `observe` hook runs there)."""

    RECOMPUTE_S = 0.5  # the fit is redone at most this often (read on every pass and announce)
    MAX_PAIRS = 2048  # pairs of passes the slope's median is taken over

    def __init__(
        self,
        profile: PassProfile,
        *,
        window_s: float = 30.0,
        max_samples: int = 128,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.profile = profile
        self.window_s = window_s
        self.clock = clock
        self._passes: deque[tuple[float, int, float]] = deque(maxlen=max_samples)  # (when, tokens, s)
        self._cached: tuple[float, float] | None = None  # (when, tokens/s)

    def observe(self, sessions: int, tokens: int, seconds: float) -> None:
        # Decode passes only (one token per session): a prefill's tokens cost far less each than a
        # decoding session's (which samples), so a peer that happened to get more prefills fitted
        # a different line than its identical twin (2.4x apart in one run).
        if tokens < 1 or seconds <= 0 or tokens != sessions:
            return
        self._passes.append((self.clock(), tokens, seconds))
        self._cached = None if len(self._passes) <= MIN_SAMPLES else self._cached

    def fit(self) -> PassProfile:
        """``seconds = fixed + per_token * tokens`` over the recent passes: the median of pairwise
        slopes (Theil-Sen) and a low quantile of the residuals, so passes that waited behind
        another process do not move it. Too few passes: the start-up profile; passes of
        one size only: the start-up profile's slope."""
        cutoff = self.clock() - self.window_s
        while self._passes and self._passes[0][0] < cutoff:
            self._passes.popleft()
        if len(self._passes) < MIN_SAMPLES:
            return self.profile
        points = [(tokens, seconds) for _, tokens, seconds in self._passes]
        slopes = [
            (s2 - s1) / (t2 - t1)
            for i, (t1, s1) in enumerate(points)
            for t2, s2 in points[i + 1 :]
            if t2 != t1
        ]
        if len(slopes) > self.MAX_PAIRS:
            slopes = slopes[:: len(slopes) // self.MAX_PAIRS + 1]
        per_token = max(0.0, statistics.median(slopes)) if slopes else self.profile.per_token
        residuals = sorted(seconds - per_token * tokens for tokens, seconds in points)
        fixed = residuals[int(len(residuals) * FIXED_QUANTILE)]
        return PassProfile(fixed=max(fixed, 1e-6), per_token=per_token)

    @property
    def tokens_per_second(self) -> float:
        now = self.clock()
        if self._cached is None or now - self._cached[0] >= self.RECOMPUTE_S:
            self._cached = (now, self.fit().tokens_per_second)
        return self._cached[1]

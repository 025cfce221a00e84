"""Per-key limits as token buckets, and OpenAI's rate-limit headers.

A limit of L per minute is a bucket holding at most L that refills at L/60 per second and starts
full: a key may burst its whole minute at once, then gets a steady L/60 per second. This is what
OpenAI describes ("limits are imposed in periods shorter than a minute") and, unlike a fixed
one-minute window, it never lets 2L through around a window's edge. `x-ratelimit-reset-*` is the
time until the bucket is full again ("until the limit resets to its initial state").

Requests take 1 from the request bucket when admitted. Tokens are reserved before generation for
the most the request can cost (its prompt + every choice's `max_tokens` bound) and the unused part
is given back when it ends, so concurrent requests (on any number of gateway replicas, see
`gateway.keys.RedisKeyStore`, whose Lua script is this module's arithmetic) can never spend more
than the bucket holds. A request larger than the whole bucket can never pass and is refused at
once rather than told to wait.

The functions here are pure (the caller gives `now`); the file store keeps its buckets in memory
with them and a test checks that the Lua script agrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Bucket:
    level: float
    at: float  # when `level` was measured (seconds, any monotonic clock)


def refill(bucket: Bucket | None, limit: int, now: float) -> float:
    """The bucket's level at `now` (a bucket never seen is full)."""
    if bucket is None:
        return float(limit)
    return min(float(limit), bucket.level + max(0.0, now - bucket.at) * limit / 60.0)


def seconds_until(level: float, needed: float, limit: int) -> float:
    """How long until a bucket at `level` holds `needed` (inf when it never can)."""
    if needed > limit:
        return math.inf
    return max(0.0, (needed - level) * 60.0 / limit)


@dataclass(frozen=True)
class LimitState:
    """One kind of limit (requests or tokens) as the headers tell it; `limit` 0: none."""

    limit: int = 0
    remaining: int = 0
    reset_s: float = 0.0

    @classmethod
    def of(cls, limit: int, level: float) -> LimitState:
        return cls(limit, max(0, math.floor(level)), seconds_until(level, limit, limit))


@dataclass(frozen=True)
class Verdict:
    """What the store answers to a reservation.

    `refused`: "" (admitted), "requests" / "tokens" (a bucket is short: retry after
    `retry_after_s`), "too_large" (more tokens than the per-minute limit), "quota" (not
    enough credit), "revoked", "expired", "unknown"."""

    refused: str = ""
    requests: LimitState = field(default_factory=LimitState)
    tokens: LimitState = field(default_factory=LimitState)
    retry_after_s: float = 0.0
    credits: int | None = None  # credit left after the reservation (None: no credit limit)

    @property
    def admitted(self) -> bool:
        return not self.refused


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def rate_limit_headers(verdict: Verdict) -> dict[str, str]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limits the key has."""
    headers: dict[str, str] = {}
    for kind, state in (("requests", verdict.requests), ("tokens", verdict.tokens)):
        if state.limit:
            headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(state.reset_s)
    return headers


def take(
    buckets: dict[str, Bucket], rpm: int, tpm: int, tokens: int, now: float
) -> tuple[str, LimitState, LimitState, float]:
    """Take one request and `tokens` tokens from `buckets` ("requests", "tokens") if both have
    room, else nothing: (refused, requests state, tokens state, retry after)."""
    req_level = refill(buckets.get("requests"), rpm, now) if rpm else 0.0
    tok_level = refill(buckets.get("tokens"), tpm, now) if tpm else 0.0
    refused, wait = "", 0.0
    if tpm and tokens > tpm:
        refused, wait = "too_large", math.inf
    elif rpm and req_level < 1:
        refused, wait = "requests", seconds_until(req_level, 1, rpm)
    elif tpm and tok_level < tokens:
        refused, wait = "tokens", seconds_until(tok_level, tokens, tpm)
    if not refused:
        if rpm:
            req_level -= 1
            buckets["requests"] = Bucket(req_level, now)
        if tpm:
            tok_level -= tokens
            buckets["tokens"] = Bucket(tok_level, now)
    requests = LimitState.of(rpm, req_level) if rpm else LimitState()
    return refused, requests, LimitState.of(tpm, tok_level) if tpm else LimitState(), wait


def give_back(buckets: dict[str, Bucket], tpm: int, tokens: int, now: float) -> None:
    """Return reserved tokens that were not used (a negative amount takes more)."""
    if tpm and tokens:
        buckets["tokens"] = Bucket(refill(buckets.get("tokens"), tpm, now) + tokens, now)
        buckets["tokens"].level = min(float(tpm), buckets["tokens"].level)

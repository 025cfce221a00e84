"""A key's request through its limits: reserve before generating, settle after, count usage.

`admit` runs once the prompt is tokenized and the route is known (a request refused for its input,
or for want of a route, costs the key nothing). It reserves one request and the most tokens the
request can use (prompt + every choice's `max_tokens` bound) from the key's per-minute buckets and
its credit (`KeyStore.reserve`, atomic across replicas), or refuses with OpenAI's 429:

* `insufficient_quota` (type and code) when the credit cannot cover the reservation: the balance
  never goes below zero, so a key never spends more than it was given;
* `rate_limit_exceeded` with type `requests` or `tokens` (as OpenAI sends them) when a bucket is
  short, with `Retry-After` / `retry-after-ms` (the OpenAI SDKs wait that long and retry);
* `rate_limit_exceeded` with `x-should-retry: false` for a request larger than the key's whole
  tokens-per-minute limit, and for `insufficient_quota`: waiting cannot help.

Every answer to an admitted or rate-limited request carries `x-ratelimit-*` (`gateway.ratelimit`).

`Meter.wrap` counts the completion tokens of the pieces the client gets, exactly as the response's
`usage` does, and settles when the generation ends: the unused reservation goes back and the usage
is counted. What is charged: a finished request, its `usage`; a stream cut short (an error, the
client leaving, the key revoked), the prompt and the tokens it already sent; a non-streamed request
that failed, nothing (the client got nothing). While it runs it re-reads its key every
`key_check_interval` seconds: a key revoked or expired mid-stream ends the stream with an error
event and `[DONE]`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
from fastapi import Request

from gateway import errors
from gateway.auth import caller_of
from gateway.keys import ApiKey, KeyStore
from gateway.metrics import record_key_refusal
from gateway.ratelimit import Verdict, format_duration, rate_limit_headers

log = logging.getLogger("gateway.metering")


def refusal(verdict: Verdict, key: ApiKey, model: str, tokens: int) -> errors.OpenAIError:
    """The OpenAI error for a refused reservation."""
    headers = rate_limit_headers(verdict)
    if verdict.refused in ("revoked", "expired", "unknown"):
        state = "deleted" if verdict.refused == "unknown" else verdict.refused
        return errors.authentication_error(f"This API key has been {state}.", code=f"{state}_api_key")
    if verdict.refused == "quota":
        return errors.OpenAIError(
            429,
            f"You exceeded your current quota: this request may use up to {tokens} tokens (its prompt and "
            f"max_tokens) and the key has {verdict.credits} left. Lower max_tokens or ask for more credit.",
            type="insufficient_quota",
            code="insufficient_quota",
            headers={**headers, "x-should-retry": "false"},
        )
    if verdict.refused == "too_large":
        return errors.OpenAIError(
            429,
            f"Request too large for {model} on tokens per min (TPM): Limit {key.tpm}, Requested {tokens}. "
            "Lower max_tokens or the prompt.",
            type="tokens",
            code="rate_limit_exceeded",
            headers={**headers, "x-should-retry": "false"},
        )
    kind, limit, state = (
        ("requests", key.rpm, verdict.requests)
        if verdict.refused == "requests"
        else ("tokens", key.tpm, verdict.tokens)
    )
    unit = "RPM" if kind == "requests" else "TPM"
    asked = 1 if kind == "requests" else tokens
    wait = verdict.retry_after_s
    error = errors.OpenAIError(
        429,
        f"Rate limit reached for {model} on {kind} per min ({unit}): Limit {limit}, "
        f"Used {limit - state.remaining}, Requested {asked}. Please try again in {format_duration(wait)}.",
        type=kind,
        code="rate_limit_exceeded",
        headers={**headers, "retry-after-ms": str(math.ceil(wait * 1000))},
        retry_after=wait,
    )
    return error


class Meter:
    """One admitted request of a key: its reservation, headers and settlement."""

    def __init__(self, store: KeyStore, key: ApiKey, model: str, reserved: int, prompt_tokens: int,
                 verdict: Verdict, check_interval: float):  # fmt: skip
        self.store = store
        self.key = key
        self.model = model
        self.reserved = reserved
        self.prompt_tokens = prompt_tokens
        self.headers = rate_limit_headers(verdict)
        self.check_interval = check_interval
        self.started = False
        self.settled = False

    async def settle(self, completion_tokens: int, charged: bool) -> None:
        if self.settled:
            return
        self.settled = True
        prompt, completion = (self.prompt_tokens, completion_tokens) if charged else (0, 0)
        # shielded: a client that leaves cancels the stream's task, and the settlement must still run
        with anyio.CancelScope(shield=True):
            try:
                await self.store.settle(self.key.id, self.model, self.reserved, prompt, completion)
            except Exception:  # noqa: BLE001 - the response is out; the reservation stays spent
                log.exception("settling key %s failed (%d prompt + %d completion tokens)", self.key.id,
                              prompt, completion)  # fmt: skip

    async def _check_key(self) -> None:
        try:
            key = await self.store.get(self.key.id)
        except Exception:  # noqa: BLE001 - a store hiccup does not end a paid-for stream
            log.warning("could not re-read key %s mid-stream", self.key.id)
            return
        state = "deleted" if key is None else key.state()
        if state != "active":
            record_key_refusal(f"{state}_mid_stream")
            raise errors.authentication_error(f"This API key has been {state}.", code=f"{state}_api_key")

    async def wrap(self, pieces: AsyncIterator, partial: bool) -> AsyncIterator:
        """`pieces` as they come, counted; settles when they end (`partial`: a request cut short
        is charged for what it sent, see the module doc)."""
        self.started = True
        produced = 0
        completed = False
        last_check = time.monotonic()
        try:
            async with aclosing(pieces):
                async for piece in pieces:
                    if time.monotonic() - last_check >= self.check_interval:
                        await self._check_key()
                        last_check = time.monotonic()
                    produced += len(piece.tokens)
                    yield piece
            completed = True
        finally:
            await self.settle(produced, completed or (partial and produced > 0))

    async def release_if_never_started(self) -> None:
        """A stream's last word (its response's background task): when the client left before the
        stream began, `wrap` never ran and nothing would settle; give the reservation back. A
        stream that began settles in `wrap` (an abandoned generator is closed by the event loop)."""
        if not self.started:
            await self.settle(0, charged=False)


async def admit(
    gw, request: Request, model: str, prompt_tokens: int, max_completion_tokens: int
) -> Meter | None:
    """Reserve a key's request (see the module doc); None for callers without a key."""
    key = caller_of(request).key
    if key is None or gw.keys is None:
        return None
    tokens = prompt_tokens + max_completion_tokens
    try:
        verdict = await gw.keys.reserve(key, tokens)
    except Exception as exc:  # noqa: BLE001 - Redis down: refuse, never serve unmetered
        log.warning("the key store cannot be reached: %s", exc)
        raise errors.unavailable("the API key store is unavailable; retry shortly", retry_after=2) from exc
    if not verdict.admitted:
        record_key_refusal(verdict.refused)
        raise refusal(verdict, key, model, tokens)
    return Meter(gw.keys, key, model, tokens, prompt_tokens, verdict, gw.settings.key_check_interval)

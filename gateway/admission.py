"""Admission control: at most N generations in flight per gateway; the rest get 429 at once.

A swarm has finite cache and compute. Queueing without bound inside the gateway would only turn
overload into timeouts, so past `max_concurrent` generations a request is answered with the
OpenAI 429 `rate_limit_error` and a `Retry-After`, which the OpenAI SDKs honour and retry. The
count covers a request from its first byte until its last streamed chunk has gone out.
"""

from __future__ import annotations

from gateway import errors


class AdmissionGuard:
    """Pure ASGI middleware counting in-flight POSTs to the `*completions` routes."""

    def __init__(self, app, max_concurrent: int, retry_after: float = 1.0):
        self.app = app
        self.max_concurrent = max_concurrent
        self.retry_after = retry_after
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        generation = (
            self.max_concurrent > 0
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].endswith("completions")
        )
        if not generation:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            error = errors.rate_limited(
                self.retry_after,
                f"the gateway is serving its limit of {self.max_concurrent} generations; retry shortly",
            )
            await errors.error_response(error)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

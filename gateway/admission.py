"""Admission control: what may come in. At most N generations in flight per gateway (the rest get
429 at once), and no body over the size limit (413).

A swarm has finite cache and compute. Queueing without bound inside the gateway would only turn
overload into timeouts, so past `max_concurrent` generations a request is answered with the
OpenAI 429 `rate_limit_error` and a `Retry-After`, which the OpenAI SDKs honour and retry. The
count covers a request from its first byte until its last streamed chunk has gone out.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

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


class BodyGuard:
    """Pure ASGI middleware (no per-chunk wrapping of streamed responses, unlike `@app.middleware`):

    * a body announced larger than `max_body_bytes` gets 413 before it is read; one that is not
      announced (`Transfer-Encoding: chunked`, or a Content-Length that lies) is counted as it
      arrives, and reading stops with 413 at the first byte past the limit;
    * `curl -d '{...}'` labels a JSON body `application/x-www-form-urlencoded`; no OpenAI route takes
      a form, so such a body on a `*completions` POST is read as the JSON it is (a body that is not
      JSON still gets a 400).
    """

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                await errors.error_response(errors.payload_too_large())(scope, receive, send)
                return
            form = headers.get(b"content-type", b"").startswith(b"application/x-www-form-urlencoded")
            if form and scope["method"] == "POST" and scope["path"].endswith("completions"):
                rest = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*rest, (b"content-type", b"application/json")]}
            receive = self._counted(receive)
        await self.app(scope, receive, send)

    def _counted(self, receive):
        """`receive` that raises 413 once the body grows past the limit. FastAPI re-raises an
        HTTPException met while reading a body (any other error there becomes a 400), and the
        error handlers turn it into the OpenAI error object."""
        seen = 0
        limit = self.max_body_bytes

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = errors.payload_too_large()
                    raise HTTPException(too_large.status_code, too_large.message)
            return message

        return counted

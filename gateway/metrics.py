"""Gateway telemetry: Prometheus metrics, request ids, access logs, and the routes in use.

`install_telemetry(app)` is the one hook `create_app` calls. It adds

* a pure ASGI middleware that gives every request an id (the client's ``X-Request-Id`` when it is
  log-safe, else a new one), echoes it in the response, counts the request by route template and
  status, times it to the end of its body (so a stream counts whole), and writes one access log
  line;
* ``GET /metrics`` in the Prometheus text format.

`observe_generation` wraps the stream of pieces a completion produces: it measures time to first
token and inter-token latency, counts tokens in and out, remembers the route as "active" while it
runs and as "recent" afterwards (the swarm map shows both), and logs a one-line summary.

Every app gets its own `CollectorRegistry` (no global default registry), so a test process can
create several apps. Code that has no handle on the app (the failover logic deep in generation)
reaches the current request's metrics through a context variable: `record_failover()`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.logs import REQUEST_ID_HEADER, request_id_var, set_request_id
from common.security_metrics import SecurityCollector

if TYPE_CHECKING:
    from gateway.routing import Route

log = logging.getLogger("gateway.access")

# Latency buckets in seconds: a token takes milliseconds on a LAN swarm and seconds across the
# internet or on a loaded CPU peer; TTFT includes the prefill of the whole prompt.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RECENT_ROUTES = 20
QUIET_PATHS = ("/metrics", "/health", "/swarm")  # polled often: access lines at DEBUG only


@dataclass
class RequestContext:
    request_id: str
    started: float  # time.perf_counter() when the request arrived
    metrics: GatewayMetrics


_request: ContextVar[RequestContext | None] = ContextVar("gateway_request", default=None)


def record_failover(reason: str = "peer_failed") -> None:
    """Count one failover (a hop replaced mid-generation) on the current request's gateway.

    Safe to call from anywhere inside a request, including tasks it spawned; a no-op outside one.
    """
    ctx = _request.get()
    if ctx is not None:
        ctx.metrics.failovers.labels(reason).inc()


def record_key_refusal(reason: str) -> None:
    """Count one generation of an API key refused (`gateway.metering`), by reason."""
    ctx = _request.get()
    if ctx is not None:
        ctx.metrics.key_refusals.labels(reason).inc()


def record_conviction(reason: str) -> None:
    """Count one peer convicted for its answers (`gateway.failure_policy.BadAnswer`)."""
    ctx = _request.get()
    if ctx is not None:
        ctx.metrics.convictions.labels(reason).inc()


def record_answer_check(outcome: str) -> None:
    """Count one re-execution check of a step on a replica (`gateway.verification`) by outcome."""
    ctx = _request.get()
    if ctx is not None:
        ctx.metrics.answer_checks.labels(outcome).inc()


def record_route_failure(model: str) -> None:
    """Count one request that found no route over live peers (answered 503)."""
    ctx = _request.get()
    if ctx is not None:
        ctx.metrics.route_failures.labels(model).inc()


@dataclass
class ActiveRoute:
    request_id: str
    model: str
    hops: list[dict[str, Any]]
    started_at: float  # unix time
    prompt_tokens: int
    completion_tokens: int = 0
    finished_at: float | None = None
    outcome: str = "running"  # running | ok | error | cancelled

    def to_dict(self, now: float) -> dict[str, Any]:
        end = self.finished_at or now
        return {
            "request_id": self.request_id,
            "model": self.model,
            "hops": self.hops,
            "started_at": self.started_at,
            "age_s": round(now - self.started_at, 3),
            "duration_s": round(end - self.started_at, 3),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "outcome": self.outcome,
        }


@dataclass
class RouteActivity:
    """Generations running now and the last few finished, with their routes (for the map)."""

    active: dict[int, ActiveRoute] = field(default_factory=dict)
    recent: deque[ActiveRoute] = field(default_factory=lambda: deque(maxlen=RECENT_ROUTES))

    def begin(self, entry: ActiveRoute) -> int:
        key = id(entry)
        self.active[key] = entry
        return key

    def end(self, key: int, outcome: str) -> None:
        entry = self.active.pop(key, None)
        if entry is not None:
            entry.finished_at = time.time()
            entry.outcome = outcome
            self.recent.appendleft(entry)

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        now = time.time()
        return {
            "active": [entry.to_dict(now) for entry in self.active.values()],
            "recent": [entry.to_dict(now) for entry in self.recent],
        }


def _dht_rejected(app: FastAPI):
    dht = getattr(getattr(app.state, "gateway", None), "dht", None)
    return dht.rejected if dht is not None else None


class _StateCollector(Collector):
    """Gauges read at scrape time from the gateway object: session store and generations."""

    def __init__(self, app: FastAPI, activity: RouteActivity):
        self.app = app
        self.activity = activity

    def collect(self):
        gw = getattr(self.app.state, "gateway", None)
        sessions = getattr(gw, "sessions", None)
        if sessions is not None:
            available = GaugeMetricFamily(
                "swarm_gateway_session_store_available",
                "1 while the session-pin store answers (always 1 for the in-memory store)",
                labels=["backend"],
            )
            available.add_metric([sessions.backend], 1.0 if sessions.available else 0.0)
            yield available
            if sessions.backend == "redis":
                yield GaugeMetricFamily(
                    "swarm_gateway_redis_available",
                    "1 while Redis answers; 0 while the gateway serves without session pins",
                    value=1.0 if sessions.available else 0.0,
                )
        policy = getattr(gw, "policy", None)
        if policy is not None:
            convicted = GaugeMetricFamily(
                "swarm_gateway_convicted_peers",
                "peers banned now for their answers, by peer and reason",
                labels=["peer_id", "reason"],
            )
            for peer_id, reason in sorted(policy.bans.convictions().items()):
                convicted.add_metric([peer_id, reason], 1.0)
            yield convicted
        swarm = getattr(gw, "swarm", None)
        if swarm is not None:
            yield CounterMetricFamily(
                "swarm_gateway_peer_moves_seen",
                "peers' moves to other blocks (peer.balancer) seen announced in the DHT",
                value=swarm.moves_seen,
            )
            yield GaugeMetricFamily(
                "swarm_gateway_peer_moves_in_progress",
                "peers announcing a move to other blocks now",
                value=swarm.moves_in_progress(),
            )
        yield GaugeMetricFamily(
            "swarm_gateway_active_generations",
            "generations streaming through the swarm now",
            value=len(self.activity.active),
        )


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of their own."""

    def __init__(self, app: FastAPI):
        self.registry = CollectorRegistry(auto_describe=True)
        self.activity = RouteActivity()
        r = self.registry
        self.requests = Counter(
            "swarm_gateway_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "swarm_gateway_request_duration_seconds", "HTTP request time to the end of the body", ["route"],
            buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("swarm_gateway_requests_in_flight", "HTTP requests being served", registry=r)
        self.ttft = Histogram(
            "swarm_gateway_time_to_first_token_seconds", "request arrival to the first generated token", ["model"],
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "swarm_gateway_inter_token_latency_seconds", "time between consecutive tokens of one choice", ["model"],
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens_in = Counter(
            "swarm_gateway_prompt_tokens", "prompt tokens sent into the swarm", ["model"], registry=r
        )
        self.tokens_out = Counter(
            "swarm_gateway_completion_tokens", "tokens generated by the swarm", ["model"], registry=r
        )
        self.generations = Counter(
            "swarm_gateway_generations",
            "generations by outcome (ok, error, cancelled)",
            ["model", "outcome"],
            registry=r,
        )
        self.failovers = Counter(
            "swarm_gateway_failovers",
            "hops replaced mid-generation after a peer failed",
            ["reason"],
            registry=r,
        )
        self.convictions = Counter(
            "swarm_gateway_peers_convicted",
            "peers banned for their answers: malformed (shape, NaN, token outside the vocabulary) or "
            "disagreed (a re-execution on replicas gave another answer)",
            ["reason"],
            registry=r,
        )
        self.answer_checks = Counter(
            "swarm_gateway_answer_checks",
            "steps re-executed on a replica (--verify-fraction) by outcome: agreed, convicted, "
            "inconclusive, no_replica, failed",
            ["outcome"],
            registry=r,
        )
        self.route_failures = Counter(
            "swarm_gateway_route_planning_failures",
            "requests that found no chain of live peers (503)",
            ["model"],
            registry=r,
        )
        self.key_refusals = Counter(
            "swarm_gateway_key_refusals",
            "generations of API keys refused by their limits (requests, tokens, too_large, quota) or their state "
            "(revoked, expired), and streams ended by a revocation (revoked_mid_stream)",
            ["reason"],
            registry=r,
        )
        self.registry.register(_StateCollector(app, self.activity))
        # what the gateway's DHT node dropped (docs/security.md)
        self.registry.register(SecurityCollector(lambda: _dht_rejected(app)))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class TelemetryMiddleware:
    """Request id, request metrics and one access log line per request (pure ASGI: it sees the
    end of a streamed body, which `BaseHTTPMiddleware` does not)."""

    def __init__(self, app, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == REQUEST_ID_HEADER.encode():
                incoming = value.decode("latin-1")
                break
        request_id = set_request_id(incoming)
        started = time.perf_counter()
        token = _request.set(RequestContext(request_id, started, self.metrics))
        status = 500  # what the client sees when the app fails before it starts a response

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())],
                }
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            template = route_label(scope)
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(elapsed)
            path = scope.get("path", "")
            quiet = any(path == p or path.startswith(p + "/") for p in QUIET_PATHS) and status < 400
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "request",
                extra={
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 1),
                },
            )
            _request.reset(token)


def route_label(scope) -> str:
    """The matched route's template, with the prefix it was included under ("/v1"); "unmatched"
    for a 404, so that scanners probing random paths cannot grow the label set without bound."""
    template = getattr(scope.get("route"), "path", None)
    if not template:
        return "unmatched"
    path = scope.get("path", "")
    if "{" not in template and path.endswith(template):
        return path  # a static route: path = include prefix + template, a bounded set
    return template


metrics_router = APIRouter()


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def install_telemetry(app: FastAPI) -> GatewayMetrics:
    """Add the middleware and `/metrics` to `app`; the metrics live in `app.state.metrics`."""
    metrics = GatewayMetrics(app)
    app.state.metrics = metrics
    app.add_middleware(TelemetryMiddleware, metrics=metrics)
    app.include_router(metrics_router)
    return metrics


def hop_dicts(route: Route) -> list[dict[str, Any]]:
    return [
        {"peer_id": hop.peer_id, "address": hop.address, "start": hop.start, "end": hop.end} for hop in route
    ]


async def observe_generation(
    request: Request,
    pieces: AsyncIterator,
    route: Route,
    model: str,
    prompt_tokens: int,
    prompt: str | None = None,
) -> AsyncIterator:
    """Yield `pieces` unchanged while measuring them (see the module docstring).

    A piece is `gateway.serving.choices.Piece`: `.index` (choice), `.text`, `.tokens`. `prompt` is logged
    only when the gateway runs with `--log-prompts`.
    """
    metrics: GatewayMetrics = request.app.state.metrics
    settings = getattr(getattr(request.app.state, "gateway", None), "settings", None)
    log_prompts = bool(getattr(settings, "log_prompts", False))
    ctx = _request.get()
    started = ctx.started if ctx else time.perf_counter()
    entry = ActiveRoute(
        request_id=request_id_var.get() or "",
        model=model,
        hops=hop_dicts(route),
        started_at=time.time(),
        prompt_tokens=prompt_tokens,
    )
    key = metrics.activity.begin(entry)
    metrics.tokens_in.labels(model).inc(prompt_tokens)
    ttft = metrics.ttft.labels(model)
    itl = metrics.itl.labels(model)
    tokens_out = metrics.tokens_out.labels(model)
    last: dict[int, float] = {}
    first_token_s: float | None = None
    texts: dict[int, list[str]] = {}
    outcome = "cancelled"  # a client that hangs up closes this generator without an exception
    try:
        async with aclosing(pieces) as inner:
            async for piece in inner:
                count = len(piece.tokens)
                if count:
                    now = time.perf_counter()
                    if first_token_s is None:
                        first_token_s = now - started
                        ttft.observe(first_token_s)
                    elif piece.index in last:
                        gap = (now - last[piece.index]) / count
                        for _ in range(count):
                            itl.observe(gap)
                    last[piece.index] = now
                    tokens_out.inc(count)
                    entry.completion_tokens += count
                if piece.outcome is not None and piece.index == 0:
                    # a failover may have replaced hops: the map shows the route that served it
                    entry.hops = hop_dicts(piece.outcome.route)
                if log_prompts and piece.text:
                    texts.setdefault(piece.index, []).append(piece.text)
                yield piece
        outcome = "ok"
    except Exception:
        outcome = "error"
        raise
    finally:
        metrics.activity.end(key, outcome)
        metrics.generations.labels(model, outcome).inc()
        elapsed = time.perf_counter() - started
        fields: dict[str, Any] = {
            "model": model,
            "route": ",".join(hop["peer_id"] for hop in entry.hops),
            "outcome": outcome,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "ttft_ms": round(first_token_s * 1000, 1) if first_token_s is not None else None,
            "duration_ms": round(elapsed * 1000, 1),
        }
        if log_prompts:
            fields["prompt"] = prompt
            fields["completion"] = "".join(texts.get(0, []))
        log.info("generation", extra=fields)

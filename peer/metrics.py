"""A peer's Prometheus metrics, served over HTTP on `--metrics-port`.

Live values (sessions, KV cache bytes and budget, free cache tokens) are read from the servicer at
scrape time by a collector, so they are never stale and cost nothing between scrapes. What
happens per forward pass (latency, batch size, tokens) is pushed by the `BatchScheduler` through
its `observe` hook, called on the event loop after each pass. The `swarm_peer_info` labels are the
fields of the servicer's `describe()` (`PeerServer.record()`, built by `peer.identity.describe`),
the record the peer announces.

The registry is this peer's own (no global default registry): tests may run several peers' worth
of servers in one process. The HTTP server is prometheus-client's threaded WSGI server, which
needs nothing from the asyncio loop, so a scrape never waits behind a forward pass.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from peer.servicer import PeerServicer

log = logging.getLogger("peer.metrics")

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class _LiveCollector(Collector):
    def __init__(self, servicer: PeerServicer):
        self.servicer = servicer

    def collect(self):
        servicer = self.servicer
        record = servicer.describe()  # the peer's one description (peer.identity), as in the DHT
        info = GaugeMetricFamily(
            "swarm_peer_info", "what this peer serves (value is always 1)",
            labels=["peer_id", "model", "start", "end", "dtype", "quant", "state"],
        )  # fmt: skip
        info.add_metric(
            [record.peer_id, record.model, str(record.start), str(record.end), record.dtype, record.quant,
             record.state.value],
            1.0,
        )  # fmt: skip
        yield info
        sessions = list(servicer.sessions.values())
        yield GaugeMetricFamily("swarm_peer_sessions", "live inference sessions", value=len(sessions))
        idle = list(servicer.table.idle.values())
        yield GaugeMetricFamily(
            "swarm_peer_idle_sessions",
            "closed sessions whose cache is kept for the next turn",
            value=len(idle),
        )
        used = sum(session.cache.nbytes for session in sessions + idle)
        yield GaugeMetricFamily(
            "swarm_peer_kv_cache_bytes_used", "bytes held by session KV caches now", value=used
        )
        per_token = servicer.span.new_cache(capacity=1).bytes_per_token
        yield GaugeMetricFamily(
            "swarm_peer_kv_cache_bytes_budget",
            "KV cache memory budget of this peer",
            value=servicer.cache_tokens * per_token,
        )
        yield GaugeMetricFamily(
            "swarm_peer_kv_cache_tokens_reserved",
            "cache tokens reserved by open sessions",
            value=servicer.table.reserved_live,
        )
        yield GaugeMetricFamily(
            "swarm_peer_kv_cache_tokens_free",
            "cache tokens a new session may still reserve",
            value=servicer.free_cache_tokens,
        )
        yield CounterMetricFamily(
            "swarm_peer_moves", "times this peer moved to other blocks to rebalance the swarm (peer.balancer)",
            value=servicer.moves,
        )  # fmt: skip
        forwarder = servicer.forwarder
        yield CounterMetricFamily(
            "swarm_peer_pushes", "steps this peer pushed to a next hop that accepted them (peer.forwarding)",
            value=forwarder.pushed,
        )  # fmt: skip
        yield CounterMetricFamily(
            "swarm_peer_pushes_received", "pushed steps this peer accepted from a previous hop",
            value=servicer.pushes_received,
        )  # fmt: skip
        yield CounterMetricFamily(
            "swarm_peer_push_requests_received", "Push requests those steps came in (a pass's steps share one)",
            value=servicer.push_requests_received,
        )  # fmt: skip
        yield CounterMetricFamily(
            "swarm_peer_looped_steps", "decode-loop steps this peer, a last hop, pushed back to a first hop",
            value=servicer.looped_steps,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "swarm_peer_push_links", "open Push streams to next hops", value=len(forwarder.links())
        )
        yield CounterMetricFamily(
            "swarm_peer_push_links_closed", "Push links closed as idle or least recently used",
            value=forwarder.links_closed,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "swarm_peer_throughput_tokens_per_second", "batch-1 decode tokens/s: the start-up profile scaled by recent forward passes, in thread CPU time (announced in the DHT, peer.throughput)",
            value=record.throughput,
        )  # fmt: skip


class PeerMetrics:
    """The peer's registry; `observe_batch` is installed as the scheduler's `observe` hook."""

    def __init__(self, servicer: PeerServicer):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.step_seconds = Histogram(
            "swarm_peer_step_seconds",
            "wall time of one (batched) forward pass",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_sessions = Histogram(
            "swarm_peer_batch_size",
            "sessions packed into one forward pass",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "swarm_peer_batch_tokens",
            "tokens packed into one forward pass",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "swarm_peer_tokens_processed", "tokens run through this peer's blocks", registry=r
        )
        self.steps = Counter("swarm_peer_forward_passes", "forward passes run", registry=r)
        # against swarm_peer_step_seconds' sum: how much of a pass's wall time the machine's
        # other work took (the announced throughput is fitted to this, `peer.throughput`)
        self.cpu_seconds = Counter(
            "swarm_peer_forward_cpu_seconds", "CPU time of the thread running forward passes", registry=r
        )
        self.registry.register(_LiveCollector(servicer))
        self._httpd = None
        self.port = 0

    def observe_batch(self, sessions: int, tokens: int, seconds: float, cpu_seconds: float = 0.0) -> None:
        self.step_seconds.observe(seconds)
        self.cpu_seconds.inc(max(0.0, cpu_seconds))
        self.batch_sessions.observe(sessions)
        self.batch_tokens.observe(tokens)
        self.tokens.inc(tokens)
        self.steps.inc()

    def serve(self, host: str, port: int) -> int:
        """Serve `/metrics` on host:port (0: any free port) in a thread; returns the port."""
        self._httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._httpd.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port, extra={"metrics_port": self.port})
        return self.port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def attach_metrics(servicer: PeerServicer, host: str, port: int | None) -> PeerMetrics:
    """Create the peer's metrics, hook them to its scheduler, serve them on `host:port` unless the
    port is None (0: any free port)."""
    metrics = PeerMetrics(servicer)
    servicer.scheduler.observe = metrics.observe_batch
    if port is not None and port >= 0:
        metrics.serve(host, port)
    return metrics

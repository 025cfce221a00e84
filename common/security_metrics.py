"""The security counters of a process as Prometheus metrics, read at scrape time.

`swarm_dht_rejected_entries_total{reason}`: DHT entries (and, in a private swarm, datagrams) this
process's DHT node dropped (`discovery.signing`, docs/security.md); `swarm_grpc_rejected_calls_total
{reason}`: gRPC calls a peer refused with UNAUTHENTICATED (`common.grpc_security.MemberCheck`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class SecurityCollector(Collector):
    """Reads the counters through callables, since the DHT node may start after the registry."""

    def __init__(
        self,
        dht_rejected: Callable[[], Counter | None],
        calls_rejected: Callable[[], Counter | None] = lambda: None,
    ):
        self.dht_rejected = dht_rejected
        self.calls_rejected = calls_rejected

    def collect(self):
        entries = CounterMetricFamily(
            "swarm_dht_rejected_entries",
            "DHT entries dropped by this node: unsigned, forged, oversize, replayed, or datagrams of non-members",
            labels=["reason"],
        )
        for reason, count in sorted((self.dht_rejected() or {}).items()):
            entries.add_metric([reason], count)
        yield entries
        calls = CounterMetricFamily(
            "swarm_grpc_rejected_calls",
            "gRPC calls refused with UNAUTHENTICATED: no valid swarm credential",
            labels=["reason"],
        )
        for reason, count in sorted((self.calls_rejected() or {}).items()):
            calls.add_metric([reason], count)
        yield calls

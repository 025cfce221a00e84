"""Peer-to-peer push: send a step's hidden states straight to the next hop, and time it.

A hop whose step carries `Step.forward` hands its output to the next hop with the unary
`Peer.Push` call (protos/swarm.proto says why unary). The call is answered as soon as the next
hop has validated and queued the step, so its round trip measures the link plus a little
bookkeeping, not the next hop's compute: that is the round trip this peer announces for the
next hop (`nearest`), smoothed like TCP's SRTT, which the gateway's planner uses as the cost of
the edge between two hops in push mode (`gateway.routing`).

The calls carry this peer's swarm credential and TLS client certificate (`ClientSecurity`), so a
private swarm needs nothing more: the next hop admits them like a gateway's.
"""

from __future__ import annotations

import time

import grpc

from common.grpc_security import PUSH_METHOD, ClientSecurity
from common.peer_client import ChannelPool
from protos import swarm_pb2

DEFAULT_TIMEOUT_S = 10.0  # when the step names none (`Step.forward_timeout_ms`)
SMOOTHING = 0.3  # weight of a new sample, as `gateway.rtt` and TCP's SRTT
ANNOUNCED = 8  # next hops whose round trips go in the DHT record: the nearest ones
KEPT = 256  # next hops remembered at most (the oldest are dropped)


class PushFailed(Exception):
    """The next hop did not accept a pushed step: its status, or ours when it did not answer."""

    def __init__(self, address: str, code: grpc.StatusCode, message: str):
        super().__init__(f"{address}: {code.name}: {message}")
        self.address = address
        self.code = code
        self.message = message


class Forwarder:
    """Pushes steps to next hops over one shared channel per address, and keeps their round trips."""

    def __init__(self, security: ClientSecurity | None = None):
        self.pool = ChannelPool(security)
        self.rtt_s: dict[str, float] = {}  # next hop address -> smoothed round trip (seconds)
        self.pushed = 0

    async def push(self, target: swarm_pb2.Forward, step: swarm_pb2.Step, timeout: float | None = None) -> None:
        """Deliver `step` to the session `target` names; PushFailed when it is not accepted."""
        timeout = timeout or DEFAULT_TIMEOUT_S
        request = swarm_pb2.PushRequest(push_id=target.push_id, step=step)
        began = time.perf_counter()
        try:
            await self.pool.stub(target.address).Push(
                request, timeout=timeout, metadata=self.pool.metadata(PUSH_METHOD)
            )
        except grpc.aio.AioRpcError as exc:
            raise PushFailed(target.address, exc.code(), exc.details() or "") from exc
        self._observe(target.address, time.perf_counter() - began)
        self.pushed += 1

    def _observe(self, address: str, seconds: float) -> None:
        old = self.rtt_s.pop(address, None)  # re-inserted last: the dict stays ordered by use
        self.rtt_s[address] = seconds if old is None else old + SMOOTHING * (seconds - old)
        while len(self.rtt_s) > KEPT:
            del self.rtt_s[next(iter(self.rtt_s))]

    def nearest(self, count: int = ANNOUNCED) -> dict[str, float]:
        """The `count` next hops with the shortest round trips, in milliseconds (rounded to 0.1)."""
        best = sorted(self.rtt_s.items(), key=lambda item: item[1])[:count]
        return {address: round(seconds * 1000.0, 1) for address, seconds in best}

    async def close(self) -> None:
        await self.pool.close()

"""Peer-to-peer push: send a step's hidden states straight to the next hop, and time it.

A hop whose step carries `Step.forward` hands its output to the next hop on a `Peer.Push` stream:
a link of a few long-lived streams per next hop address (`_Link`), shared by every session that
pushes there, each request (one step, or a pass's steps) answered by one `PushAck` in order on its stream (protos/swarm.proto says why a stream rather than
a unary call per step). A request is acked as soon as the next hop has validated and queued the
step, so the time to its ack measures the link plus a little bookkeeping, not the next hop's
compute: that is the round trip this peer announces for the next hop (`nearest`), smoothed like
TCP's SRTT, which the gateway's planner uses as the cost of the edge between two hops in push mode
(`gateway.routing`).

Links do not pile up: in a churning swarm a peer pushes to many next hops over time, each link a
stream and a channel. A link unused for `IDLE_S` is closed, with its channel, by a sweep that runs
while links are open; at most `MAX_LINKS` stay open, the least recently used closed first when a
new one would pass that (a link with pushes waiting on acks is never closed, so the bound may be
passed for a moment). A later push to a closed link's address opens a new one, which costs a
channel connect on that step: minutes idle make that rare, and a route's hops push every step.

Concurrency contract: everything runs on the peer's event loop. A stream's writes and the queue of
acks it waits for change together under its lock, so acks match requests by order; its reader
task resolves them. A stream that ends fails every push waiting on it; a link whose streams have
all ended is replaced by a new one at the next push.

The stream carries this peer's swarm credential and TLS client certificate (`ClientSecurity`), so
a private swarm needs nothing more: the next hop admits it like a gateway's calls.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time

import grpc

from common.grpc_security import PUSH_METHOD, ClientSecurity
from common.peer_client import ChannelPool
from protos import swarm_pb2

DEFAULT_TIMEOUT_S = 10.0  # when the step names none (`Step.forward_timeout_ms`)
SMOOTHING = 0.3  # weight of a new sample, as `gateway.rtt` and TCP's SRTT
ANNOUNCED = 8  # next hops whose round trips go in the DHT record: the nearest ones
KEPT = 256  # next hops remembered at most (the oldest are dropped)
IDLE_S = 180.0  # a link unused this long is closed with its channel
MAX_LINKS = 64  # open links at most; the least recently used is closed first
STREAMS_PER_LINK = 4  # pushes in flight at once to one next hop (see `_Link`)


def entries_of(request: swarm_pb2.PushRequest) -> list[tuple[str, swarm_pb2.Step]]:
    """A request's (push_id, step) pairs in order: its own, then `more` (protos/swarm.proto)."""
    return [(request.push_id, request.step), *((entry.push_id, entry.step) for entry in request.more)]


def ack_for(verdicts: list[swarm_pb2.PushVerdict]) -> swarm_pb2.PushAck:
    """The one ack of a request's steps: the first's verdict in its own fields, the rest in
    `more`, and `batches` (this peer takes them); `verdicts_of` reads it back."""
    first = verdicts[0]
    return swarm_pb2.PushAck(code=first.code, message=first.message, more=verdicts[1:], batches=True)


def verdicts_of(ack: swarm_pb2.PushAck) -> list:
    """An ack's verdicts in request order (each has `code` and `message`)."""
    return [ack, *ack.more]


class PushFailed(Exception):
    """The next hop did not accept a pushed step: its status, or ours when it did not answer."""

    def __init__(self, address: str, code: grpc.StatusCode, message: str):
        super().__init__(f"{address}: {code.name}: {message}")
        self.address = address
        self.code = code
        self.message = message


def _status(code: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


class _Link:
    """Up to `STREAMS_PER_LINK` `Push` streams to one next hop, on one channel.

    gRPC takes one write at a time per stream, each awaited until it is handed to the transport
    (~0.3 ms). A pass of 8 sessions pushes 8 steps at once: on one stream they went out one after
    the other. A push takes a stream with no write in flight, opening one while there are fewer
    than `STREAMS_PER_LINK`; a session has one step in flight at a time, so its pushes need no
    order between streams. The link is closed once every stream is. Measured with `swarm up` on
    the bench model at 16 streams (stamps in the scheduler, ~400 passes): the next hop's wait from
    the first push of a pass to its start went from 2.9 to 2.1 ms (median) of a ~32 ms pass, and
    the two peers' busy shares from 69 / 74 % to 74 / 76 %; the benchmark's tokens/s moved less
    than its run-to-run noise.

    Once the next hop's acks say it takes batches (`PushAck.batches`), the steps pushed in one
    turn of the event loop go as one request (`_flush`): a pass's results wake their sessions'
    coroutines together, so a pass's pushes become one message and one ack. Until then (the
    link's first push, or a next hop that predates batches) each step is its own request."""

    def __init__(self, pool: ChannelPool, address: str):
        self.pool = pool
        self.address = address
        self.streams = [_Stream(pool, address)]
        self.used = time.monotonic()  # last push: idle links are closed (`Forwarder._sweep`)
        self.batches = False  # the next hop takes `PushRequest.more` (its acks say so)
        self._batch: list[tuple[str, swarm_pb2.Step, asyncio.Future]] = []  # waiting for `_flush`
        self._flushing: set[asyncio.Task] = set()

    @property
    def closed(self) -> PushFailed | None:
        """Why the link cannot push (every stream ended), or None."""
        if any(stream.closed is None for stream in self.streams):
            return None
        return self.streams[-1].closed

    @property
    def waiting(self) -> list[asyncio.Future]:
        """Acks the link still owes, over all its streams, and steps waiting to go in a batch."""
        return [ack for stream in self.streams for ack in stream.waiting] + [v for *_, v in self._batch]

    async def send(self, push_id: str, step: swarm_pb2.Step) -> asyncio.Future:
        """Send `step` for the session `push_id`; a future of its verdict (`PushAck` or
        `PushVerdict`: `code`, `message`). Once the next hop has said it takes batches, the steps
        sent in one turn of the event loop (a pass's, all woken together) go as one request."""
        self.used = time.monotonic()
        if not self.batches:
            ack = await self._send(swarm_pb2.PushRequest(push_id=push_id, step=step))
            ack.add_done_callback(self._learn)
            return ack
        verdict = asyncio.get_running_loop().create_future()
        self._batch.append((push_id, step, verdict))
        if len(self._batch) == 1:  # a task's first step runs after this turn's ready callbacks
            self._flushing.add(task := asyncio.get_running_loop().create_task(self._flush()))
            task.add_done_callback(self._flushing.discard)
        return verdict

    def _learn(self, ack: asyncio.Future) -> None:
        if not ack.cancelled() and ack.exception() is None and ack.result().batches:
            self.batches = True

    async def _flush(self) -> None:
        batch, self._batch = self._batch, []
        (push_id, step, _), rest = batch[0], batch[1:]
        request = swarm_pb2.PushRequest(
            push_id=push_id, step=step, more=[swarm_pb2.PushEntry(push_id=p, step=s) for p, s, _ in rest]
        )
        try:
            ack = await (await self._send(request))
        except Exception as exc:  # noqa: BLE001 - every push of the batch must hear of it
            failure = (
                exc
                if isinstance(exc, PushFailed)
                else PushFailed(self.address, grpc.StatusCode.UNAVAILABLE, f"batched push failed: {exc}")
            )
            for *_, verdict in batch:
                if not verdict.done():
                    verdict.set_exception(failure)
            return
        verdicts = verdicts_of(ack)
        for i, (*_, verdict) in enumerate(batch):
            if verdict.done():  # its pusher gave up waiting
                continue
            if i < len(verdicts):
                verdict.set_result(verdicts[i])
            else:
                verdict.set_exception(
                    PushFailed(
                        self.address, grpc.StatusCode.INTERNAL, "the next hop left a batched step unanswered"
                    )
                )

    async def _send(self, request: swarm_pb2.PushRequest) -> asyncio.Future:
        open_streams = [stream for stream in self.streams if stream.closed is None]
        if not open_streams:
            raise self.closed
        self.streams = open_streams
        stream = next((stream for stream in open_streams if not stream.lock.locked()), None)
        if stream is None and len(open_streams) < STREAMS_PER_LINK:
            stream = _Stream(self.pool, self.address)
            self.streams.append(stream)
        if stream is None:  # every stream has a write in flight: queue behind the least busy
            stream = min(open_streams, key=lambda candidate: len(candidate.waiting))
        return await stream.send(request)

    async def close(self, why: str) -> None:
        """End every stream; a push still waiting on one fails (none does when it is idle)."""
        await asyncio.gather(*(stream.close(why) for stream in self.streams))


class _Stream:
    """One `Push` stream of a link, and the acks it still owes, oldest first."""

    def __init__(self, pool: ChannelPool, address: str):
        self.address = address
        self.call = pool.stub(address).Push(metadata=pool.metadata(PUSH_METHOD))
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.lock = asyncio.Lock()
        self.closed: PushFailed | None = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def send(self, request: swarm_pb2.PushRequest) -> asyncio.Future:
        ack = asyncio.get_running_loop().create_future()
        async with self.lock:
            if self.closed is not None:
                raise self.closed
            self.waiting.append(ack)
            try:
                await self.call.write(request)
            except (
                grpc.aio.AioRpcError,
                grpc.aio.UsageError,
                asyncio.InvalidStateError,
                RuntimeError,
            ) as exc:
                self._fail(PushFailed(self.address, grpc.StatusCode.UNAVAILABLE, f"push stream broke: {exc}"))
        return ack

    async def _read(self) -> None:
        failure = PushFailed(self.address, grpc.StatusCode.UNAVAILABLE, "push stream ended")
        try:
            while True:
                ack = await self.call.read()
                if ack is grpc.aio.EOF:
                    code = await self.call.code()
                    failure = PushFailed(self.address, code, await self.call.details() or "push stream ended")
                    break
                if self.waiting:
                    future = self.waiting.popleft()
                    if not future.done():  # else its pusher gave up waiting
                        future.set_result(ack)
        except grpc.aio.AioRpcError as exc:
            failure = PushFailed(self.address, exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            failure = PushFailed(self.address, grpc.StatusCode.CANCELLED, "this peer is stopping")
            raise
        finally:
            self._fail(failure)

    async def close(self, why: str) -> None:
        """End the stream; a push still waiting on it fails (none does when it is idle)."""
        self._fail(PushFailed(self.address, grpc.StatusCode.CANCELLED, why))
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader

    def _fail(self, failure: PushFailed) -> None:
        self.closed = self.closed or failure
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.closed)
        self.call.cancel()


@dataclasses.dataclass
class Sent:
    """A push on its way (`Forwarder.send`): where to, since when, and the future of its verdict."""

    address: str
    began: float
    verdict: asyncio.Future


class Forwarder:
    """Pushes steps to next hops over one stream per address, and keeps their round trips."""

    def __init__(
        self, security: ClientSecurity | None = None, idle_s: float = IDLE_S, max_links: int = MAX_LINKS
    ):
        self.pool = ChannelPool(security)
        self.idle_s = idle_s
        self.max_links = max_links
        # next hop address -> its link, least recently used first
        self._links: collections.OrderedDict[str, _Link] = collections.OrderedDict()
        self._sweeper: asyncio.Task | None = None  # closes idle links while there are any
        self.rtt_s: dict[str, float] = {}  # next hop address -> smoothed round trip (seconds)
        self.pushed = 0
        self.links_closed = 0  # idle or least recently used links closed so far

    async def push(
        self, target: swarm_pb2.Forward, step: swarm_pb2.Step, timeout: float | None = None
    ) -> None:
        """Deliver `step` to the session `target` names; PushFailed when it is not accepted."""
        await self.accepted(await self.send(target, step), timeout)

    async def send(self, target: swarm_pb2.Forward, step: swarm_pb2.Step) -> Sent:
        """Start delivering `step` (it goes out with the other steps sent in this turn of the event
        loop); `accepted` waits for the verdict."""
        link = await self._link(target.address)
        began = time.perf_counter()
        return Sent(target.address, began, await link.send(target.push_id, step))

    async def accepted(self, sent: Sent, timeout: float | None = None) -> None:
        """Wait for the next hop to accept a step `send` started; PushFailed when it does not."""
        try:
            async with asyncio.timeout(timeout or DEFAULT_TIMEOUT_S):
                ack = await sent.verdict
        except TimeoutError:
            raise PushFailed(
                sent.address,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the next hop did not accept the step in time",
            ) from None
        if ack.code:
            raise PushFailed(sent.address, _status(ack.code), ack.message)
        self._observe(sent.address, time.perf_counter() - sent.began)
        self.pushed += 1

    async def _link(self, address: str) -> _Link:
        """The open link to `address`, made the most recently used; a new one if there is none,
        then closing the least recently used idle links beyond `max_links`."""
        link = self._links.get(address)
        if link is not None and link.closed is None:
            self._links.move_to_end(address)
            return link
        self._links.pop(address, None)  # a broken one: its stream already ended
        link = self._links[address] = _Link(self.pool, address)  # no await before: one per address
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        excess = len(self._links) - self.max_links
        if excess > 0:
            idle = [(a, old) for a, old in self._links.items() if a != address and not old.waiting]
            for old_address, old in idle[:excess]:
                await self._close_link(old_address, old, "least recently used push link")
        return link

    async def _sweep(self) -> None:
        """Close links idle for `idle_s`, checking a few times per period, until none is open."""
        while self._links:
            await asyncio.sleep(self.idle_s / 4)
            now = time.monotonic()
            for address, link in list(self._links.items()):
                if link.closed is not None or (not link.waiting and now - link.used >= self.idle_s):
                    await self._close_link(address, link, "idle push link")

    async def _close_link(self, address: str, link: _Link, why: str) -> None:
        if self._links.get(address) is not link:
            return  # replaced by a newer link meanwhile
        del self._links[address]
        self.links_closed += link.closed is None
        await link.close(why)
        if address not in self._links:  # no push opened a new link there meanwhile
            await self.pool.discard(address)

    def links(self) -> list[str]:
        """Addresses of the open links, least recently used first."""
        return [address for address, link in self._links.items() if link.closed is None]

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
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        links, self._links = list(self._links.values()), collections.OrderedDict()
        for link in links:
            for stream in link.streams:
                stream.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream.reader
        await self.pool.close()

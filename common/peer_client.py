"""Typed async client for a peer's `Inference` stream; the gateway drives routes with it.

It imports no torch: hidden states pass through the gateway as the `swarm.Tensor` messages the
previous peer produced, never decoded.
"""

from __future__ import annotations

import asyncio

import grpc

from common.grpc_security import INFERENCE_METHOD, INFO_METHOD, ClientSecurity
from protos import swarm_pb2, swarm_pb2_grpc

MAX_MESSAGE_BYTES = 64 << 20
KEEPALIVE_MS = 10_000  # a client pings an idle connection this often, to notice a dead peer


def channel_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, int]]:
    """Options of every channel to a peer (the gateway's and the peers' own push links)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 5_000),
    ]


def server_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, int]]:
    """Options of a peer's server, matched to `channel_options`: it must accept the clients'
    keepalive pings. gRPC's default takes a ping more often than every 5 minutes on a connection
    that carries no data as abuse, and after two such "strikes" ends the connection (GOAWAY
    too_many_pings): an idle push link or gateway stream broke every few minutes, and the next
    step through it failed (and was relayed, or failed over)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


CHANNEL_OPTIONS = channel_options()


class PeerError(Exception):
    """A peer answered with a gRPC error or the stream broke."""

    def __init__(self, address: str, code: grpc.StatusCode | None, message: str):
        super().__init__(f"{address}: {code.name if code else 'stream closed'}: {message}")
        self.address = address
        self.code = code
        self.message = message


class ChannelPool:
    """One channel per peer address, shared by every session of this process.

    `security` (`common.grpc_security`): TLS channels and the swarm membership credential that
    every call carries (`metadata`); the default is plaintext without credentials (an open swarm).
    """

    def __init__(self, security: ClientSecurity | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.security = security or ClientSecurity()
        self._credentials = self.security.tls.channel_credentials() if self.security.tls else None

    def stub(self, address: str) -> swarm_pb2_grpc.PeerStub:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return swarm_pb2_grpc.PeerStub(channel)

    def metadata(self, method: str, extra: tuple = ()) -> tuple | None:
        """The call metadata: `extra` plus the membership credential when the swarm is private."""
        return (*extra, *self.security.metadata(method)) or None

    async def discard(self, address: str) -> None:
        """Close the channel to `address`, if any (a later `stub` opens a new one)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


class PeerSession:
    """One open session on one peer: `open`, then `step` as often as needed, then `close`."""

    def __init__(self, pool: ChannelPool, address: str):
        self.address = address
        self._pool = pool
        self._stub = pool.stub(address)
        self._call = None
        self.peer_id = ""
        self.cache_length = 0  # tokens the peer still held for a resumed session when it opened
        self.push_id = ""  # what the previous hop names this session by in a push (`Forward.push_id`)
        self._reading: asyncio.Task | None = None  # a read in flight (`reading`), not yet consumed
        self.draining = False  # a skipped (late) answer said the peer is draining
        self.load_key: str | None = None  # peer id under which the gateway counts this session

    async def open(self, request: swarm_pb2.OpenSession, metadata: tuple = ()) -> swarm_pb2.Opened:
        self._call = self._stub.Inference(metadata=self._pool.metadata(INFERENCE_METHOD, tuple(metadata)))
        response = await self._exchange(swarm_pb2.InferenceRequest(open=request))
        if response.WhichOneof("kind") != "opened":
            raise PeerError(self.address, None, "expected an `opened` reply")
        self.peer_id = response.opened.peer_id
        self.push_id = response.opened.push_id
        return response.opened

    async def step(self, step: swarm_pb2.Step) -> swarm_pb2.StepResult:
        """Send `step` and return its result (relay, or the first hop of a push chain)."""
        await self.send(step)
        return await self.receive(step.seq)

    async def send(self, step: swarm_pb2.Step) -> None:
        await self._exchange(swarm_pb2.InferenceRequest(step=step), read=False)

    async def halt(self) -> None:
        """End the session's decode loop (`Halt`, protos/swarm.proto); nothing is answered."""
        await self._exchange(swarm_pb2.InferenceRequest(halt=swarm_pb2.Halt()), read=False)

    async def receive(self, seq: int = 0) -> swarm_pb2.StepResult:
        """The result of the step numbered `seq`, sent here or pushed to this hop by the previous
        one. Results of other steps are stale (a push given up on, then retried) and skipped; a
        peer that does not know `Step.seq` answers 0, which is taken as this step's."""
        while True:
            if self._reading is not None:
                response = await self.consume(self._reading)
            else:
                response = await self._exchange(None)
            result = self.result_of(response, seq)
            if result is not None:
                return result

    def reading(self) -> asyncio.Task:
        """The next answer of the stream, read in a task of its own: a caller may wait for several
        hops at once and give up on some (`consume` takes the answer when it wants it). Survives
        a cancelled waiter, unlike `receive`'s plain read."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._exchange(None))
        return self._reading

    async def consume(self, task: asyncio.Task) -> swarm_pb2.InferenceResponse:
        """The answer `reading()` read (PeerError when the stream broke); the next read starts anew."""
        response = await asyncio.shield(task)
        if self._reading is task:
            self._reading = None
        return response

    def result_of(self, response: swarm_pb2.InferenceResponse, seq: int) -> swarm_pb2.StepResult | None:
        """The step result in `response` when it answers step `seq` (None: a stale answer);
        PeerError when it is not a result, or says the step failed."""
        if response.WhichOneof("kind") != "result":
            raise PeerError(self.address, None, "expected a step result")
        result = response.result
        if result.seq not in (0, seq):
            self.draining = self.draining or result.draining
            return None
        if result.error_code:  # a pushed step that failed on this peer; its stream stays open
            code = next(
                (c for c in grpc.StatusCode if c.value[0] == result.error_code), grpc.StatusCode.UNKNOWN
            )
            raise PeerError(self.address, code, result.error_message)
        return result

    async def _exchange(
        self, request: swarm_pb2.InferenceRequest | None, read: bool = True
    ) -> swarm_pb2.InferenceResponse | None:
        if self._call is None:
            raise PeerError(self.address, None, "session is not open")
        try:
            if request is not None:
                await self._call.write(request)
            if not read:
                return None
            response = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise PeerError(self.address, exc.code(), exc.details() or "") from exc
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:  # the peer already ended the RPC
            raise PeerError(self.address, None, str(exc) or "stream finished") from exc
        if response is grpc.aio.EOF:
            code = await self._call.code()
            details = await self._call.details()
            raise PeerError(self.address, code, details or "stream ended")
        return response

    def abort(self) -> None:
        """Cancel the RPC now, without awaiting: the peer sees the stream end and frees the cache.
        Safe to call at any time, also after `close` (then it does nothing)."""
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        self._forget_reading()

    def _forget_reading(self) -> None:
        task, self._reading = self._reading, None
        if task is not None:
            task.cancel()
            # its outcome (the stream's end) interests no one
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        """Tell the peer to free the session's cache; never raises (the peer may be gone)."""
        self._forget_reading()
        call, self._call = self._call, None
        if call is None:
            return
        try:
            await call.write(swarm_pb2.InferenceRequest(close=swarm_pb2.Close()))
            await call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError, asyncio.InvalidStateError):
            pass  # the stream already ended (the peer closed it, or it broke)
        finally:
            # Also when the polite close above is cancelled (a client that disconnected
            # mid-stream cancels the whole request, and anyio re-cancels every await in it):
            # cancelling the RPC ends the peer's stream, and the peer frees the cache at once.
            call.cancel()


async def peer_info(pool: ChannelPool, address: str, timeout: float = 5.0) -> swarm_pb2.InfoResponse:
    try:
        return await pool.stub(address).Info(
            swarm_pb2.InfoRequest(), timeout=timeout, metadata=pool.metadata(INFO_METHOD)
        )
    except grpc.aio.AioRpcError as exc:
        raise PeerError(address, exc.code(), exc.details() or "") from exc

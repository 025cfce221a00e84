"""WAN emulation in user space: a TCP proxy per peer that gives its link a one-way delay, jitter,
loss and bandwidth.

This machine's kernel has no `netem` qdisc (``tc qdisc add ... netem`` answers "Specified qdisc
kind is unknown"), so the link is emulated where the bytes pass: the proxy accepts the gateway's
(or another peer's) connection, connects to the peer's real gRPC port, and in each direction
holds every chunk it reads until ``now + delay (+ jitter)`` before writing it on. Chunks keep
their order (a chunk is never delivered before the one read before it, which is what TCP
guarantees and what jitter must not break) and the two directions run independently, so a
request does not wait behind a reply. Bandwidth paces the writes (a chunk of n bytes occupies
the link n / bandwidth seconds). Loss cannot drop bytes inside TCP; a lost segment costs its
retransmission, so a chunk is "lost" with probability `loss` and then delivered one
retransmission timeout later (200 ms, Linux's minimum RTO, plus a round trip).

The peer announces the proxy's address (`swarm peer --announce-port`), so every client goes
through it. `WanLink` runs one proxy on its own event loop in a thread, for tests and
benchmarks that are synchronous; `start_link` is the asyncio entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

CHUNK_BYTES = 64 * 1024
MIN_RTO_S = 0.2


@dataclass(frozen=True)
class LinkShape:
    delay_ms: float = 0.0  # one way
    jitter_ms: float = 0.0  # uniform in [-jitter, +jitter], never reordering
    loss: float = 0.0  # probability that a chunk needs a retransmission
    bandwidth_bps: float = 0.0  # bits per second; 0: unlimited

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.bandwidth_bps < 0 or not 0 <= self.loss < 1:
            raise ValueError(f"invalid link shape {self}")


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    shape_of: Callable[[], LinkShape],
    rng: random.Random,
):
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def read() -> None:
        last = 0.0
        try:
            while data := await reader.read(CHUNK_BYTES):
                shape = shape_of()
                due = loop.time() + shape.delay_ms / 1000
                if shape.jitter_ms:
                    due += rng.uniform(-shape.jitter_ms, shape.jitter_ms) / 1000
                if shape.loss and rng.random() < shape.loss:
                    due += MIN_RTO_S + 2 * shape.delay_ms / 1000
                last = max(last, due)  # in order, whatever the jitter drew
                queue.put_nowait((last, data))
        finally:
            queue.put_nowait(None)

    async def write() -> None:
        link_free = 0.0
        while (item := await queue.get()) is not None:
            due, data = item
            shape = shape_of()
            if shape.bandwidth_bps:
                due = max(due, link_free)
                link_free = due + len(data) * 8 / shape.bandwidth_bps
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def start_link(
    listen_port: int,
    target: tuple[str, int],
    shape: LinkShape | Callable[[], LinkShape],
    *,
    seed: int = 0,
    host: str = "127.0.0.1",
) -> asyncio.Server:
    """Proxy `host:listen_port` to `target` through a link of `shape` (both directions); a
    callable is asked for the shape at every chunk, so a benchmark can change it between runs."""
    rng = random.Random(seed)
    shape_of = shape if callable(shape) else (lambda: shape)

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            peer_reader, peer_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        # cancelled when the link stops: end quietly (asyncio's stream callback would log a
        # cancelled connection task as an error)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(
                _pipe(client_reader, peer_writer, shape_of, rng),
                _pipe(peer_reader, client_writer, shape_of, rng),
            )

    return await asyncio.start_server(serve, host, listen_port)


class WanLink:
    """One proxy on its own loop in a daemon thread: ``with WanLink(port, target, shape): ...``."""

    def __init__(self, listen_port: int, target: tuple[str, int], shape: LinkShape, seed: int = 0):
        self.listen_port, self.target, self.shape, self.seed = listen_port, target, shape, seed
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"wan-{listen_port}")
        self._server: asyncio.Server | None = None

    def start(self) -> WanLink:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            start_link(self.listen_port, self.target, lambda: self.shape, seed=self.seed), self._loop
        )
        self._server = future.result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> WanLink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

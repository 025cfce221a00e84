"""The block peer process: load one span, serve it over gRPC, announce it in the DHT, drain on exit.

`PeerServer` wires the parts together: the span (`peer.model`), the `BatchScheduler`
(`peer.scheduler`) that runs every forward pass, the `PeerServicer` (`peer.servicer`) that answers
the streams, the peer's description (`peer.identity`) that the DHT record, `Info` and `/metrics`
share, and `/metrics` itself (`peer.metrics`). `run_peer` is the `swarm peer` entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from common.grpc_security import ClientSecurity, MemberCheck, TlsFiles, listen_warning, security_summary
from common.identity import Identity
from common.peer_client import server_options
from common.security_metrics import SecurityCollector
from discovery.records import PeerRecord
from peer import gemm
from peer.balancer import Balancer
from peer.batching_config import (
    PIPELINE_GROUPS,
    PIPELINE_MIN_SESSIONS,
    BatchingConfig,
    available_memory_bytes,
    choose_pipeline_groups,
    choose_prepack,
)
from peer.block_selection import available_memory_bytes as free_memory_bytes
from peer.block_selection import blocks_that_fit, choose_span
from peer.forwarding import Forwarder
from peer.identity import describe
from peer.metrics import attach_metrics
from peer.model import BlockSpan, SpanConfig, block_bytes
from peer.scheduler import BatchScheduler
from peer.servicer import PeerServicer
from peer.throughput import (
    PROFILE_SPREAD_S,
    PassProfile,
    PassTimer,
    ThroughputMeter,
    measure_pass_profile,
)
from protos import swarm_pb2_grpc

log = logging.getLogger("peer")

WITHDRAW_TIMEOUT_S = 2.0
# An idle peer refines its start-up profile this often, this many times per span (peer.throughput)
REFINE_INTERVAL_S = 2.0
REFINE_ROUNDS = 30
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5}  # bytes per weight of a quantized span (block selection's budget)


@dataclass
class PeerConfig:
    model_dir: Path
    model_id: str
    start: int | None  # None (with end): the peer chooses its span from the DHT (peer.block_selection)
    end: int | None
    host: str = "127.0.0.1"
    port: int = 0
    announce_host: str | None = None  # address other machines reach this peer at
    announce_port: int = (
        0  # port others reach it at, when not its own (a proxy: loadtests/wan.py); 0: its own
    )
    dht_bootstrap: list[tuple[str, int]] = field(default_factory=list)
    dht_port: int = 0
    dtype: torch.dtype = torch.float32
    quant: str = "none"
    device: str = "cpu"
    wire_dtype: torch.dtype | None = None  # dtype of hidden states we send; None = compute dtype
    cache_tokens: int = 0  # KV budget in tokens over all sessions; 0 = derive from free memory
    cache_bytes: int = 0  # the same budget in bytes (used when cache_tokens is 0)
    open_wait: float = 5.0  # seconds an open waits for cache room before RESOURCE_EXHAUSTED
    idle_ttl: float = 300.0  # seconds a closed session's cache is kept for resumption (0: never)
    # seconds an opened session may wait for its first step before it is closed (0: forever). A
    # later hop of a route gets its first step only after the earlier hops' opens and prefills
    # (the gateway allows --step-timeout, 10 s, for each), so this is well above 10 s.
    first_step_timeout: float = 30.0
    # live (or opening) sessions one client host may hold; a gateway opens one per choice of each
    # request it serves, so the default is far above its load and still bounded
    max_sessions_per_client: int = 1024
    # tokens per forward pass; longer prefills are chunked. Every decoding stream waits for a pass:
    # 512 tokens of the bench model take ~0.5 s on one CPU core, 256 half that, for the same tokens/s
    # at 16 streams (docs/benchmarks-batching.md)
    max_batch_tokens: int = 256
    batch_wait_ms: float = 3.0  # how long a pass waits for steps of active sessions still in flight
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # a oneDNN-packed copy of fp32 CPU weights for batched passes (peer.gemm); None: the peer
    # chooses by its memory budget (peer.batching_config)
    prepack: bool | None = None
    # first span: sessions take turns in this many groups (BatchScheduler._gather); None: `auto`
    # (peer.batching_config)
    pipeline_groups: int | None = None
    # chosen spans only: how many blocks (0: as many as `memory_budget` holds), the bytes the
    # weights and the KV cache may take (0: the memory available at start), and how often the
    # peer checks whether moving would help the swarm (0: never)
    num_blocks: int = 0
    memory_budget: int = 0
    balance_interval: float = 60.0
    heartbeat: float = 5.0
    ttl: float = 15.0
    drain_timeout: float = 30.0
    metrics_port: int | None = None  # HTTP port of /metrics: None = off, 0 = any free port
    # the Ed25519 key this peer's id derives from and its DHT record is signed with (created there
    # on first start); None: a new key in memory, so a new id on every start
    identity_file: Path | None = None
    swarm_key: bytes | None = None  # private swarm: only callers holding it are served
    tls: TlsFiles | None = None  # serve gRPC over TLS (mutual when it has a CA)
    peer_id: str = ""  # set from the identity at start


def cache_budget_tokens(span: BlockSpan, cache_tokens: int = 0, cache_bytes: int = 0) -> int:
    """The KV budget in tokens: `--cache-tokens`, else `--cache-bytes`, else from free memory."""
    if cache_tokens:
        return cache_tokens
    if cache_bytes:
        return max(1, cache_bytes // span.new_cache(capacity=1).bytes_per_token)
    return default_cache_tokens(span)


def default_cache_tokens(span: BlockSpan) -> int:
    """Half of the memory that is free now, in tokens of this span's KV cache."""
    bytes_per_token = span.new_cache(capacity=1).bytes_per_token
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = 4 << 30
    return max(4096, pages // 2 // max(1, bytes_per_token))


def choose_batching(span: BlockSpan, cfg: PeerConfig) -> BatchingConfig:
    """The peer's batching configuration: the flags where given, else its own choice from its memory
    budget and its place in routes (`peer.batching_config`). The span is loaded, not yet packed."""
    packed_bytes = gemm.packable_bytes(span.modules())
    kv_bytes = 0  # an explicit KV budget is set aside; the default one is taken from what is left
    if cfg.cache_tokens or cfg.cache_bytes:
        kv_bytes = (
            cache_budget_tokens(span, cfg.cache_tokens, cfg.cache_bytes)
            * span.new_cache(capacity=1).bytes_per_token
        )
    prepack, prepack_reason = choose_prepack(
        cfg.prepack,
        packable=packed_bytes > 0 and bool(gemm.copy_formats()),
        packed_bytes=packed_bytes,
        available_bytes=available_memory_bytes(),
        kv_budget_bytes=kv_bytes,
    )
    groups, groups_reason = choose_pipeline_groups(
        cfg.pipeline_groups, is_first=span.is_first, is_last=span.is_last, prepack=prepack
    )
    return BatchingConfig(prepack, prepack_reason, groups, groups_reason)


class PeerServer:
    """Loads the span, serves gRPC, announces in the DHT; `stop()` drains and withdraws."""

    def __init__(self, config: PeerConfig):
        self.config = config
        self.server: grpc.aio.Server | None = None
        self.servicer: PeerServicer | None = None
        self.scheduler: BatchScheduler | None = None
        self.dht = None
        self.announcer = None
        self.metrics = None
        self.batching: BatchingConfig | None = None
        self.meter: ThroughputMeter | None = None
        self.chose_span = False  # no --blocks: the span came from the DHT, and may move
        self.moving_to: tuple[int, int] | None = None  # announced while a move runs (`move_to`)
        self.balancer: Balancer | None = None
        self._balancing: asyncio.Task | None = None
        self._refining: asyncio.Task | None = None  # `_refine_profile`
        self.port = 0
        self.identity: Identity | None = None
        self.member_check: MemberCheck | None = None

    async def start(self) -> None:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.identity = (
            Identity.load_or_create(cfg.identity_file) if cfg.identity_file else Identity.generate()
        )
        cfg.peer_id = self.identity.peer_id
        loop = asyncio.get_running_loop()
        if cfg.start is None or cfg.end is None:
            await self._choose_span()
        span = await loop.run_in_executor(
            None,
            lambda: BlockSpan.load(
                cfg.model_dir,
                cfg.start,
                cfg.end,
                dtype=cfg.dtype,
                device=cfg.device,
                quant=cfg.quant,
                calibrate=False,
            ),
        )  # raises ValueError for blocks outside the model before reading any weight
        self.batching = choose_batching(span, cfg)
        plans = await loop.run_in_executor(
            None, lambda: gemm.calibrate(span.modules(), prepack=self.batching.prepack)
        )
        self.batching = dataclasses.replace(self.batching, copies=gemm.copies_in(plans))
        log.info("batching: %s", self.batching.describe())
        cache_tokens = cache_budget_tokens(span, cfg.cache_tokens, cfg.cache_bytes)
        groups = self.batching.pipeline_groups
        self.scheduler = BatchScheduler(
            span, cfg.max_batch_tokens, cfg.batch_wait_ms,
            groups=groups or PIPELINE_GROUPS, split_from=0 if groups else PIPELINE_MIN_SESSIONS,
        )  # fmt: skip
        self.scheduler.start()
        self.servicer = PeerServicer(
            span, self.scheduler, peer_id=cfg.peer_id, cache_tokens=cache_tokens, describe=self.record,
            wire_dtype=cfg.wire_dtype, idle_ttl=cfg.idle_ttl, open_wait=cfg.open_wait,
            first_step_timeout=cfg.first_step_timeout, max_sessions_per_client=cfg.max_sessions_per_client,
            # pushes to next hops present what a gateway's calls do: the swarm credential and, over
            # mutual TLS, this peer's certificate (the swarm's CA signs it for client use too)
            forwarder=Forwarder(ClientSecurity(cfg.swarm_key, self.identity.public_key, cfg.tls)),
        )  # fmt: skip
        self.servicer.batching = self.batching.describe()
        await self._profile(span)
        self.member_check = MemberCheck(cfg.swarm_key) if cfg.swarm_key else None
        self.server = grpc.aio.server(
            options=server_options(),
            interceptors=[self.member_check] if self.member_check else None,
        )
        swarm_pb2_grpc.add_PeerServicer_to_server(self.servicer, self.server)
        if cfg.tls is not None:
            self.port = self.server.add_secure_port(f"{cfg.host}:{cfg.port}", cfg.tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        # /metrics on --metrics-port, and the scheduler's hook; once the port is bound, because its
        # swarm_peer_info labels come from `record()`, which holds the address
        self.metrics = attach_metrics(self.servicer, cfg.host, cfg.metrics_port)
        self.metrics.registry.register(
            SecurityCollector(
                lambda: self.dht.rejected if self.dht else None,
                lambda: self.member_check.rejected if self.member_check else None,
            )
        )
        self.scheduler.observe = self._observe_pass
        await self.server.start()
        me = self.record()
        log.info(
            "peer %s serving %s blocks [%d, %d) on %s:%d (%s, quant %s, %.1f MB weights/block, %.1f tok/s, "
            "cache budget %d tokens); %s%s",
            me.peer_id, me.model, me.start, me.end, cfg.host, self.port, me.dtype, me.quant,
            span.weight_bytes()["per_block"] / 1e6, me.throughput, cache_tokens,
            security_summary(cfg.swarm_key, cfg.tls),
            listen_warning(cfg.host),
        )  # fmt: skip
        if cfg.dht_bootstrap is not None:
            await self._join_dht()

    async def _profile(self, span: BlockSpan) -> None:
        """Measure the span's start-up profile and start announcing from it (`peer.throughput`)."""
        loop = asyncio.get_running_loop()
        timer = await loop.run_in_executor(None, PassTimer, span)
        profile = await loop.run_in_executor(None, measure_pass_profile, span, 24, PROFILE_SPREAD_S, timer)
        self._start_meter(profile, timer)

    def _start_meter(self, profile: PassProfile, timer: PassTimer) -> None:
        self.meter = ThroughputMeter(profile)
        self.servicer.throughput = self.meter.tokens_per_second
        if self._refining is not None:
            self._refining.cancel()
        self._refining = asyncio.get_running_loop().create_task(self._refine_profile(self.meter, timer))

    async def _refine_profile(self, meter: ThroughputMeter, timer: PassTimer) -> None:
        """Take a profile round now and then while no session is live (`ThroughputMeter.refine`),
        on the forward thread, so it never runs beside a real pass."""
        loop = asyncio.get_running_loop()
        for _ in range(REFINE_ROUNDS):
            await asyncio.sleep(REFINE_INTERVAL_S)
            if self.servicer.sessions:
                continue
            try:
                one, many = await loop.run_in_executor(self.scheduler._executor, timer.pair)
            except RuntimeError:  # the executor shut down: the peer is stopping
                return
            meter.refine(one, many)
            self.servicer.throughput = meter.tokens_per_second

    def _observe_pass(self, sessions: int, tokens: int, seconds: float, cpu_seconds: float) -> None:
        """The scheduler's hook after each forward pass: metrics (wall and CPU time), and the
        announced throughput (CPU time: `peer.throughput`)."""
        self.metrics.observe_batch(sessions, tokens, seconds, cpu_seconds)
        self.meter.observe(sessions, tokens, cpu_seconds)
        self.servicer.throughput = self.meter.tokens_per_second

    @property
    def address(self) -> str:
        host = self.config.announce_host or self.config.host
        return f"{host}:{self.config.announce_port or self.port}"

    def record(self) -> PeerRecord:
        """What this peer is now (`peer.identity.describe`): announced in the DHT, and the source
        of `Info` and of the `swarm_peer_info` metric."""
        servicer = self.servicer
        return describe(
            servicer.span,
            peer_id=self.config.peer_id,
            model=self.config.model_id,
            address=self.address,
            throughput=servicer.throughput,
            free_cache_tokens=servicer.free_cache_tokens,
            live_sessions=len(servicer.sessions),
            draining=servicer.draining,
            expires_at=time.time() + self.config.ttl,
            metrics_port=self.metrics.port if self.metrics else 0,
            next_rtt=servicer.forwarder.nearest(),
            auto_span=self.chose_span,
            moving_to=self.moving_to,
        )

    async def _start_dht(self) -> None:
        from discovery.dht import SwarmDHT

        self.dht = SwarmDHT(identity=self.identity, swarm_key=self.config.swarm_key)
        await self.dht.start(self.config.host, self.config.dht_port, self.config.dht_bootstrap)

    async def _join_dht(self) -> None:
        from discovery.announcer import Announcer

        if self.dht is None:
            await self._start_dht()
        self.announcer = Announcer(
            self.dht, self.record, heartbeat=self.config.heartbeat, ttl=self.config.ttl
        )
        await self.announcer.start()
        if self.chose_span and self.config.balance_interval > 0:
            self.balancer = Balancer(
                lambda: self.dht.peers(self.config.model_id), self.record, self.move_to,
                interval=self.config.balance_interval,
            )  # fmt: skip
            self._balancing = asyncio.get_running_loop().create_task(self.balancer.run())

    async def _choose_span(self) -> None:
        """Pick the blocks to serve from the DHT's records (`peer.block_selection`)."""
        cfg = self.config
        if not cfg.dht_bootstrap:
            raise ValueError("a peer without --blocks chooses them from the DHT: give --dht")
        model_config = SpanConfig.from_model_dir(cfg.model_dir)  # refuses an unsupported family
        num_blocks = model_config.num_hidden_layers
        length = cfg.num_blocks
        if length <= 0:
            budget = cfg.memory_budget or free_memory_bytes()
            kv_bytes = cfg.cache_bytes or budget // 4  # what the KV cache is left at least
            weight_bytes = QUANT_BYTES.get(cfg.quant) or torch.finfo(cfg.dtype).bits / 8
            length = blocks_that_fit(block_bytes(model_config, weight_bytes), budget - kv_bytes, num_blocks)
        await self._start_dht()
        records = await self.dht.peers(cfg.model_id)
        cfg.start, cfg.end = choose_span(records, num_blocks, length, skip=cfg.peer_id)
        self.chose_span = True
        log.info(
            "chose blocks [%d, %d) of %d (%d peer(s) announced)", cfg.start, cfg.end, num_blocks, len(records)
        )

    def _load_span(self, start: int, end: int) -> BlockSpan:
        cfg = self.config
        span = BlockSpan.load(cfg.model_dir, start, end, dtype=cfg.dtype, device=cfg.device, quant=cfg.quant,
                              calibrate=False)  # fmt: skip
        plans = gemm.calibrate(span.modules(), prepack=self.batching.prepack)
        # Info's batching line names the copies the new span's plans use
        self.batching = dataclasses.replace(self.batching, copies=gemm.copies_in(plans))
        if self.servicer is not None:
            self.servicer.batching = self.batching.describe()
        return span

    async def move_to(self, start: int, end: int) -> None:
        """Serve [start, end) instead: drain (gateways replay live sessions elsewhere), load the new
        span, announce it. A session that outlives the drain timeout cancels the move."""
        cfg, servicer = self.config, self.servicer
        if self._refining is not None:
            self._refining.cancel()
        servicer.draining = True
        self.moving_to = (start, end)  # others count [start, end) as served from now on
        servicer.table.drop_idle()
        await self.announcer.announce_now()
        try:
            await asyncio.wait_for(servicer.all_closed.wait(), cfg.drain_timeout)
        except TimeoutError:
            log.warning("sessions outlived the drain; staying on [%d, %d)", cfg.start, cfg.end)
            servicer.draining = False
            self.moving_to = None
            await self.announcer.announce_now()
            return
        loop = asyncio.get_running_loop()
        try:
            span = await loop.run_in_executor(None, self._load_span, start, end)
            timer = await loop.run_in_executor(None, PassTimer, span)
            profile = await loop.run_in_executor(
                None, measure_pass_profile, span, 24, PROFILE_SPREAD_S, timer
            )
        except Exception:
            log.exception("could not load [%d, %d); staying on [%d, %d)", start, end, cfg.start, cfg.end)
            servicer.draining = False
            self.moving_to = None
            await self.announcer.announce_now()
            return
        # no session is live, so no pass runs and no cache refers to the old span
        servicer.span = self.scheduler.span = span
        servicer.table.drop_idle()
        budget = cache_budget_tokens(span, cfg.cache_tokens, cfg.cache_bytes)
        servicer.cache_tokens = servicer.table.budget = budget
        self._start_meter(profile, timer)
        cfg.start, cfg.end = start, end
        servicer.moves += 1
        servicer.draining = False
        self.moving_to = None
        await self.announcer.announce_now()
        log.info("now serving blocks [%d, %d)", start, end)

    async def stop(self) -> None:
        """Graceful: refuse new sessions and announce `PeerState.DRAINING` in the DHT at once; flag every
        step result so gateways move live sessions elsewhere (they replay them on a replacement);
        wait until those sessions close or the drain timeout runs out; withdraw; exit."""
        if self._refining is not None:
            self._refining.cancel()
        if self._balancing is not None:
            self._balancing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._balancing
        if self.servicer is not None:
            self.servicer.draining = True
            self.servicer.table.drop_idle()
        if self.announcer is not None:
            try:
                await asyncio.wait_for(self.announcer.announce_now(), WITHDRAW_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the DHT may be gone; draining goes on
                log.warning("could not announce draining: %s", exc)
        if self.servicer is not None and self.servicer.sessions:
            log.info(
                "draining %d live session(s) for up to %.0f s",
                len(self.servicer.sessions),
                self.config.drain_timeout,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.servicer.all_closed.wait(), self.config.drain_timeout)
        if self.announcer is not None:
            # Best effort and bounded: with parts of the swarm gone, a withdraw waits on dead
            # nodes; the record's own expiry removes it anyway.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.announcer.stop(withdraw=True), WITHDRAW_TIMEOUT_S)
        log.info("withdrawn and drained; stopping the gRPC server")
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.servicer is not None:
            await self.servicer.forwarder.close()
        if self.dht is not None:
            self.dht.stop()
        if self.metrics is not None:
            self.metrics.close()
        log.info("peer stopped")


async def run_peer(config: PeerConfig) -> None:
    """Process entry point: serve until SIGTERM or SIGINT, then stop gracefully."""
    server = PeerServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"PEER_READY {server.address}", flush=True)  # launchers and tests wait for this line
    await stop.wait()
    log.info("stopping peer %s", config.peer_id)
    await server.stop()

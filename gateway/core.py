"""`Gateway`: everything a request needs, held by one object that the app's lifespan creates.

It holds the served models, the swarm view (`SwarmView`), the session pins (memory or Redis), the
failure policy and the gRPC channels, and makes the decisions that need several of them: which
model a request names, which route a conversation takes (its pin while every peer of it lives,
else a new plan), and running choices on a route. The swarm view and the session store are
dependencies: `swarm serve` builds them from the settings (a DHT node, Redis), tests hand in
fakes, so handlers run in process without a DHT.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated

from fastapi import Depends, Request

from common.grpc_security import ClientSecurity, listen_warning, security_summary
from common.identity import Identity
from common.peer_client import ChannelPool, PeerError, peer_info
from discovery.records import PeerRecord, PeerState
from gateway import errors
from gateway.failure_policy import FailurePolicy
from gateway.generation import RouteRunner
from gateway.keys import FileKeyStore, KeyStore, RedisKeyStore
from gateway.metrics import record_route_failure
from gateway.models import ServedModel, load_model
from gateway.precision import accepts, split_model_id
from gateway.prompt_work import PromptWork
from gateway.routing import NoRouteError, Route
from gateway.rtt import RttTracker
from gateway.serving.choices import ChoiceSpec, Piece, merge_choices, run_choice
from gateway.sessions import MemorySessionStore, Pin, RedisSessionStore, SessionStore
from gateway.settings import GatewaySettings
from gateway.swarm_view import SwarmView
from gateway.verification import Verifier

log = logging.getLogger("gateway")

READMIT_INTERVAL_S = 1.0  # how often banned peers on probation are probed
PROBE_TIMEOUT_S = 0.5


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        swarm: SwarmView | None = None,
        sessions: SessionStore | None = None,
    ):
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.dht = None  # our own DHT node, when the swarm view was built here
        self.identity = (
            Identity.load_or_create(settings.identity_file) if settings.identity_file else Identity.generate()
        )
        self.pool = ChannelPool(
            ClientSecurity(
                swarm_key=settings.swarm_key, public_key=self.identity.public_key, tls=settings.tls
            )
        )
        self.swarm = swarm
        self.sessions = sessions
        self.keys: KeyStore | None = None  # API keys with limits and usage (None: no key store)
        self.policy = FailurePolicy(
            replace_timeout=settings.failover_timeout, probe=self._answers, conviction_ban=settings.verify_ban
        )
        self.verifier = Verifier(settings.verify_fraction)
        self.prompt_work = PromptWork()
        self._readmission: asyncio.Task | None = None
        self._refresher: asyncio.Task | None = None  # keeps the swarm view fresh (SwarmView.keep_fresh)
        self.rtt: RttTracker | None = None
        self._pinger: asyncio.Task | None = None  # measures round trips to the peers (gateway.rtt)
        self._session_secret = (settings.session_secret or os.urandom(32).hex()).encode()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for model_id, location in self.settings.models.items():
            self.models[model_id] = await loop.run_in_executor(None, load_model, model_id, location)
        if self.swarm is None:
            from discovery.dht import SwarmDHT

            self.dht = SwarmDHT(identity=self.identity, swarm_key=self.settings.swarm_key)
            local = all(host in ("127.0.0.1", "localhost") for host, _ in self.settings.dht_bootstrap)
            host = "127.0.0.1" if local else "0.0.0.0"
            await self.dht.start(host, self.settings.dht_port, self.settings.dht_bootstrap)
            self.swarm = SwarmView(self.dht)
            self.swarm.push = not self.settings.relay
            self._refresher = loop.create_task(self.swarm.keep_fresh(list(self.models)))
            self.rtt = RttTracker(self.pool)
            self.swarm.rtt = self.rtt.rtt  # the planner charges each hop its measured round trip
            self._pinger = loop.create_task(self.rtt.run(self.swarm.addresses))
            settings = self.settings
            scheme = "https" if settings.https_cert else "http"
            log.info(
                "gateway %s on %s://%s:%d, DHT node on %s; %s%s",
                self.identity.peer_id, scheme, settings.host, settings.port, self.dht.address,
                security_summary(settings.swarm_key, settings.tls),
                listen_warning(settings.host) or listen_warning(host),
            )  # fmt: skip
        if self.sessions is None:
            if self.settings.redis_url:
                self.sessions = RedisSessionStore(self.settings.redis_url, ttl=self.settings.session_ttl)
            else:
                self.sessions = MemorySessionStore(ttl=self.settings.session_ttl)
        if self.settings.redis_keys:
            if not self.settings.redis_url:
                raise ValueError("--redis-keys needs --redis-url")
            self.keys = RedisKeyStore(self.settings.redis_url)
        elif self.settings.keys_file:
            self.keys = FileKeyStore(self.settings.keys_file)
        self._readmission = asyncio.get_running_loop().create_task(self._readmit_forever())

    async def stop(self) -> None:
        for task in (self._readmission, self._refresher, self._pinger):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.prompt_work.close()
        if self.sessions is not None:
            await self.sessions.close()
        if self.keys is not None:
            await self.keys.close()
        await self.pool.close()
        if self.dht is not None:
            self.dht.stop()

    async def _answers(self, address: str) -> bool:
        """The health probe that readmits a banned peer: `Info` answers, and the peer is online."""
        try:
            info = await peer_info(self.pool, address, timeout=PROBE_TIMEOUT_S)
        except PeerError:
            return False
        return info.state == PeerState.ONLINE

    async def _readmit_forever(self) -> None:
        while True:
            await asyncio.sleep(READMIT_INTERVAL_S)
            try:
                await self.policy.readmit()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("readmitting banned peers failed")

    # -- models --------------------------------------------------------------------------------
    def model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise errors.invalid_request("you must provide a model parameter", param="model")
        served = self.models.get(name)
        if served is None:
            raise errors.model_not_found(name)
        return served

    def model_and_precision(self, name: str | None) -> tuple[ServedModel, str | None]:
        """``model`` of a request, with an optional ``:<precision>`` suffix (gateway/precision.py)."""
        if name is None:
            return self.model(name), None
        base, precision = split_model_id(name, self.models)
        return self.model(base), precision

    # -- routes and pins -----------------------------------------------------------------------
    async def pinned(self, served: ServedModel, key: str | None, precision: str | None = None) -> Pin | None:
        """This conversation's pin while every peer of its route lives (and has the precision asked for)."""
        if not key:
            return None
        pin = await self.sessions.get(key)
        if pin is None or pin.model != served.id:
            return None
        if self._serves(pin, await self.swarm.peers(served.id), precision):
            return pin
        # The snapshot may just be old (no background refresh, or it stalled): after a pause
        # longer than the records' ttl every record in it has expired. Ask the DHT before giving
        # up the peers' caches, unless the snapshot is recent: then a lookup would only wait.
        if self.swarm.recent(served.id):
            return None
        if self._serves(pin, await self.swarm.peers(served.id, fresh=True), precision):
            return pin
        return None

    def _serves(self, pin: Pin, records: list[PeerRecord], precision: str | None) -> bool:
        """Every peer of the pin's route is live in `records` (and has the precision asked for)."""
        accept = accepts(precision)
        by_id = {record.peer_id: record for record in records}
        fits = accept is None or all(hop.peer_id in by_id and accept(by_id[hop.peer_id]) for hop in pin.route)
        return fits and self.swarm.is_live(pin.route, records, self.policy.excluded())

    async def route_for(
        self, served: ServedModel, key: str | None, max_length: int, precision: str | None = None
    ) -> Route:
        """The pinned route of this conversation while all its peers live, else a new one."""
        pin = await self.pinned(served, key, precision)
        if pin is not None:
            return pin.route
        return await self.plan(served, max_length, precision)

    async def plan(self, served: ServedModel, max_length: int, precision: str | None = None) -> Route:
        """A new route with room for `max_length` tokens, or a 503."""

        async def attempt() -> Route:
            return await self.swarm.plan(
                served.id,
                served.num_blocks,
                exclude=self.policy.excluded(),
                min_free_tokens=max_length,
                accept=accepts(precision),
            )

        try:
            try:
                return await attempt()
            except NoRouteError:
                # Never leave a model uncovered while a banned peer that answers could serve it.
                if not await self.policy.readmit(everyone=True):
                    raise
                return await attempt()
        except NoRouteError as exc:
            record_route_failure(served.id)
            where = f" of precision {precision}" if precision else ""
            raise errors.unavailable(f"{exc}{where}; retry when peers join", retry_after=5) from exc

    async def pin(
        self,
        key: str | None,
        served: ServedModel,
        route: Route,
        tokens: list[int] | None = None,
        session_nonce: str = "",
    ) -> None:
        if key:
            await self.sessions.put(
                key, Pin(model=served.id, route=route, tokens=tokens or [], session_nonce=session_nonce)
            )

    def peer_session_id(self, nonce: str, scope: str | None = None) -> str:
        """The session id the peers keep a conversation's caches under: a capability (whoever
        holds it can resume and truncate those caches), so it is derived from the pin's nonce with
        this gateway's secret and never stored or logged. The caller's scope (`auth.pin_scope`)
        goes in too: a nonce that reached another key would still not open these caches."""
        message = f"{scope}\0{nonce}" if scope else nonce
        return hmac.new(self._session_secret, message.encode(), hashlib.sha256).hexdigest()[:32]

    # -- choices -------------------------------------------------------------------------------
    def run_choices(
        self, served: ServedModel, specs: list[ChoiceSpec], route: Route, request_id: str
    ) -> AsyncIterator[Piece]:
        """Run every choice on `route` (each on its own sessions), their pieces interleaved."""
        return merge_choices([self._run_choice(served, spec, route, request_id) for spec in specs])

    async def _run_choice(
        self, served: ServedModel, spec: ChoiceSpec, route: Route, request_id: str
    ) -> AsyncIterator[Piece]:
        failover = self.policy.bind(self.swarm, served.id, served.num_blocks)
        runner = RouteRunner(
            self.pool,
            route,
            self.settings.step_timeout,
            failover=failover,
            wire_dtype=self.settings.wire_dtype,
            verifier=self.verifier,
            answer_shape=(served.hidden_size, served.vocab_size),
            push=not self.settings.relay,
            decode_loop=self.settings.decode_loop,
        )
        try:
            async with aclosing(run_choice(spec, runner, served, request_id)) as pieces:
                async for piece in pieces:
                    yield piece
        except (PeerError, NoRouteError) as exc:  # what failover could not absorb
            raise self.policy.client_error(exc) from exc


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]

"""The FastAPI app: OpenAI-compatible routes in front of the swarm.

The app is stateless apart from caches: the route of a conversation lives in the session store
(Redis when configured), so any replica can serve any request. Everything the routes need is held
by one `Gateway` object (`gateway.core`) created in the lifespan and reached through a dependency;
there are no module globals. `create_app` takes the swarm view and the session store as optional
dependencies, so tests can run the handlers in process with fakes of those two.

Middleware, outermost first: telemetry (request id, access log, `/metrics`: every answer is
counted, 401, 413 and 429 included), the operator pages' key check (`gateway.auth`), admission
(429 past `--max-concurrent`), the body guard (413),
the catch-all that turns any escaped exception into the OpenAI 500 object, then the routes.
"""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.version import VERSION
from gateway import errors
from gateway.admission import AdmissionGuard, BodyGuard
from gateway.auth import OpsGuard
from gateway.core import Gateway
from gateway.metrics import install_telemetry
from gateway.routes import health, openai_routers
from gateway.sessions import SessionStore
from gateway.settings import GatewaySettings
from gateway.swarm_map import install_swarm_map
from gateway.swarm_view import SwarmView


def create_app(
    settings: GatewaySettings, *, swarm: SwarmView | None = None, sessions: SessionStore | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gateway = Gateway(settings, swarm=swarm, sessions=sessions)
        await gateway.start()
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.stop()

    # strict_content_type off: `curl -d '{...}'` without a JSON content type must work too
    app = FastAPI(title="swarm gateway", version=VERSION, lifespan=lifespan, strict_content_type=False)
    errors.install_error_handlers(app)  # innermost: the catch-all sits right outside the routes
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionGuard, max_concurrent=settings.max_concurrent)
    guarded = bool(settings.api_key or settings.keys_file or settings.redis_keys) and not settings.open_ops
    app.add_middleware(OpsGuard, api_key=settings.api_key, guarded=guarded)
    install_telemetry(app)  # outermost: request ids, access logs, /metrics
    install_swarm_map(app)  # /swarm and /swarm/api
    for router in openai_routers:
        app.include_router(router, prefix="/v1")
        app.include_router(router, include_in_schema=False)  # clients that omit /v1
    app.include_router(health.router)
    return app


def run_gateway(settings: GatewaySettings) -> None:
    import uvicorn

    app = create_app(settings)
    # log_config=None: uvicorn's own lines go through our structured root handler too
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        lifespan="on",
        log_config=None,
        ssl_certfile=settings.https_cert,  # HTTPS when given (both or neither; the CLI checks)
        ssl_keyfile=settings.https_key,
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()

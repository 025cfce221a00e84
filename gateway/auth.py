"""Who may use the gateway: with `--api-key`, a bearer token on the API and on the operator's pages.

The operator's pages (`/metrics`, `/swarm`, `/swarm/api`, `/docs`, `/redoc`, `/openapi.json`) show
peer addresses, request ids and the API's shape, so they need the key too unless the operator opens
them (`--open-ops`). `/health` always answers: load balancers probe it without credentials.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from gateway import errors

OPS_PATHS = ("/metrics", "/swarm", "/docs", "/redoc", "/openapi.json")


def authorized(api_key: str | None, authorization: str | None) -> bool:
    if not api_key:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    # constant time: a timing side channel must not reveal the key byte by byte
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def check_auth(request: Request) -> None:
    """The API's dependency: 401 without the key."""
    settings = request.app.state.gateway.settings
    if not authorized(settings.api_key, request.headers.get("authorization")):
        raise errors.authentication_error()


def is_ops_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OPS_PATHS)


class OpsGuard:
    """Pure ASGI middleware: the operator's pages answer 401 without the key (see the module doc)."""

    def __init__(self, app, api_key: str | None, open_ops: bool = False):
        self.app = app
        self.api_key = None if open_ops else api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.api_key and is_ops_path(scope["path"]):
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if not authorized(self.api_key, authorization):
                await errors.error_response(errors.authentication_error())(scope, receive, send)
                return
        await self.app(scope, receive, send)

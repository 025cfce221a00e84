"""Who may use the gateway, and as whom.

Three kinds of caller (`Caller`):

* the admin: the bearer token given as `--api-key` (the one key of earlier versions, which keeps
  working): every route, no limits;
* a key from the key store (`--keys-file`, or `--redis-keys` for the store in `--redis-url`, see
  `gateway.keys`): the API routes, within the key's limits, models and credit (`gateway.metering`);
* anyone, when neither is configured (a local swarm).

With an admin key or a key store, the operator's pages (`/metrics`, `/swarm`, `/swarm/api`, `/docs`,
`/redoc`, `/openapi.json`: peer addresses, request ids, the API's shape) answer only the admin key:
401 without a token, 403 with any other one, unless the operator opens them (`--open-ops`).
`/health` always answers: load balancers probe it without credentials.

Pins and the peers' session ids are scoped to the caller (`pin_scope`): one key cannot resume or
overwrite another's conversation.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from fastapi import Request

from gateway import errors
from gateway.keys import ApiKey

log = logging.getLogger("gateway.auth")

OPS_PATHS = ("/metrics", "/swarm", "/docs", "/redoc", "/openapi.json")


def authorized(api_key: str | None, authorization: str | None) -> bool:
    if not api_key:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    # constant time: a timing side channel must not reveal the key byte by byte
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Caller:
    kind: str  # "admin", "key" (from the store) or "open" (no auth configured)
    key: ApiKey | None = None
    authorization: str | None = None  # the header as sent, for an open gateway's pin scope


OPEN = Caller("open")


def masked(token: str) -> str:
    return f"{token[:8]}***{token[-4:]}" if len(token) > 16 else "***"


async def authenticate(gw, authorization: str | None) -> Caller:
    """The caller behind an `Authorization` header, or the OpenAI 401 (503 when the key store
    cannot be read)."""
    settings = gw.settings
    token = bearer_token(authorization)
    if settings.api_key and authorized(settings.api_key, authorization):
        return Caller("admin", authorization=authorization)
    if gw.keys is None:
        if settings.api_key:
            raise errors.authentication_error()
        return Caller("open", authorization=authorization)
    if token is None:
        raise errors.authentication_error(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code=None,
        )
    try:
        key = await gw.keys.find(token)
    except Exception as exc:  # noqa: BLE001 - Redis down, an unreadable file: not the client's fault
        log.warning("the key store cannot be read: %s", exc)
        raise errors.unavailable("the API key store is unavailable; retry shortly", retry_after=2) from exc
    if key is None:
        raise errors.authentication_error(f"Incorrect API key provided: {masked(token)}.")
    state = key.state()
    if state != "active":
        raise errors.authentication_error(f"This API key has been {state}.", code=f"{state}_api_key")
    return Caller("key", key=key, authorization=authorization)


async def check_auth(request: Request) -> None:
    """The API's dependency: who calls (`request.state.caller`), or 401."""
    request.state.caller = await authenticate(request.app.state.gateway, request.headers.get("authorization"))


def caller_of(request: Request) -> Caller:
    return getattr(request.state, "caller", OPEN)


def pin_scope(request: Request) -> str | None:
    """What a caller's pins are scoped by: its key's id, else its token as sent."""
    caller = caller_of(request)
    return f"key:{caller.key.id}" if caller.key is not None else caller.authorization


def check_model(request: Request, model: str) -> None:
    """A key that may not use `model` gets OpenAI's 404 for a model one has no access to."""
    key = caller_of(request).key
    if key is not None and not key.may_use(model):
        raise errors.OpenAIError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


def is_ops_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OPS_PATHS)


class OpsGuard:
    """Pure ASGI middleware: the operator's pages answer only the admin key (see the module doc).

    `guarded`: an admin key or a key store is configured and `--open-ops` is not given. Guarded
    without an admin key, the pages answer nobody (403)."""

    def __init__(self, app, api_key: str | None, guarded: bool):
        self.app = app
        self.api_key = api_key
        self.guarded = guarded

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.guarded and is_ops_path(scope["path"]):
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if not (self.api_key and authorized(self.api_key, authorization)):
                if bearer_token(authorization) is None:
                    error = errors.authentication_error("The operator pages need the admin key.", code=None)
                else:
                    error = errors.permission_error("The operator pages need the admin key (--api-key).")
                await errors.error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

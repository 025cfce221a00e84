"""The OpenAI error object and the FastAPI handlers that produce it.

Every non-2xx response of the gateway has the body
``{"error": {"message", "type", "param", "code"}}``: the openai SDK and the editor plugins
parse it, and a FastAPI default (``{"detail": ...}``) or an HTML page would surface to the
user as an opaque failure. The ``type`` follows the HTTP status (see ``_TYPE_BY_STATUS``).

Raise :class:`OpenAIError` (or use a factory: :func:`invalid_request`,
:func:`model_not_found`, :func:`unavailable`...) anywhere in a request handler;
:func:`install_error_handlers` turns it into the response. Inside a stream, after the
headers are sent, the status cannot change any more: send :func:`sse_error_data` and then
``data: [DONE]`` instead, which the openai SDK raises as an ``APIError``.

Retry-After matters: the openai SDK retries 429 and 5xx twice by default and honours
``Retry-After``, so an overloaded swarm answering 503 with it gets a gentle retry instead
of an immediate hammering.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "OpenAIError",
    "invalid_request",
    "authentication_error",
    "permission_error",
    "not_found",
    "model_not_found",
    "payload_too_large",
    "context_length_exceeded",
    "rate_limited",
    "server_error",
    "unavailable",
    "to_openai_error",
    "error_payload",
    "error_response",
    "sse_error_data",
    "validation_error",
    "install_error_handlers",
]

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "unavailable_error",
    504: "timeout_error",
}

GENERIC_SERVER_ERROR = (
    "The server had an error while processing your request. Sorry about that! You can retry your request."
)


def _type_for(status_code: int) -> str:
    if status_code in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status_code]
    return "server_error" if status_code >= 500 else "invalid_request_error"


class OpenAIError(Exception):
    """An error to send to the client as an OpenAI error object.

    ``type`` defaults from the status (400 ``invalid_request_error``, 404
    ``not_found_error``, 503 ``unavailable_error``...). ``retry_after`` (seconds) becomes a
    ``Retry-After`` header; ``headers`` adds any other header.
    """

    def __init__(
        self,
        status_code: int,
        message: str | None = None,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        if message is None:
            try:
                message = HTTPStatus(status_code).phrase
            except ValueError:
                message = f"HTTP {status_code}"
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _type_for(status_code)
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})
        if retry_after is not None:
            # Retry-After takes whole seconds; round up so a client never retries early.
            seconds = max(0, math.ceil(retry_after))
            self.headers["Retry-After"] = str(seconds)

    def __repr__(self) -> str:
        return f"OpenAIError({self.status_code}, {self.message!r}, type={self.type!r})"

    def to_dict(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- factories -------------------------------------------------------------------------


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """400 ``invalid_request_error``: the request is well-formed JSON but unusable."""
    return OpenAIError(400, message, param=param, code=code)


def authentication_error(
    message: str = "Incorrect API key provided.", code: str | None = "invalid_api_key"
) -> OpenAIError:
    """401 ``authentication_error`` with ``WWW-Authenticate: Bearer`` as RFC 6750 asks."""
    return OpenAIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def permission_error(message: str = "You are not allowed to use this resource.") -> OpenAIError:
    """403 ``permission_error``: authenticated, but not allowed."""
    return OpenAIError(403, message)


def not_found(message: str, code: str | None = None) -> OpenAIError:
    """404 ``not_found_error`` for anything that is not a model."""
    return OpenAIError(404, message, code=code)


def model_not_found(model: str) -> OpenAIError:
    """404 with OpenAI's exact wording, so clients that match on it keep working."""
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def payload_too_large(message: str = "The request body is too large.") -> OpenAIError:
    """413: a body or prompt over the gateway's limits."""
    return OpenAIError(413, message, code="payload_too_large")


def context_length_exceeded(
    limit: int, prompt_tokens: int, max_tokens: int | None = None, param: str = "messages"
) -> OpenAIError:
    """400 ``context_length_exceeded`` in OpenAI's wording (clients look for the code)."""
    if max_tokens is None:
        detail = f"your request has {prompt_tokens} input tokens"
    else:
        detail = (
            f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
            f"messages, {max_tokens} in the completion)"
        )
    return OpenAIError(
        400,
        f"This model's maximum context length is {limit} tokens. However, {detail}. "
        "Please reduce the length of the messages or completion.",
        param=param,
        code="context_length_exceeded",
    )


def rate_limited(
    retry_after: float | None = None, message: str = "Rate limit reached. Please retry later."
) -> OpenAIError:
    """429 ``rate_limit_error`` with ``Retry-After``."""
    return OpenAIError(429, message, code="rate_limit_exceeded", retry_after=retry_after)


def server_error(message: str = GENERIC_SERVER_ERROR) -> OpenAIError:
    """500 ``server_error``. Never put internal details (tracebacks, peer addresses) in it."""
    return OpenAIError(500, message)


def unavailable(
    message: str = "The model is currently overloaded or unavailable. Please retry later.",
    retry_after: float | None = 1,
) -> OpenAIError:
    """503 ``unavailable_error`` with ``Retry-After``: no route, peers down, draining."""
    return OpenAIError(503, message, retry_after=retry_after)


# --- payloads ----------------------------------------------------------------------------


def to_openai_error(exc: BaseException) -> OpenAIError:
    """``exc`` itself when it is an OpenAIError, else a generic 500 that reveals nothing."""
    if isinstance(exc, OpenAIError):
        return exc
    return server_error()


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The error object for any exception (non-OpenAI ones become a generic 500)."""
    return to_openai_error(exc).to_dict()


def error_response(exc: BaseException) -> JSONResponse:
    """A JSONResponse carrying the error object, status and headers."""
    err = to_openai_error(exc)
    return JSONResponse(err.to_dict(), status_code=err.status_code, headers=err.headers)


def sse_error_data(exc: BaseException) -> str:
    """The JSON text of an in-stream error, for sse-starlette (which adds ``data:``)."""
    return json.dumps(error_payload(exc), ensure_ascii=False)


# --- validation errors --------------------------------------------------------------------

# Pydantic inserts the names of union members and validator wrappers into error locations
# ("messages.0.content.str", "tool_choice.literal['none','auto']"). They mean nothing to a
# client, so they are dropped from ``param``.
_TYPE_LOC_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def _is_type_tag(part: str) -> bool:
    return (
        part in _TYPE_LOC_NAMES
        or any(ch in part for ch in "[](),")
        or part[:1].isupper()  # a model class name
    )


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    kept = [str(p) for p in parts if isinstance(p, int) or not _is_type_tag(str(p))]
    return ".".join(kept) or None


def _clean_msg(msg: str) -> str:
    # Pydantic prefixes errors raised by our own validators; the prefix is noise.
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def validation_error(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """A 400 for pydantic / FastAPI validation errors; ``param`` names the first bad field.

    Malformed JSON and non-JSON bodies get a message that says so, rather than pydantic's
    "Input should be a valid dictionary".
    """
    if not errors:
        return invalid_request("Invalid request.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error")
        pos = first["loc"][1] if len(first.get("loc", ())) > 1 else None
        where = f" ({detail} at position {pos})" if detail and pos is not None else ""
        return invalid_request(
            "We could not parse the JSON body of your request"
            f"{where}. The API expects a JSON payload with Content-Type: application/json."
        )
    loc = tuple(first.get("loc", ()))
    if loc == ("body",) and first.get("type") == "missing":
        return invalid_request("The request body is missing; expected a JSON object.")
    if loc == ("body",) and (
        isinstance(first.get("input"), (bytes, str))
        or first.get("type") in ("model_attributes_type", "model_type", "dict_type")
    ):
        return invalid_request(
            "The request body must be a JSON object sent with Content-Type: application/json."
        )

    param = _param_from_loc(loc)
    # Union members each report the same field; keep one message per distinct param.
    seen: dict[str | None, str] = {}
    for err in errors:
        p = _param_from_loc(err.get("loc", ()))
        if p in seen:
            continue
        if err.get("type") == "missing" and p:
            seen[p] = f"Missing required parameter: '{p}'."
        else:
            msg = _clean_msg(str(err.get("msg", "invalid value")))
            seen[p] = f"Invalid value for '{p}': {msg}" if p else msg
    messages = list(seen.values())[:3]
    if len(seen) > 3:
        messages.append(f"(and {len(seen) - 3} more errors)")
    return invalid_request(" ".join(m if m.endswith(".") else m + "." for m in messages), param=param)


# --- handlers ------------------------------------------------------------------------------


async def _openai_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return error_response(validation_error(errors))


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        return error_response(exc)
    headers = dict(exc.headers or {})
    target = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and exc.detail in (None, "Not Found"):
        err = OpenAIError(404, f"Invalid URL ({target})", code="unknown_url", headers=headers)
    elif exc.status_code == 405:
        err = OpenAIError(405, f"Invalid method for URL ({target})", headers=headers)
    elif exc.status_code == 413:
        err = payload_too_large()
    else:
        detail = exc.detail if isinstance(exc.detail, str) else None
        err = OpenAIError(exc.status_code, detail, headers=headers)
    return error_response(err)


async def _unhandled_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(server_error())


class _CatchAllMiddleware:
    """Answers any exception that escapes the app with the generic 500 error object.

    Starlette's own catch-all (an ``Exception`` handler) sends the response but then
    re-raises, so uvicorn logs the traceback a second time and test clients raise. This
    middleware sits inside Starlette's ServerErrorMiddleware and stops the exception
    there, unless the response had already started (a failing stream): then nothing
    valid can be sent any more and the exception is re-raised for the server to close
    the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            logger.error(
                "unhandled error in %s %s",
                scope.get("method"),
                scope.get("path"),
                exc_info=exc,
            )
            await error_response(server_error())(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error response of ``app`` an OpenAI error object.

    Call once, right after creating the app (it adds a middleware, which Starlette only
    allows before the app starts). Covers: :class:`OpenAIError`; request validation (400,
    ``param`` = dotted field path, e.g. ``messages.0.role``); malformed JSON (400);
    unknown routes (404) and wrong methods (405) and other ``HTTPException``; anything
    else (500 with a generic message; the traceback goes to the log, never to the client).
    """
    app.add_exception_handler(OpenAIError, _openai_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unhandled_exception_handler)
    app.add_middleware(_CatchAllMiddleware)

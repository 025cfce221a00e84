"""Structured one-line logs, with the request id that follows a request through the swarm.

Every process (gateway, peer, DHT node) logs through stdlib `logging`; `configure_logging` installs
one handler whose formatter writes each record as ONE line, either ``key=value`` pairs (default,
easy to grep and read) or JSON (for log shippers). A traceback is folded into the same line, so a
line-oriented collector never splits an event.

The request id lives in a `ContextVar`: the gateway sets it when a request arrives (from an
``X-Request-Id`` header or a new one), sends it to every peer of the route as gRPC metadata
``x-request-id``, and each peer sets it again for the life of that session's stream. Any log line
written while serving the request, in any module, then carries ``request_id=...`` without passing
it around. asyncio tasks copy the context when they are created, so tasks spawned by the request
inherit it; threads do not (the peer's forward pass batches several requests anyway).

Prompts and completions are never logged unless the operator opts in (`--log-prompts`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# What we accept from a client as a request id: short and log-safe (no spaces, quotes or newlines
# that could forge a log line). Anything else is replaced by a fresh id.
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_BARE = re.compile(r"^[^\s\"=]+$")
# LogRecord attributes that are not user fields (anything else in record.__dict__ came from extra=)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: str | None) -> str | None:
    """`value` when it is safe to log and forward, else None."""
    return value if value and _VALID_ID.match(value) else None


def current_request_id() -> str | None:
    return request_id_var.get()


def set_request_id(value: str | None) -> str:
    """Bind a request id to the current context (a new one when `value` is missing or unsafe)."""
    request_id = valid_request_id(value) or new_request_id()
    request_id_var.set(request_id)
    return request_id


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """Fields passed with ``extra={...}``: everything on the record that logging did not put there."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and not key.startswith("_")
    }


def _kv_value(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.6g}"
    text = str(value)
    return text if text and _BARE.match(text) else json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=peer request_id=... msg="..." key=value ...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            ("ts", _timestamp(record.created)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
        ]
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            parts.append(("request_id", request_id))
        parts.append(("msg", record.getMessage()))
        parts.extend(_fields(record).items())
        if record.exc_info:
            parts.append(("exc", self.formatException(record.exc_info)))
        return " ".join(f"{key}={_kv_value(value)}" for key, value in parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, same fields as `KeyValueFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            data["request_id"] = request_id
        data["msg"] = record.getMessage()
        data.update(_fields(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


FORMATTERS = {"kv": KeyValueFormatter, "json": JsonFormatter}


def configure_logging(level: str = "INFO", fmt: str = "kv", stream=None) -> None:
    """Replace the root handlers with one structured handler (idempotent)."""
    if fmt not in FORMATTERS:
        raise ValueError(f"log format must be one of {sorted(FORMATTERS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(FORMATTERS[fmt]())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Quiet libraries whose INFO lines are noise at our INFO level.
    for name in ("kademlia", "rpcudp", "httpx", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))

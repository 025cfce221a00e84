"""Request fields the gateway does not implement are served around, and logged (as vLLM does)."""

from __future__ import annotations

import logging

from gateway import protocol

log = logging.getLogger("gateway")


def log_unknown_fields(req: protocol.RequestModel) -> None:
    unknown = req.unknown_fields()
    if unknown:
        log.info("ignoring unknown request fields: %s", ", ".join(unknown))

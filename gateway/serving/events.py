"""What every streamed response shares: its SSE framing and the way it ends."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from gateway import errors
from gateway.errors import OpenAIError
from gateway.routing import Route

log = logging.getLogger("gateway.serving")

ROUTE_HEADER = "x-swarm-route"  # peer ids of the route that served the request, for debugging


def route_headers(route: Route) -> dict[str, str]:
    return {ROUTE_HEADER: ",".join(hop.peer_id for hop in route)}


async def ending_cleanly(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events`, then `[DONE]`. An error once the stream has begun can no longer change the status
    code: it goes out as an error event (the OpenAI SDKs raise it), and the stream still ends."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - reported in the stream
        if not isinstance(exc, OpenAIError):
            log.exception("stream failed")
        yield errors.sse_error_data(exc)
    yield "[DONE]"


def event_stream(events: AsyncIterator[str], route: Route, meter=None) -> EventSourceResponse:
    """`events` as SSE; a key's `meter` (`gateway.metering.Meter`) adds its rate-limit headers and
    releases its reservation if the client leaves before the stream begins."""
    headers = {**route_headers(route), **(meter.headers if meter else {})}
    background = BackgroundTask(meter.release_if_never_started) if meter else None
    return EventSourceResponse(
        ending_cleanly(events), sep="\n", ping=15, headers=headers, background=background
    )

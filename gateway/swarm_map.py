"""The live swarm map: `GET /swarm` (a page) fed by `GET /swarm/api` (JSON).

The JSON is what the gateway knows of each served model right now: every peer record from the DHT
(its span and whether the peer chose it, a move in progress, dtype and quantization, throughput,
free cache, live sessions, state, the round trips it measured to its next hops), the gateway's
own round trip to it, checked against
the peer itself with a short `Info` call so a peer that died without a goodbye shows as
"unreachable" before its record expires; how many online peers cover each block; and the routes
in use (generations running now and the last few finished, from `gateway.metrics`).

`swarm status --gateway URL` prints the same JSON as a table, so the terminal and the page agree.

The page (gateway/static/swarm.html) is plain HTML and JavaScript with no build step and nothing
fetched from elsewhere: gateways often run on machines without internet access. Peer records are
network input, so the page inserts them as text, never as HTML.

No auth on these two routes, like `/health`: they show peer addresses and load, never prompts.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from common.peer_client import PeerError, peer_info

PAGE = Path(__file__).with_name("static") / "swarm.html"
PROBE_TIMEOUT_S = 0.5
PROBE_CACHE_S = 1.0  # several open pages share one probe per peer per second

router = APIRouter(include_in_schema=False)


class PeerProbe:
    """`Info` of each peer, cached briefly; a failed call means the peer is unreachable."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, Any]] = {}

    async def info(self, pool, address: str):
        now = time.monotonic()
        cached = self._cache.get(address)
        if cached and now - cached[0] < PROBE_CACHE_S:
            return cached[1]
        try:
            result = await peer_info(pool, address, timeout=PROBE_TIMEOUT_S)
        except (PeerError, OSError):
            result = None
        self._cache[address] = (now, result)
        if len(self._cache) > 4096:  # addresses of long-gone peers
            self._cache = {a: v for a, v in self._cache.items() if now - v[0] < 60}
        return result


def peer_view(
    record, info, banned: bool, now: float, convicted: str = "", rtt: float | None = None
) -> dict[str, Any]:
    """`convicted`: why the gateway rejected the peer's answers ("malformed", "disagreed"), or "".
    `rtt`: the gateway's measured round trip to the peer in seconds (gateway.rtt), None: not yet."""
    view = record.to_dict()
    view["rtt_ms"] = None if rtt is None else round(rtt * 1000, 2)
    # where the peer is moving to (peer.balancer), [start, end); None: not moving
    view["moving_to"] = list(record.moving_to) if record.moving_to else None
    view["convicted"] = convicted
    view["expires_in_s"] = round(max(0.0, record.expires_at - now), 1)
    view["banned"] = banned
    view["reachable"] = info is not None
    if info is not None:  # the peer's own numbers are fresher than its last announcement
        view["live_sessions"] = info.live_sessions
        view["free_cache_tokens"] = info.free_cache_tokens
        view["state"] = info.state or record.state
        # how the peer batches (peer.batching_config): packed weights, pipeline groups now, and why
        view["batching"] = {
            "prepacked": info.prepacked,
            "pipeline_groups": info.pipeline_groups or 1,
            "summary": info.batching,
        }
        # peer-to-peer traffic since the peer started: steps it pushed to a next hop, steps pushed
        # to it, and decode-loop steps it sent back to a route's first hop (peer.servicer)
        view["traffic"] = {
            "pushed_steps": info.pushed_steps,
            "pushes_received": info.pushes_received,
            "looped_steps": info.looped_steps,
        }
    if convicted:
        view["health"] = "convicted"
    elif banned:
        view["health"] = "banned"
    elif info is None:
        view["health"] = "unreachable"
    else:
        view["health"] = view["state"]
    return view


def coverage(records, num_blocks: int) -> list[int]:
    """How many online peers serve each block."""
    counts = [0] * num_blocks
    for record in records:
        if record.state == "online":
            for block in range(max(0, record.start), min(num_blocks, record.end)):
                counts[block] += 1
    return counts


async def swarm_snapshot(app: FastAPI) -> dict[str, Any]:
    gw = app.state.gateway
    probe: PeerProbe = app.state.swarm_probe
    activity = (
        app.state.metrics.activity.snapshot()
        if hasattr(app.state, "metrics")
        else {"active": [], "recent": []}
    )
    banned = gw.policy.excluded()
    convictions = gw.policy.bans.convictions()
    now = time.time()
    models = []
    for served in gw.models.values():
        records = sorted(await gw.swarm.peers(served.id), key=lambda r: (r.start, r.end, r.peer_id))
        infos = await asyncio.gather(*(probe.info(gw.pool, record.address) for record in records))
        peers = [
            peer_view(
                record,
                info if info is None or info.peer_id == record.peer_id else None,
                record.peer_id in banned,
                now,
                convictions.get(record.peer_id, ""),
                gw.swarm.rtt.get(record.address),
            )
            for record, info in zip(records, infos, strict=True)
        ]
        counts = coverage(records, served.num_blocks)
        models.append(
            {
                "id": served.id,
                "num_blocks": served.num_blocks,
                "coverage": counts,
                "covered": bool(counts) and min(counts) > 0,
                "peers": peers,
                "routes": {
                    kind: [r for r in items if r["model"] == served.id] for kind, items in activity.items()
                },
            }
        )
    return {
        "generated_at": now,
        "gateway": {
            "session_store": gw.sessions.backend,
            "session_store_available": gw.sessions.available,
            "dht_contacts": gw.dht.num_contacts if gw.dht else 0,
        },
        "models": models,
    }


@router.get("/swarm/api")
async def swarm_api(request: Request) -> JSONResponse:
    return JSONResponse(await swarm_snapshot(request.app), headers={"cache-control": "no-store"})


@router.get("/swarm")
async def swarm_page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"cache-control": "no-store"})


def install_swarm_map(app: FastAPI) -> None:
    app.state.swarm_probe = PeerProbe()
    app.include_router(router)

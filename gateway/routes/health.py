"""`GET /health`: liveness, the session store's state and failover counters (never needs a key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.core import GatewayDep

router = APIRouter()


@router.get("/health")
async def health(gw: GatewayDep) -> JSONResponse:
    return JSONResponse(
        {
            "status": "ok",
            "models": sorted(gw.models),
            "session_store": gw.sessions.backend,
            "session_store_available": gw.sessions.available,
            "session_store_errors": gw.sessions.errors,
            "failover": gw.policy.stats.to_dict(),
            "dht_contacts": gw.dht.num_contacts if gw.dht else 0,
        }
    )

"""`GET /v1/models`: the models whose every block a live peer serves right now."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway import protocol
from gateway.core import GatewayDep, check_auth
from gateway.precision import precisions
from gateway.routing import covered

router = APIRouter(dependencies=[Depends(check_auth)])


@router.get("/models", response_model=protocol.ModelList)
async def list_models(gw: GatewayDep) -> protocol.ModelList:
    cards = []
    for served in gw.models.values():
        records = await gw.swarm.peers(served.id)
        if covered(records, served.num_blocks):
            cards.append(
                protocol.ModelCard(
                    id=served.id,
                    created=served.created,
                    max_model_len=served.max_context,
                    precisions=precisions(records),
                )
            )
    return protocol.ModelList(data=cards)

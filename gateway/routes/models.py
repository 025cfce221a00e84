"""`GET /v1/models` (the models whose every block a live peer serves right now) and
`GET /v1/models/{id}` (one model this gateway serves, covered or not)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from gateway import errors, protocol
from gateway.auth import caller_of, check_auth
from gateway.core import Gateway, GatewayDep
from gateway.models import ServedModel
from gateway.precision import precisions
from gateway.routing import covered

router = APIRouter(dependencies=[Depends(check_auth)])


async def _card(gw: Gateway, served: ServedModel) -> tuple[protocol.ModelCard, bool]:
    records = await gw.swarm.peers(served.id)
    card = protocol.ModelCard(
        id=served.id, created=served.created, max_model_len=served.max_context, precisions=precisions(records)
    )
    return card, covered(records, served.num_blocks)


@router.get("/models", response_model=protocol.ModelList)
async def list_models(gw: GatewayDep, request: Request) -> protocol.ModelList:
    key = caller_of(request).key
    cards = [
        await _card(gw, served) for served in gw.models.values() if key is None or key.may_use(served.id)
    ]
    return protocol.ModelList(data=[card for card, servable in cards if servable])


@router.get("/models/{model_id:path}", response_model=protocol.ModelCard)
async def retrieve_model(model_id: str, gw: GatewayDep, request: Request) -> protocol.ModelCard:
    served = gw.models.get(model_id)
    key = caller_of(request).key
    if served is None or (key is not None and not key.may_use(served.id)):
        raise errors.model_not_found(model_id)
    card, _ = await _card(gw, served)
    return card

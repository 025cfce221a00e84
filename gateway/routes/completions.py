"""`POST /v1/completions`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from gateway import protocol
from gateway.auth import check_auth
from gateway.core import GatewayDep
from gateway.routes.unknown import log_unknown_fields
from gateway.serving.completion import serve_completion

router = APIRouter(dependencies=[Depends(check_auth)])


@router.post("/completions", response_model=protocol.CompletionResponse)
async def completions(req: protocol.CompletionRequest, request: Request, response: Response, gw: GatewayDep):
    log_unknown_fields(req)
    return await serve_completion(gw, req, request, response)

"""`POST /v1/chat/completions`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from gateway import protocol
from gateway.auth import check_auth
from gateway.core import GatewayDep
from gateway.routes.unknown import log_unknown_fields
from gateway.serving.chat import serve_chat

router = APIRouter(dependencies=[Depends(check_auth)])


@router.post("/chat/completions", response_model=protocol.ChatCompletionResponse)
async def chat_completions(
    req: protocol.ChatCompletionRequest, request: Request, response: Response, gw: GatewayDep
):
    log_unknown_fields(req)
    return await serve_chat(gw, req, request, response)

"""`GET /v1/usage`: a key's own usage, limits and credit (docs/users.md).

The shape follows OpenAI's usage API (`GET /v1/organization/usage/completions`): a page of time
buckets, each with one `organization.usage.completions.result` per model. The store keeps totals
since the key was created rather than per-day counters, so there is one bucket, from the key's
creation to now. A `key` object adds what OpenAI shows on its dashboard instead: the key's limits,
its credit left, its state. The admin key asks for any key with `?api_key_id=key_…`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from gateway import errors
from gateway.auth import caller_of, check_auth
from gateway.core import GatewayDep
from gateway.keys import usage_page

router = APIRouter(dependencies=[Depends(check_auth)])


@router.get("/usage")
async def usage(request: Request, gw: GatewayDep, api_key_id: str | None = None) -> JSONResponse:
    caller = caller_of(request)
    if gw.keys is None:
        raise errors.not_found("This gateway has no key store, so it keeps no usage per key.")
    if caller.key is not None:
        if api_key_id not in (None, caller.key.id):
            raise errors.permission_error("A key can only read its own usage.")
        key_id = caller.key.id
    elif api_key_id:
        key_id = api_key_id
    else:
        raise errors.invalid_request("The admin key must name a key: ?api_key_id=key_...", param="api_key_id")
    key = await gw.keys.get(key_id)
    if key is None:
        raise errors.not_found(f"No API key `{key_id}`.")
    return JSONResponse(usage_page(key, time.time()))

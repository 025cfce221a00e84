"""Thin route modules, one per API area: each validates (pydantic does) and hands the request to
its serving module (`gateway.serving`). `openai_routers` are mounted under `/v1` and bare."""

from gateway.routes import chat, completions, models, usage

openai_routers = (chat.router, completions.router, models.router, usage.router)

"""Schemathesis hooks for tests/test_openai_clients.py::test_schemathesis_finds_no_5xx.

Random bodies rarely name a served model, so half of them get the served one (then the request
reaches the swarm and the deeper checks: logit_bias ids, context length, suffix...). Any
generation length is clamped to a few tokens so that the fuzz run stays short; everything else
is left as generated.
"""

from __future__ import annotations

import os
import random

import schemathesis

MODEL = os.environ.get("SWARM_FUZZ_MODEL", "swarm-demo")
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    body = case.body
    if not isinstance(body, dict):
        return
    if random.random() < 0.5:
        body["model"] = MODEL
    for name in LENGTH_FIELDS:
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value > 4:
            body[name] = 4
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2

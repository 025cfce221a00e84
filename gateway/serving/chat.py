"""`POST /v1/chat/completions`: a validated request -> choices on the swarm -> a response or events.

Choice 0 carries the conversation: its peers keep their caches under one session id that the pin
records, and the next turn resumes them and sends only its new tokens (docs/ARCHITECTURE.md,
"Cache reuse across turns").
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request, Response

from common.logs import current_request_id
from gateway import errors, protocol, tools
from gateway.auth import check_model, pin_scope
from gateway.core import Gateway
from gateway.generation import GenerationParams
from gateway.metering import admit
from gateway.metrics import observe_generation
from gateway.models import ServedModel
from gateway.serving.choices import ChoiceOutcome, ChoiceSpec, Piece, collect, sampling_for_choice
from gateway.serving.events import event_stream, route_headers
from gateway.serving.logprobs import chat_logprobs
from gateway.sessions import SESSION_HEADER, conversation_key, next_turn_key, scoped_key
from gateway.text import encode_continuing, encode_prompt, render_chat


async def serve_chat(gw: Gateway, req: protocol.ChatCompletionRequest, request: Request, response: Response):
    served, precision = gw.model_and_precision(req.model)
    check_model(request, served.id)
    messages = req.template_messages()
    size = sum(len(message["content"]) for message in messages)
    served.check_fits(size, "messages")

    def render() -> str:
        return render_chat(
            served.tokenizer,
            messages,
            tools=req.template_tools(),
            chat_template_kwargs=req.chat_template_kwargs,
        )

    try:
        prompt = await gw.prompt_work.run(size, render)
    except ValueError as exc:
        raise errors.invalid_request(str(exc), param="messages") from exc
    scope = pin_scope(request)
    explicit_key = request.headers.get(SESSION_HEADER)
    key = scoped_key(scope, explicit_key or conversation_key(served.id, messages))
    pin = await gw.pinned(served, key, precision)
    # A conversation the route holds continues the exact ids the model produced (see
    # `encode_continuing`); a new one, or one whose pin expired, is tokenized from its text.
    if pin is not None and pin.tokens:
        prompt_ids = await gw.prompt_work.run(size, encode_continuing, served.tokenizer, prompt, pin.tokens)
    else:
        prompt_ids = await gw.prompt_work.run(size, encode_prompt, served.tokenizer, prompt)
    max_new = served.new_token_budget(prompt_ids, req.effective_max_tokens(), "max_tokens")
    top = req.top_logprobs or 0
    sampling = req.to_sampling_params(len(served.tokenizer), logprobs=req.logprobs, top_logprobs=top)
    plan = await asyncio.to_thread(tools.plan_output, req)  # a big schema compiles for milliseconds
    plan.tool_format = served.tool_format
    nonce = (pin.session_nonce if pin is not None else "") or uuid.uuid4().hex
    peer_session = gw.peer_session_id(nonce, scope)
    specs = [
        ChoiceSpec(
            index=i,
            generation=GenerationParams(
                prompt_ids=prompt_ids,
                max_new_tokens=max_new,
                sampling=sampling_for_choice(sampling, i),
                ignore_eos=req.ignore_eos,
                session_id=peer_session if i == 0 else "",
                resume=i == 0 and pin is not None,
            ),
            stops=req.stop_sequences(),
            grammar=plan.grammar,
        )
        for i in range(req.n)
    ]
    route = pin.route if pin is not None else await gw.plan(served, specs[0].max_length, precision)
    meter = await admit(
        gw, request, served.id, len(prompt_ids), sum(s.generation.max_new_tokens for s in specs)
    )
    request_id = current_request_id() or uuid.uuid4().hex
    pieces = gw.run_choices(served, specs, route, request_id)
    if meter is not None:
        pieces = meter.wrap(pieces, partial=req.stream)
    pieces = observe_generation(request, pieces, route, served.id, len(prompt_ids), prompt)

    async def remember(reply: str, outcome: ChoiceOutcome | None) -> None:
        """Pin the conversation as it continues after `reply`, on the route that served choice 0
        (a failover may have replaced hops: the replacements replayed it under the same session)."""
        await gw.pin(
            scoped_key(scope, explicit_key or next_turn_key(served.id, messages, reply)),
            served,
            outcome.route if outcome else route,
            tokens=outcome.held_tokens if outcome else [],
            session_nonce=nonce,
        )

    if req.stream:
        events = _chat_events(pieces, req, served, len(prompt_ids), remember, plan)
        return event_stream(events, route, meter)
    result = await collect(pieces, [""] * req.n)
    first = result.outcomes[0]
    response.headers.update(route_headers(first.route if first else route))
    if meter is not None:
        response.headers.update(meter.headers)
    await remember(result.texts[0], first)
    choices = []
    for i in range(req.n):
        content, calls = tool_output(plan, result.texts[i])
        if calls and plan.legacy:
            message = protocol.ChatMessage(content=content, function_call=calls[0].function)
        else:
            message = protocol.ChatMessage(content=content, tool_calls=calls or None)
        choices.append(
            protocol.ChatCompletionChoice(
                index=i,
                message=message,
                logprobs=chat_logprobs(served, result.tokens[i], top) if req.logprobs else None,
                finish_reason=_call_finish(plan) if calls else result.finishes[i],
            )
        )
    usage = protocol.Usage.of(len(prompt_ids), sum(len(t) for t in result.tokens))
    return protocol.ChatCompletionResponse(model=served.id, choices=choices, usage=usage)


def tool_output(plan: tools.OutputPlan, text: str) -> tuple[str | None, list[protocol.ToolCall]]:
    """A choice's ``(content, tool_calls)`` under `plan` (see `gateway.tools`). A forced call's
    text is never content: cut off by ``max_tokens``, the choice has neither."""
    if plan.mode == "tool_forced":
        return None, tools.forced_calls(text)
    if plan.mode == "tool_auto":
        return tools.auto_calls(text, plan.tool_names, plan.max_calls, plan.tool_format)
    return text, []


def _call_finish(plan: tools.OutputPlan) -> protocol.FinishReason:
    return "function_call" if plan.legacy else "tool_calls"


async def _chat_events(
    pieces: AsyncIterator[Piece],
    req: protocol.ChatCompletionRequest,
    served: ServedModel,
    prompt_tokens: int,
    remember,
    plan: tools.OutputPlan,
) -> AsyncIterator[str]:
    stream = protocol.ChatChunkStream(served.id)
    produced = 0
    first_text = ""
    first_outcome: ChoiceOutcome | None = None
    # With tools, a choice's text is held until it ends: only then is it known to be a call.
    held = [""] * req.n if plan.mode.startswith("tool") else None
    for i in range(req.n):
        yield stream.role(i)
    async with aclosing(pieces):
        async for piece in pieces:
            produced += len(piece.tokens)
            if piece.index == 0:
                first_text += piece.text
                first_outcome = piece.outcome or first_outcome
            if held is not None:
                held[piece.index] += piece.text
                if not piece.finish_reason:
                    continue
                content, calls = tool_output(plan, held[piece.index])
                if calls and plan.legacy:
                    call = calls[0].function
                    function = protocol.DeltaFunctionCall(name=call.name, arguments=call.arguments)
                    yield stream.delta(protocol.DeltaMessage(function_call=function), piece.index)
                    yield stream.finish("function_call", piece.index)
                    continue
                if calls:
                    deltas = [
                        protocol.DeltaToolCall(
                            index=k,
                            id=call.id,
                            type="function",
                            function=protocol.DeltaFunctionCall(
                                name=call.function.name, arguments=call.function.arguments
                            ),
                        )  # fmt: skip
                        for k, call in enumerate(calls)
                    ]
                    yield stream.delta(protocol.DeltaMessage(tool_calls=deltas), piece.index)
                    yield stream.finish("tool_calls", piece.index)
                    continue
                if content:
                    yield stream.content(content, piece.index)
                yield stream.finish(piece.finish_reason, piece.index)
                continue
            if piece.text or (req.logprobs and piece.tokens):
                logprobs = (
                    chat_logprobs(served, piece.tokens, req.top_logprobs or 0) if req.logprobs else None
                )
                yield stream.content(piece.text, piece.index, logprobs)
            if piece.finish_reason:
                yield stream.finish(piece.finish_reason, piece.index)
    await remember(first_text, first_outcome)
    if req.include_usage:
        yield stream.usage(protocol.Usage.of(prompt_tokens, produced))

"""`POST /v1/completions`: prompts (text, token ids, or fill-in-the-middle with `suffix`) ->
`n` choices per prompt on the swarm -> a response or events.

With `echo` + `logprobs` the last span scores the prompt's own tokens in the prefill (docs/
ARCHITECTURE.md, "Prompt logprobs"): those entries come first, and in a stream they go out with
the echoed prompt's chunk, once the prefill ran.
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
from gateway.serving.choices import ChoiceSpec, Piece, collect, sampling_for_choice
from gateway.serving.events import event_stream, route_headers
from gateway.serving.logprobs import completion_logprobs, prompt_logprobs
from gateway.sessions import SESSION_HEADER, scoped_key
from gateway.text import encode_prompt


def tokenize_prompts(req: protocol.CompletionRequest, served: ServedModel) -> list[tuple[str, list[int]]]:
    """Each prompt as (its text, its token ids)."""
    tokenizer = served.tokenizer
    prompts: list[tuple[str, list[int]]] = []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            if req.suffix is not None:
                if not served.has_fim:
                    raise errors.invalid_request(
                        f"model `{served.id}` has no fill-in-the-middle tokens, so `suffix` is not supported",
                        param="suffix",
                    )
                ids = tokenizer(served.fim_prompt(prompt, req.suffix), add_special_tokens=False)["input_ids"]
            else:
                ids = encode_prompt(tokenizer, prompt)
            text = prompt
        else:
            if any(token >= len(tokenizer) for token in prompt):
                raise errors.invalid_request("prompt token ids must be inside the vocabulary", param="prompt")
            ids, text = list(prompt), tokenizer.decode(prompt)
        if not ids:
            raise errors.invalid_request("the prompt is empty after tokenization", param="prompt")
        prompts.append((text, ids))
    return prompts


async def serve_completion(
    gw: Gateway, req: protocol.CompletionRequest, request: Request, response: Response
):
    served, precision = gw.model_and_precision(req.model)
    check_model(request, served.id)
    for prompt in req.prompts():
        if isinstance(prompt, str):
            served.check_fits(len(prompt), "prompt")
    size = sum(len(prompt) for prompt in req.prompts())
    prompts = await gw.prompt_work.run(size, tokenize_prompts, req, served)
    max_tokens = req.effective_max_tokens()
    if max_tokens == 0 and not req.echo:
        raise errors.invalid_request(
            "max_tokens must be at least 1 (0, to score a prompt without generating, needs echo: true)",
            param="max_tokens",
        )
    top = req.logprobs or 0
    # echo + logprobs: the prompt's tokens get entries too (the last span scores them in the prefill)
    scoring = top if req.echo and req.logprobs is not None else None
    sampling = req.to_sampling_params(
        len(served.tokenizer), logprobs=req.logprobs is not None, top_logprobs=top
    )
    # vLLM's structured outputs; compiling a big schema takes milliseconds: off the event loop
    grammar = await asyncio.to_thread(tools.structured_grammar, req)
    specs: list[ChoiceSpec] = []
    for p, (_, ids) in enumerate(prompts):
        max_new = served.new_token_budget(ids, max_tokens, "max_tokens")
        for i in range(req.n):
            specs.append(
                ChoiceSpec(
                    index=p * req.n + i,
                    generation=GenerationParams(
                        prompt_ids=ids,
                        max_new_tokens=max_new,
                        sampling=sampling_for_choice(sampling, i),
                        ignore_eos=req.ignore_eos,
                        prompt_logprobs=scoring,
                    ),
                    stops=req.stop_sequences(),
                    prompt_context=True,
                    grammar=grammar,
                )
            )
    key = request.headers.get(SESSION_HEADER)
    key = key and scoped_key(pin_scope(request), key)
    route = await gw.route_for(served, key, max(spec.max_length for spec in specs), precision)
    await gw.pin(key, served, route)
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    budget = sum(spec.generation.max_new_tokens for spec in specs)
    meter = await admit(gw, request, served.id, prompt_tokens, budget)
    request_id = current_request_id() or uuid.uuid4().hex
    pieces = gw.run_choices(served, specs, route, request_id)
    if meter is not None:
        pieces = meter.wrap(pieces, partial=req.stream)
    echoes = [prompts[spec.index // req.n][0] if req.echo else "" for spec in specs]
    pieces = observe_generation(
        request, pieces, route, served.id, prompt_tokens, "\n".join(p for p, _ in prompts)
    )
    if req.stream:
        events = _completion_events(
            pieces, req, served, echoes, prompt_tokens, [spec.prompt_ids for spec in specs]
        )
        return event_stream(events, route, meter)
    result = await collect(pieces, echoes)
    first = result.outcomes[0]
    response.headers.update(route_headers(first.route if first else route))
    if meter is not None:
        response.headers.update(meter.headers)
    choices = []
    for i, spec in enumerate(specs):
        logprobs = None
        if req.logprobs is not None:
            head = None
            if i in result.prompts:
                head = prompt_logprobs(served, spec.prompt_ids, result.prompts[i], top, echoes[i])
            logprobs = completion_logprobs(served, result.tokens[i], top, len(echoes[i]), head)
        choices.append(
            protocol.CompletionChoice(
                index=i, text=result.texts[i], logprobs=logprobs, finish_reason=result.finishes[i]
            )
        )
    usage = protocol.Usage.of(prompt_tokens, sum(len(t) for t in result.tokens))
    return protocol.CompletionResponse(model=served.id, choices=choices, usage=usage)


async def _completion_events(
    pieces: AsyncIterator[Piece],
    req: protocol.CompletionRequest,
    served: ServedModel,
    echoes: list[str],
    prompt_tokens: int,
    prompt_ids: list[list[int]],
) -> AsyncIterator[str]:
    stream = protocol.CompletionChunkStream(served.id)
    produced = 0
    offsets = [len(echo) for echo in echoes]
    scoring = req.echo and req.logprobs is not None
    for index, echo in enumerate(echoes):
        if echo and not scoring:  # else it goes with the prompt's entries, once the prefill ran
            yield stream.text(echo, index)
    async with aclosing(pieces):
        async for piece in pieces:
            if piece.prompt is not None:
                head = prompt_logprobs(
                    served, prompt_ids[piece.index], piece.prompt, req.logprobs, echoes[piece.index]
                )
                yield stream.text(echoes[piece.index], piece.index, logprobs=head)
                continue
            produced += len(piece.tokens)
            logprobs = None
            if req.logprobs is not None and piece.tokens:
                logprobs = completion_logprobs(served, piece.tokens, req.logprobs, offsets[piece.index])
            offsets[piece.index] += len(piece.text)
            if piece.text or logprobs or piece.finish_reason:
                yield stream.text(
                    piece.text, piece.index, logprobs=logprobs, finish_reason=piece.finish_reason
                )
    if req.include_usage:
        yield stream.usage(protocol.Usage.of(prompt_tokens, produced))

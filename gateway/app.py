"""The FastAPI app: OpenAI-compatible routes in front of the swarm.

The app is stateless apart from caches: the route of a conversation lives in the session store
(Redis when configured), so any replica can serve any request. Everything the routes need is held
by one `Gateway` object created in the lifespan and reached through a dependency; there are no
module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from gateway import errors, protocol, tools
from gateway.admission import AdmissionGuard
from gateway.constrained import Grammar, JsonConstraint
from gateway.errors import OpenAIError
from gateway.failover import FailoverPolicy, FailoverStats
from gateway.generation import (
    GenerationParams,
    NoRouteError,
    PromptLogprobs,
    RouteRunner,
    Swarm,
    TokenEvent,
    generate,
    read_ahead,
)
from gateway.metrics import install_telemetry, observe_generation, record_route_failure
from gateway.models import ServedModel, load_model
from gateway.precision import accepts, precisions, split_model_id
from gateway.routing import Route
from gateway.sessions import MemorySessionStore, Pin, RedisSessionStore, conversation_key, next_turn_key
from gateway.swarm_map import install_swarm_map
from gateway.text import IncrementalDetokenizer, StopMatcher, encode_continuing, encode_prompt, render_chat
from common.peer_client import ChannelPool, PeerError
from protos import swarm_pb2
from common.logs import current_request_id

log = logging.getLogger("gateway")

SESSION_HEADER = "x-session-id"
ROUTE_HEADER = "x-swarm-route"  # peer ids of the route that served the request, for debugging


@dataclass
class GatewaySettings:
    models: dict[str, str]  # model id -> folder (or hub id) holding its tokenizer and config
    dht_bootstrap: list[tuple[str, int]] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    dht_port: int = 0
    redis_url: str | None = None
    api_key: str | None = None
    step_timeout: float = 10.0
    failover_timeout: float = 5.0  # search for a replacement peer this long after a failure
    session_ttl: float = 3600.0
    wire_dtype: str = ""  # dtype hidden states travel in ("" = each sender's compute dtype)
    max_body_bytes: int = 4 << 20
    max_concurrent: int = 256  # generations in flight before new ones get 429 (0: no limit)
    log_prompts: bool = False  # log prompt and completion text (off: logs never hold user text)


class Gateway:
    """Everything a request needs: models, the swarm view, channels, session pins."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.dht = None
        self.pool = ChannelPool()
        self.swarm: Swarm | None = None
        self.sessions = None
        self.failover_stats = FailoverStats()

    async def start(self) -> None:
        from discovery.dht import SwarmDHT

        loop = asyncio.get_running_loop()
        for model_id, location in self.settings.models.items():
            self.models[model_id] = await loop.run_in_executor(None, load_model, model_id, location)
        self.dht = SwarmDHT()
        local = all(host in ("127.0.0.1", "localhost") for host, _ in self.settings.dht_bootstrap)
        await self.dht.start("127.0.0.1" if local else "0.0.0.0", self.settings.dht_port, self.settings.dht_bootstrap)
        self.swarm = Swarm(self.dht, self.pool)
        if self.settings.redis_url:
            self.sessions = RedisSessionStore(self.settings.redis_url, ttl=self.settings.session_ttl)
        else:
            self.sessions = MemorySessionStore(ttl=self.settings.session_ttl)

    async def stop(self) -> None:
        if self.sessions is not None:
            await self.sessions.close()
        await self.pool.close()
        if self.dht is not None:
            self.dht.stop()

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise errors.invalid_request("you must provide a model parameter", param="model")
        served = self.models.get(name)
        if served is None:
            raise errors.model_not_found(name)
        return served

    def model_and_precision(self, name: str | None) -> tuple[ServedModel, str | None]:
        """``model`` of a request, with an optional ``:<precision>`` suffix (gateway/precision.py)."""
        if name is None:
            return self.model(name), None
        base, precision = split_model_id(name, self.models)
        return self.model(base), precision

    async def pinned(self, served: ServedModel, key: str | None, precision: str | None = None) -> Pin | None:
        """This conversation's pin while every peer of its route lives (and has the precision asked for)."""
        if not key:
            return None
        pin = await self.sessions.get(key)
        if pin is None or pin.model != served.id:
            return None
        if self._serves(pin, await self.swarm.peers(served.id), precision):
            return pin
        # The snapshot may just be old: an idle gateway refreshes it only when requests come, so
        # after a pause longer than the records' ttl (a person typing the next turn) every record
        # in it has expired. Ask the DHT before giving up the peers' caches.
        if self._serves(pin, await self.swarm.peers(served.id, fresh=True), precision):
            return pin
        return None

    def _serves(self, pin: Pin, records: list, precision: str | None) -> bool:
        """Every peer of the pin's route is live in `records` (and has the precision asked for)."""
        accept = accepts(precision)
        by_id = {record.peer_id: record for record in records}
        fits = accept is None or all(hop.peer_id in by_id and accept(by_id[hop.peer_id]) for hop in pin.route)
        return fits and self.swarm.is_live(pin.route, records)

    async def route_for(
        self, served: ServedModel, key: str | None, max_length: int, precision: str | None = None
    ) -> Route:
        """The pinned route of this conversation while all its peers live, else a new one."""
        pin = await self.pinned(served, key, precision)
        if pin is not None:
            return pin.route
        accept = accepts(precision)
        try:
            return await self.swarm.plan(served.id, served.num_blocks, min_free_tokens=max_length, accept=accept)
        except NoRouteError as exc:
            record_route_failure(served.id)
            where = f" of precision {precision}" if precision else ""
            raise errors.unavailable(f"{exc}{where}; retry when peers join", retry_after=5) from exc

    async def pin(
        self,
        key: str | None,
        served: ServedModel,
        route: Route,
        tokens: list[int] | None = None,
        peer_session: str = "",
    ) -> None:
        if key:
            await self.sessions.put(
                key, Pin(model=served.id, route=route, tokens=tokens or [], peer_session=peer_session)
            )


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def check_auth(request: Request) -> None:
    api_key = request.app.state.gateway.settings.api_key
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or token.strip() != api_key:
        raise errors.authentication_error()


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


# -- one choice ---------------------------------------------------------------------------------
@dataclass
class Piece:
    """A part of one choice's output: new text, the tokens behind it, and maybe its end."""

    index: int
    text: str
    tokens: list[TokenEvent]
    finish_reason: str | None = None
    # echo with logprobs: what the model gave prompt tokens 1.. (`PromptLogprobs`), before any token
    prompt: list[TokenEvent] | None = None


@dataclass
class ChoiceJob:
    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: swarm_pb2.SamplingParams
    stops: list[str]
    ignore_eos: bool
    # Text completions decode with the prompt's last tokens as context, so a SentencePiece
    # leading space is kept ("The capital is" + "▁Paris" -> " Paris"); chat needs none.
    prompt_context: bool = False
    grammar: Grammar | None = None  # constrain the output (response_format, forced tool calls)
    # cache reuse: the peers' session id; resume what they kept of it; `held` receives the tokens
    # the route's caches hold when the choice ends (recorded in the pin for the next turn)
    session_id: str = ""
    resume: bool = False
    held: list[int] | None = None
    # the route that holds `held` when the choice ends: a failover mid-stream replaces hops
    route: Route | None = None
    # score the prompt with this many alternatives per token (completions' echo + logprobs)
    prompt_logprobs: int | None = None


def peer_failure(exc: PeerError, gw: Gateway) -> OpenAIError:
    """Map a peer's gRPC status to what the client should see."""
    import grpc

    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.unavailable("the swarm has no free cache for this request; retry shortly", retry_after=2)
    if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
        return errors.invalid_request(exc.message)
    for peer in gw.swarm.peers_at(exc.address):
        gw.swarm.bans.ban(peer)
    return errors.unavailable("a peer of the route failed; retry", retry_after=1)


async def run_choice(gw: Gateway, served: ServedModel, job: ChoiceJob, route: Route, request_id: str) -> AsyncIterator[Piece]:
    """Generate one choice and yield its text as it becomes final (detokenized, stops applied)."""
    detokenizer = IncrementalDetokenizer(served.tokenizer, job.prompt_ids if job.prompt_context else None)
    matcher = StopMatcher(job.stops)
    constraint = None
    if job.grammar is not None:
        constraint = JsonConstraint(job.grammar, served.token_table, served.eos_token_ids, job.max_new_tokens)
    params = GenerationParams(
        constraint=constraint,
        prompt_ids=job.prompt_ids,
        max_new_tokens=job.max_new_tokens,
        sampling=job.sampling,
        eos_token_ids=served.eos_token_ids,
        ignore_eos=job.ignore_eos,
        request_id=request_id,
        session_id=job.session_id,
        resume=job.resume,
        prompt_logprobs=job.prompt_logprobs,
    )
    policy = FailoverPolicy(gw.swarm, served.id, served.num_blocks, gw.settings.failover_timeout, gw.failover_stats)
    runner = RouteRunner(gw.pool, route, gw.settings.step_timeout, failover=policy, wire_dtype=gw.settings.wire_dtype)
    finish = "length"
    try:
        tokens = generate(runner, params, len(job.prompt_ids) + job.max_new_tokens)
        async with aclosing(read_ahead(tokens)) as events:
            async for event in events:
                if isinstance(event, PromptLogprobs):
                    yield Piece(job.index, "", [], prompt=event.tokens)
                    continue
                if event.token_id in served.eos_token_ids and (not job.ignore_eos or constraint is not None):
                    finish = "stop"
                    yield Piece(job.index, "", [event])  # counted in usage, shows no text
                    break
                text, stopped = matcher.feed(detokenizer.push(event.token_id))
                if stopped:
                    yield Piece(job.index, text, [event], "stop")
                    return
                yield Piece(job.index, text, [event])
    except PeerError as exc:
        raise peer_failure(exc, gw) from exc
    except NoRouteError as exc:  # a peer failed and no replacement came within the budget
        raise errors.unavailable(f"{exc}; retry when peers join", retry_after=5) from exc
    finally:
        if job.held is not None:
            job.held[:] = runner.tokens
            job.route = runner.route
    text, stopped = matcher.feed(detokenizer.flush())
    tail = text if stopped else text + matcher.flush()
    yield Piece(job.index, tail, [], "stop" if stopped else finish)


async def merge_choices(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Interleave the pieces of several choices as they come; cancel all if one fails."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for piece in only:
                yield piece
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Piece]) -> None:
        try:
            async with aclosing(stream) as pieces:
                async for piece in pieces:
                    await queue.put(piece)
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put(exc)
            return
        await queue.put(done)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- request -> jobs ----------------------------------------------------------------------------
def sampling_message(req: protocol.SamplingRequest, served: ServedModel, logprobs: bool, top: int) -> swarm_pb2.SamplingParams:
    vocab = len(served.tokenizer)
    bias = req.logit_bias_ids()
    for token in bias:
        if token >= vocab:
            raise errors.invalid_request(f"logit_bias token id {token} is outside the vocabulary", param="logit_bias")
    message = swarm_pb2.SamplingParams(
        # top_p == 0 keeps no token but the best: greedy (0 means "off" on the wire)
        temperature=0.0 if req.top_p == 0 else req.temperature,
        top_p=req.top_p,
        top_k=max(0, req.top_k or 0),
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logprobs=logprobs,
        top_logprobs=top,
    )
    message.logit_bias.update(bias)
    if req.seed is not None:
        message.seed = req.seed % (1 << 64)
    return message


def choice_sampling(base: swarm_pb2.SamplingParams, index: int) -> swarm_pb2.SamplingParams:
    """Choice i of n gets seed + i, so choices differ yet the request stays reproducible."""
    if index == 0 or not base.HasField("seed"):
        return base
    message = swarm_pb2.SamplingParams()
    message.CopyFrom(base)
    message.seed = (base.seed + index) % (1 << 64)
    return message


def budget(served: ServedModel, prompt_ids: list[int], requested: int | None, param: str) -> int:
    """New tokens this request may generate, or a 400 when the context cannot hold it (a prompt
    that fills the context is fine when nothing is to be generated: an echo that scores it)."""
    room = served.max_context - len(prompt_ids)
    if room < 0 or (room == 0 and requested != 0) or (requested is not None and requested > room):
        raise errors.context_length_exceeded(served.max_context, len(prompt_ids), requested, param=param)
    return room if requested is None else requested


def token_text(served: ServedModel, token_id: int) -> str:
    """One token as OpenAI's logprobs show it: its own text with its leading space; a token that
    holds part of a UTF-8 character shows its bytes backslash-escaped (`TokenPieces`)."""
    return served.pieces.text(token_id)


def chat_logprobs(served: ServedModel, tokens: list[TokenEvent], top: int) -> protocol.ChatCompletionLogprobs:
    content = []
    for event in tokens:
        text, raw = served.pieces(event.token_id)
        alternatives = []
        for tid, lp in event.top_logprobs[:top]:
            alt_text, alt_raw = served.pieces(tid)
            alternatives.append(protocol.TopLogprob(token=alt_text, logprob=lp, bytes=alt_raw))
        content.append(
            protocol.ChatCompletionTokenLogprob(
                token=text, logprob=event.logprob, bytes=raw, top_logprobs=alternatives
            )
        )
    return protocol.ChatCompletionLogprobs(content=content)


def completion_logprobs(
    served: ServedModel,
    tokens: list[TokenEvent],
    top: int,
    offset: int,
    head: protocol.CompletionLogprobs | None = None,
) -> protocol.CompletionLogprobs:
    """Entries of generated `tokens` whose text starts at `offset` of the choice's text, after
    `head` (the echoed prompt's entries, `prompt_logprobs`) when given."""
    result = head if head is not None else protocol.CompletionLogprobs()
    for event in tokens:
        text = token_text(served, event.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(event.logprob)
        result.top_logprobs.append({token_text(served, tid): lp for tid, lp in event.top_logprobs[:top]} if top else None)
        result.text_offset.append(offset)
        offset += len(text)
    return result


def prompt_logprobs(
    served: ServedModel, prompt_ids: list[int], scored: list[TokenEvent], top: int, echo: str
) -> protocol.CompletionLogprobs:
    """The echoed prompt's entries: its first token has no logprob and no top (nothing precedes
    it); `scored[i]` scores token i+1. A token's `text_offset` is where its text starts in `echo`
    (decoded incrementally, so a BOS or a leading SentencePiece space shifts nothing), never past it."""
    if [event.token_id for event in scored] != prompt_ids[1:]:
        raise errors.OpenAIError(502, "the swarm scored other tokens than the prompt's")
    result = protocol.CompletionLogprobs()
    detokenizer = IncrementalDetokenizer(served.tokenizer)
    position = 0
    for i, token_id in enumerate(prompt_ids):
        result.tokens.append(token_text(served, token_id))
        result.text_offset.append(min(position, len(echo)))
        position += len(detokenizer.push(token_id))
        if i == 0:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        event = scored[i - 1]
        result.token_logprobs.append(event.logprob)
        result.top_logprobs.append(
            {token_text(served, tid): lp for tid, lp in event.top_logprobs[:top]} if top else None
        )
    return result


# -- routes -------------------------------------------------------------------------------------
router = APIRouter(dependencies=[Depends(check_auth)])


@router.get("/models", response_model=protocol.ModelList)
async def list_models(gw: GatewayDep) -> protocol.ModelList:
    """Models whose every block is served by a live peer right now."""
    from gateway.routing import covered

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


@router.post("/chat/completions", response_model=protocol.ChatCompletionResponse)
async def chat_completions(req: protocol.ChatCompletionRequest, request: Request, response: Response, gw: GatewayDep):
    served, precision = gw.model_and_precision(req.model)
    _log_unknown(req)
    messages = req.template_messages()
    try:
        prompt = render_chat(
            served.tokenizer, messages, tools=req.template_tools(), chat_template_kwargs=req.chat_template_kwargs
        )
    except ValueError as exc:
        raise errors.invalid_request(str(exc), param="messages") from exc
    explicit_key = request.headers.get(SESSION_HEADER)
    key = explicit_key or conversation_key(served.id, messages)
    pin = await gw.pinned(served, key, precision)
    # A conversation the route holds continues the exact ids the model produced (see
    # `encode_continuing`); a new one, or one whose pin expired, is tokenized from its text.
    if pin is not None and pin.tokens:
        prompt_ids = encode_continuing(served.tokenizer, prompt, pin.tokens)
    else:
        prompt_ids = encode_prompt(served.tokenizer, prompt)
    max_new = budget(served, prompt_ids, req.effective_max_tokens(), "max_tokens")
    top = req.top_logprobs or 0
    base_sampling = sampling_message(req, served, req.logprobs, top)
    plan = tools.plan_output(req)
    route = pin.route if pin is not None else await gw.route_for(served, None, len(prompt_ids) + max_new, precision)
    request_id = current_request_id() or uuid.uuid4().hex
    jobs = [
        ChoiceJob(i, prompt_ids, max_new, choice_sampling(base_sampling, i), req.stop_sequences(), req.ignore_eos)
        for i in range(req.n)
    ]
    for job in jobs:
        job.grammar = plan.grammar
    # Choice 0 carries the conversation: its peers keep their caches under one session id that
    # the pin records, and the next turn resumes them and sends only its new tokens.
    peer_session = (pin.peer_session if pin is not None else "") or uuid.uuid4().hex
    jobs[0].session_id, jobs[0].resume, jobs[0].held = peer_session, pin is not None, []
    pieces = merge_choices([run_choice(gw, served, job, route, request_id) for job in jobs])
    pieces = observe_generation(request, pieces, route, served.id, len(prompt_ids), prompt)

    async def remember(reply: str) -> None:
        key = explicit_key or next_turn_key(served.id, messages, reply)
        # after a failover the conversation lives on the replacement peers (they replayed it
        # under the same peer session id): pin those, not the route the request began with
        await gw.pin(key, served, jobs[0].route or route, tokens=jobs[0].held, peer_session=peer_session)

    if req.stream:
        stream = protocol.ChatChunkStream(served.id)
        return EventSourceResponse(
            _chat_events(stream, pieces, req, served, len(prompt_ids), remember, plan),
            sep="\n",
            ping=15,
            headers=route_headers(route),
        )
    texts, tokens, finishes = await collect(pieces, [""] * req.n)
    # the route that served choice 0, which a failover may have changed since the request began
    response.headers.update(route_headers(jobs[0].route or route))
    await remember(texts[0])
    choices = []
    for i in range(req.n):
        content, calls = tool_output(plan, texts[i])
        choices.append(
            protocol.ChatCompletionChoice(
                index=i,
                message=protocol.ChatMessage(content=content, tool_calls=calls or None),
                logprobs=chat_logprobs(served, tokens[i], top) if req.logprobs else None,
                finish_reason="tool_calls" if calls else finishes[i],
            )
        )
    usage = protocol.Usage.of(len(prompt_ids), sum(len(t) for t in tokens))
    return protocol.ChatCompletionResponse(model=served.id, choices=choices, usage=usage)


async def collect(
    pieces: AsyncIterator[Piece], texts: list[str], prompts: dict[int, list[TokenEvent]] | None = None
) -> tuple[list[str], list[list[TokenEvent]], list[str | None]]:
    """Gather a non-streamed response: each choice's text (appended to `texts`, which holds any
    echoed prompt), its tokens and its finish reason; the prompt's scores (`Piece.prompt`) by
    choice into `prompts` when given."""
    tokens: list[list[TokenEvent]] = [[] for _ in texts]
    finishes: list[str | None] = [None] * len(texts)
    async with aclosing(pieces):
        async for piece in pieces:
            if piece.prompt is not None and prompts is not None:
                prompts[piece.index] = piece.prompt
            texts[piece.index] += piece.text
            tokens[piece.index].extend(piece.tokens)
            if piece.finish_reason:
                finishes[piece.index] = piece.finish_reason
    return texts, tokens, finishes


def tool_output(plan: tools.OutputPlan, text: str) -> tuple[str | None, list[protocol.ToolCall]]:
    """A choice's ``(content, tool_calls)`` under `plan` (see `gateway.tools`)."""
    if plan.mode == "tool_forced":
        calls = tools.forced_calls(text)
        return (None, calls) if calls else (text, [])
    if plan.mode == "tool_auto":
        return tools.auto_calls(text, plan.tool_names)
    return text, []


async def _chat_events(
    stream, pieces, req, served: ServedModel, prompt_tokens: int, remember, plan: tools.OutputPlan | None = None
) -> AsyncIterator[str]:
    produced = 0
    first_text = ""
    # With tools, a choice's text is held until it ends: only then is it known to be a call.
    held = [""] * req.n if plan is not None and plan.mode.startswith("tool") else None
    try:
        for i in range(req.n):
            yield stream.role(i)
        async with aclosing(pieces):
            async for piece in pieces:
                produced += len(piece.tokens)
                if piece.index == 0:
                    first_text += piece.text
                if held is not None:
                    held[piece.index] += piece.text
                    if not piece.finish_reason:
                        continue
                    content, calls = tool_output(plan, held[piece.index])
                    if calls:
                        deltas = [
                            protocol.DeltaToolCall(
                                index=k, id=call.id, type="function",
                                function=protocol.DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
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
                    logprobs = chat_logprobs(served, piece.tokens, req.top_logprobs or 0) if req.logprobs else None
                    yield stream.content(piece.text, piece.index, logprobs)
                if piece.finish_reason:
                    yield stream.finish(piece.finish_reason, piece.index)
        await remember(first_text)
        if req.include_usage:
            yield stream.usage(protocol.Usage.of(prompt_tokens, produced))
    except Exception as exc:  # noqa: BLE001 - reported in the stream, which must still end cleanly
        if not isinstance(exc, OpenAIError):
            log.exception("stream failed")
        yield errors.sse_error_data(exc)
    yield "[DONE]"


@router.post("/completions", response_model=protocol.CompletionResponse)
async def completions(req: protocol.CompletionRequest, request: Request, response: Response, gw: GatewayDep):
    served, precision = gw.model_and_precision(req.model)
    _log_unknown(req)
    tokenizer = served.tokenizer
    prompts: list[tuple[str, list[int]]] = []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            text = prompt
            if req.suffix is not None:
                if not served.has_fim:
                    raise errors.invalid_request(
                        f"model `{served.id}` has no fill-in-the-middle tokens, so `suffix` is not supported",
                        param="suffix",
                    )
                ids = tokenizer(served.fim_prompt(prompt, req.suffix), add_special_tokens=False)["input_ids"]
            else:
                ids = encode_prompt(tokenizer, text)
        else:
            if any(token >= len(tokenizer) for token in prompt):
                raise errors.invalid_request("prompt token ids must be inside the vocabulary", param="prompt")
            ids, prompt = list(prompt), tokenizer.decode(prompt)
        if not ids:
            raise errors.invalid_request("the prompt is empty after tokenization", param="prompt")
        prompts.append((prompt, ids))
    max_tokens = req.effective_max_tokens()
    if max_tokens == 0 and not req.echo:
        raise errors.invalid_request(
            "max_tokens must be at least 1 (0, to score a prompt without generating, needs echo: true)",
            param="max_tokens",
        )
    top = req.logprobs or 0
    # echo + logprobs: the prompt's tokens get entries too (the last span scores them in the prefill)
    scoring = top if req.echo and req.logprobs is not None else None
    base_sampling = sampling_message(req, served, req.logprobs is not None, top)
    request_id = current_request_id() or uuid.uuid4().hex
    jobs, budgets = [], []
    for p, (_, ids) in enumerate(prompts):
        max_new = budget(served, ids, max_tokens, "max_tokens")
        budgets.append(len(ids) + max_new)
        for i in range(req.n):
            sampling = choice_sampling(base_sampling, i)
            job = ChoiceJob(p * req.n + i, ids, max_new, sampling, req.stop_sequences(), req.ignore_eos)
            job.prompt_context = True
            job.prompt_logprobs = scoring
            jobs.append(job)
    key = request.headers.get(SESSION_HEADER)
    route = await gw.route_for(served, key, max(budgets), precision)
    await gw.pin(key, served, route)
    pieces = merge_choices([run_choice(gw, served, job, route, request_id) for job in jobs])
    echoes = [prompts[job.index // req.n][0] if req.echo else "" for job in jobs]
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    pieces = observe_generation(request, pieces, route, served.id, prompt_tokens, "\n".join(p for p, _ in prompts))
    if req.stream:
        stream = protocol.CompletionChunkStream(served.id)
        return EventSourceResponse(
            _completion_events(
                stream, pieces, req, served, echoes, prompt_tokens, [job.prompt_ids for job in jobs]
            ),
            sep="\n",
            ping=15,
            headers=route_headers(route),
        )
    scored: dict[int, list[TokenEvent]] = {}
    texts, tokens, finishes = await collect(pieces, list(echoes), scored)
    response.headers.update(route_headers(jobs[0].route or route))
    choices = []
    for i, job in enumerate(jobs):
        logprobs = None
        if req.logprobs is not None:
            head = None
            if i in scored:
                head = prompt_logprobs(served, job.prompt_ids, scored[i], top, echoes[i])
            logprobs = completion_logprobs(served, tokens[i], top, len(echoes[i]), head)
        choices.append(
            protocol.CompletionChoice(index=i, text=texts[i], logprobs=logprobs, finish_reason=finishes[i])
        )
    usage = protocol.Usage.of(prompt_tokens, sum(len(t) for t in tokens))
    return protocol.CompletionResponse(model=served.id, choices=choices, usage=usage)


async def _completion_events(
    stream,
    pieces,
    req,
    served: ServedModel,
    echoes: list[str],
    prompt_tokens: int,
    prompt_ids: list[list[int]],
):
    produced = 0
    offsets = [len(echo) for echo in echoes]
    scoring = req.echo and req.logprobs is not None
    try:
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
                    yield stream.text(piece.text, piece.index, logprobs=logprobs, finish_reason=piece.finish_reason)
        if req.include_usage:
            yield stream.usage(protocol.Usage.of(prompt_tokens, produced))
    except Exception as exc:  # noqa: BLE001 - reported in the stream, which must still end cleanly
        if not isinstance(exc, OpenAIError):
            log.exception("stream failed")
        yield errors.sse_error_data(exc)
    yield "[DONE]"


def route_headers(route: Route) -> dict[str, str]:
    return {ROUTE_HEADER: ",".join(hop.peer_id for hop in route)}


def _log_unknown(req: protocol.RequestModel) -> None:
    unknown = req.unknown_fields()
    if unknown:
        log.info("ignoring unknown request fields: %s", ", ".join(unknown))


health_router = APIRouter()


@health_router.get("/health")
async def health(gw: GatewayDep) -> JSONResponse:
    return JSONResponse(
        {
            "status": "ok",
            "models": sorted(gw.models),
            "session_store": gw.sessions.backend,
            "session_store_available": gw.sessions.available,
            "session_store_errors": getattr(gw.sessions, "errors", 0),
            "failover": gw.failover_stats.to_dict(),
            "dht_contacts": gw.dht.num_contacts if gw.dht else 0,
        }
    )


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gateway = Gateway(settings)
        await gateway.start()
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.stop()

    # strict_content_type off: `curl -d '{...}'` without a JSON content type must work too
    app = FastAPI(title="swarm gateway", version="0.1.0", lifespan=lifespan, strict_content_type=False)
    errors.install_error_handlers(app)
    install_telemetry(app)  # request ids, access logs, /metrics
    install_swarm_map(app)  # /swarm and /swarm/api

    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionGuard, max_concurrent=settings.max_concurrent)
    app.include_router(router, prefix="/v1")
    app.include_router(router, include_in_schema=False)  # clients that omit /v1
    app.include_router(health_router)
    return app


class BodyGuard:
    """Pure ASGI middleware (no per-chunk wrapping of streamed responses, unlike `@app.middleware`):

    * a body announced larger than `max_body_bytes` gets 413 before it is read;
    * `curl -d '{...}'` labels a JSON body `application/x-www-form-urlencoded`; no OpenAI route takes
      a form, so such a body on a `*completions` POST is read as the JSON it is (a body that is not
      JSON still gets a 400).
    """

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                await errors.error_response(errors.payload_too_large())(scope, receive, send)
                return
            form = headers.get(b"content-type", b"").startswith(b"application/x-www-form-urlencoded")
            if form and scope["method"] == "POST" and scope["path"].endswith("completions"):
                rest = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*rest, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def run_gateway(settings: GatewaySettings) -> None:
    import uvicorn

    app = create_app(settings)
    # log_config=None: uvicorn's own lines go through our structured root handler too
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()

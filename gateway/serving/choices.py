"""One choice, start to end: token ids from the swarm in, final text pieces out.

`run_choice` drives a `ChoiceSpec` through a route (`gateway.generation`), detokenizes
incrementally, applies stop sequences, and yields `Piece`s. The last piece of every choice has a
`finish_reason` and an `outcome`: the route that served it and the token ids that route's caches
now hold, which the conversation's pin records for the next turn. `merge_choices` interleaves the
pieces of several choices; `collect` gathers them for a non-streamed response.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from gateway import errors
from gateway.constrained import Constraint, Grammar, SchemaError
from gateway.generation import GenerationParams, PromptLogprobs, RouteRunner, TokenEvent, generate, read_ahead
from gateway.routing import Route
from gateway.text import IncrementalDetokenizer, StopMatcher
from protos import swarm_pb2


@dataclass(frozen=True)
class ChoiceSpec:
    """Everything one choice needs, fixed before it starts: the token-level generation
    (`gateway.generation.GenerationParams`: prompt ids, budget, sampling, session) and the text
    side around it."""

    index: int
    generation: GenerationParams
    stops: list[str]
    # Text completions decode with the prompt's last tokens as context, so a SentencePiece
    # leading space is kept ("The capital is" + "▁Paris" -> " Paris"); chat needs none.
    prompt_context: bool = False
    grammar: Grammar | None = None  # constrain the output (structured outputs, forced tool calls)

    @property
    def prompt_ids(self) -> list[int]:
        return self.generation.prompt_ids

    @property
    def max_length(self) -> int:
        """Tokens the route's caches may hold for this choice (what a route must have room for)."""
        return self.generation.max_length


def sampling_for_choice(base: swarm_pb2.SamplingParams, index: int) -> swarm_pb2.SamplingParams:
    """Choice i of n gets seed + i, so choices differ yet the request stays reproducible."""
    if index == 0 or not base.HasField("seed"):
        return base
    message = swarm_pb2.SamplingParams()
    message.CopyFrom(base)
    message.seed = (base.seed + index) % (1 << 64)
    return message


@dataclass(frozen=True)
class ChoiceOutcome:
    """What a finished choice leaves on the swarm: the route that served it (after any failover)
    and the token ids its caches hold."""

    route: Route
    held_tokens: list[int]


@dataclass
class Piece:
    """A part of one choice's output: new text, the tokens behind it, and maybe its end."""

    index: int
    text: str
    tokens: list[TokenEvent]
    finish_reason: str | None = None
    outcome: ChoiceOutcome | None = None  # on the last piece of a choice
    # echo with logprobs: what the model gave prompt tokens 1.. (`PromptLogprobs`), before any token
    prompt: list[TokenEvent] | None = None


async def run_choice(spec: ChoiceSpec, runner: RouteRunner, served, request_id: str) -> AsyncIterator[Piece]:
    """Generate one choice through `runner` and yield its text as it becomes final.

    A peer failure that failover could not absorb propagates as `PeerError` or `NoRouteError`
    (the caller turns it into what the client sees, `FailurePolicy.client_error`)."""
    detokenizer = IncrementalDetokenizer(served.tokenizer, spec.prompt_ids if spec.prompt_context else None)
    matcher = StopMatcher(spec.stops)
    constraint = None
    if spec.grammar is not None:
        # off the event loop: the first use of a model builds its vocabulary (~2 s for 128k tokens),
        # and a matcher compiles its grammar (~1 ms, more for big schemas); both release the GIL
        try:
            constraint = await asyncio.to_thread(_constraint, spec, served)
        except SchemaError as exc:
            raise errors.invalid_request(f"cannot constrain the output to this: {exc}") from exc
    params = dataclasses.replace(
        spec.generation, constraint=constraint, eos_token_ids=served.eos_token_ids, request_id=request_id
    )
    last: Piece | None = None  # the piece that ends the choice early (a stop sequence)
    finish = "length"
    async with aclosing(read_ahead(generate(runner, params))) as events:
        async for event in events:
            if isinstance(event, PromptLogprobs):
                yield Piece(spec.index, "", [], prompt=event.tokens)
                continue
            if event.finish_reason == "stop" and event.token_id in served.eos_token_ids:
                finish = "stop"  # an end-of-sequence token: counted, shows no text
                yield Piece(spec.index, "", [event])
                break
            text, stopped = matcher.feed(detokenizer.push(event.token_id))
            if stopped:
                last = Piece(spec.index, text, [event], "stop")
                break
            finish = event.finish_reason or finish  # "stop": a constrained output completed
            yield Piece(spec.index, text, [event])
    # The generator is closed: the runner's caches hold their final tokens (read_ahead may have
    # run a step or two past a stop sequence; the caches hold those too).
    outcome = ChoiceOutcome(runner.route, list(runner.tokens))
    if last is None:
        text, stopped = matcher.feed(detokenizer.flush())
        tail = text if stopped else text + matcher.flush()
        last = Piece(spec.index, tail, [], "stop" if stopped else finish)
    last.outcome = outcome
    yield last


def _constraint(spec: ChoiceSpec, served) -> Constraint:
    return Constraint(spec.grammar, served.constraint_vocab, spec.generation.max_new_tokens)


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


@dataclass
class Collected:
    """A non-streamed response's choices, by index."""

    texts: list[str]
    tokens: list[list[TokenEvent]]
    finishes: list[str | None]
    outcomes: list[ChoiceOutcome | None]
    prompts: dict[int, list[TokenEvent]] = field(default_factory=dict)  # the prompt's scores, if asked


async def collect(pieces: AsyncIterator[Piece], heads: list[str]) -> Collected:
    """Gather every choice's pieces; each choice's text starts with its entry of `heads` (an echoed
    prompt, or "")."""
    count = len(heads)
    result = Collected(list(heads), [[] for _ in range(count)], [None] * count, [None] * count)
    async with aclosing(pieces):
        async for piece in pieces:
            if piece.prompt is not None:
                result.prompts[piece.index] = piece.prompt
            result.texts[piece.index] += piece.text
            result.tokens[piece.index].extend(piece.tokens)
            if piece.finish_reason:
                result.finishes[piece.index] = piece.finish_reason
                result.outcomes[piece.index] = piece.outcome
    return result

"""Logprobs as OpenAI shows them: per-token entries for chat (`ChatCompletionLogprobs`) and for
text completions (`CompletionLogprobs`), including the echoed prompt's entries."""

from __future__ import annotations

from gateway import errors, protocol
from gateway.generation import TokenEvent
from gateway.models import ServedModel
from gateway.text import IncrementalDetokenizer


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
        result.top_logprobs.append(
            {token_text(served, tid): lp for tid, lp in event.top_logprobs[:top]} if top else None
        )
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

"""Text on both sides of the swarm: prompts in, generated text out.

* :func:`render_chat` turns OpenAI ``messages`` into the prompt string with the model's
  chat template, and :func:`encode_prompt` tokenizes it without doubling the BOS token;
  :func:`encode_continuing` tokenizes a conversation's next turn after the exact token ids
  the route already holds for it.
* :class:`IncrementalDetokenizer` turns sampled token ids back into text one token at a
  time, without ever splitting a UTF-8 character and with SentencePiece / byte-level
  spaces right, at O(1) cost per token.
* :class:`StopMatcher` finds stop sequences in the streamed text, across token
  boundaries, without ever emitting a stop sequence or anything after it.
* :class:`TokenPieces` gives the text and bytes of single tokens, for ``logprobs``.

Concurrency: the detokenizer and the matcher hold per-choice state; use one of each per
choice of a request, from one task. The functions are pure. Tokenizers are only read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

__all__ = [
    "ChatTemplateError",
    "RESERVED_TEMPLATE_KWARGS",
    "render_chat",
    "encode_prompt",
    "encode_continuing",
    "IncrementalDetokenizer",
    "StopMatcher",
    "TokenPieces",
]


class TokenizerLike(Protocol):
    """What this module needs of a Hugging Face tokenizer (``PreTrainedTokenizerBase``)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (bad roles, template error, reserved kwargs).

    A client error: the app answers it with a 400 ``invalid_request_error``.
    """


# ---------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------

#: Keys a client may not set through ``chat_template_kwargs``: they are arguments of
#: ``apply_chat_template`` itself, and would change what it returns or which template runs
#: (``chat_template`` would let a client run arbitrary Jinja).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tokenizer",
        "tools",
        "documents",
        "chat_template",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

_FALLBACK_ROLE_NAMES = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}


def _content_text(content: Any, where: str) -> str:
    """A message's content as one string: parts joined with newlines, null as empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(f"{where}.content.{i}: content part type '{kind}' is not supported")
        return "\n".join(texts)
    raise ChatTemplateError(f"{where}.content must be a string or a list of text parts")


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style messages as the plain dicts Hugging Face chat templates expect.

    * content parts are flattened to one string, null content becomes "" (templates
      concatenate ``message['content']`` and fail on None);
    * ``developer`` becomes ``system``: it is OpenAI's new name for the system role, and
      open-model templates reject roles they do not know;
    * tool-call ``arguments`` JSON strings become objects, as vLLM does, because templates
      such as Llama 3.1's render them with ``| tojson``.
    """
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ChatTemplateError(f"messages.{i} must be an object with a 'role'")
        msg = {k: v for k, v in message.items() if v is not None}
        msg["content"] = _content_text(message.get("content"), f"messages.{i}")
        if msg["role"] == "developer":
            msg["role"] = "system"
        if msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function") or {})
                args = function.get("arguments")
                if isinstance(args, str):
                    try:
                        parsed = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        parsed = None
                    if isinstance(parsed, dict):
                        function["arguments"] = parsed
                call["function"] = function
                calls.append(call)
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _render_fallback(
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    continue_final_message: bool,
) -> str:
    """The format used when the tokenizer has no chat template. One line per turn::

        System: Tools you may call (JSON): [...]
        System: You are helpful.
        User: Hi
        Assistant: Hello!
        User: How are you?
        Assistant:

    Plain role prefixes because a model without a template was not trained on any chat
    format, and this one is what base models continue most sensibly. Tool calls of
    earlier assistant turns are written as their JSON. No trailing space after the last
    "Assistant:", since BPE vocabularies attach the space to the next word.
    """
    lines: list[str] = []
    if tools:
        lines.append("System: Tools you may call (JSON): " + json.dumps(tools, ensure_ascii=False))
    for message in messages:
        role = _FALLBACK_ROLE_NAMES.get(message["role"], str(message["role"]).capitalize())
        text = message["content"]
        if message.get("tool_calls"):
            calls = json.dumps([c.get("function", c) for c in message["tool_calls"]], ensure_ascii=False)
            text = f"{text}\n{calls}" if text else calls
        lines.append(f"{role}: {text}" if text else f"{role}:")
    prompt = "\n".join(lines)
    if continue_final_message:
        return prompt
    if add_generation_prompt:
        return prompt + "\nAssistant:"
    return prompt + "\n"


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    /,
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render OpenAI-style ``messages`` to the prompt string the model expects.

    Uses ``tokenizer.chat_template`` through ``apply_chat_template(tokenize=False)`` when
    the tokenizer has one, else the plain format of :func:`_render_fallback`. Pass the
    client's ``chat_template_kwargs`` as that argument (not spread into ``**``) so a client
    key can never collide with this function's own arguments; both are checked against
    :data:`RESERVED_TEMPLATE_KWARGS` and then reach the template as variables
    (``continue_final_message`` is honoured by both paths).

    The result normally starts with the BOS token when the template adds one; tokenize it
    with :func:`encode_prompt`. Raises :class:`ChatTemplateError` (a ValueError) for
    anything the client can fix: unknown content parts, reserved kwargs, a template that
    raises (for instance "roles must alternate").
    """
    kwargs = dict(chat_template_kwargs or {})
    kwargs.update(template_kwargs)
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    if "add_generation_prompt" in kwargs:
        add_generation_prompt = bool(kwargs.pop("add_generation_prompt"))
    normalized = _normalize_messages(messages)
    continue_final = bool(kwargs.get("continue_final_message", False))
    if continue_final:
        if not normalized or normalized[-1]["role"] != "assistant":
            raise ChatTemplateError("continue_final_message needs a final assistant message")
        # transformers refuses both at once; continuing the last turn wins.
        add_generation_prompt = False

    if not getattr(tokenizer, "chat_template", None):
        return _render_fallback(
            normalized,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            continue_final_message=continue_final,
        )
    try:
        rendered = tokenizer.apply_chat_template(
            normalized,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
    except Exception as exc:  # jinja2 errors, raise_exception(), TypeError on bad data
        raise ChatTemplateError(f"the chat template could not render these messages: {exc}") from exc
    if not isinstance(rendered, str):
        raise ChatTemplateError("the chat template did not render to a string")
    return rendered


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text``, adding the tokenizer's special tokens unless it has its BOS.

    Chat templates write the BOS token into the text; encoding that with
    ``add_special_tokens=True`` would give two BOS tokens, which degrades Llama models.
    Plain completion prompts have no BOS, and get one.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=add_special))


#: Held tokens decoded again, with the new ones, to check the seam between them.
_SEAM_TOKENS = 8


def _decode_verbatim(tokenizer: Any, ids: list[int]) -> str:
    """The text of ``ids`` with special tokens kept and no clean-up of spaces."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode_continuing(tokenizer: Any, text: str, held_ids: Sequence[int]) -> list[int]:
    """Token ids of ``text`` that start with ``held_ids`` when the text continues them.

    ``held_ids`` are the ids a conversation's route already holds (the previous turns'
    prompt and generated ids, ``Pin.tokens``), ``text`` the newly rendered prompt. If
    ``text`` starts with the held ids' text (decoded with ``skip_special_tokens=False``,
    ``clean_up_tokenization_spaces=False``), the result is ``held_ids`` followed by the
    rest of the text tokenized without special tokens added.

    Why: the model then sees exactly the tokens it produced. Re-tokenizing a reply's text
    often gives other ids than were generated (BPE merges the text its own way; always so
    with random-weight models, sometimes with real ones), and cache reuse works by token
    ids: each peer keeps only the common prefix of what it holds and the new ids, so a
    re-tokenized reply would be prefilled again, with everything after it.

    Falls back to :func:`encode_prompt` (the whole text re-tokenized) when the held ids do
    not decode faithfully or the text does not continue them: nothing held, a decode that
    ends in U+FFFD (the held ids stop inside a UTF-8 character), a changed conversation,
    or a seam that does not decode back to the text (a tokenizer that prepends a space to
    every encoded text, as SentencePiece's dummy prefix does, would add one there).
    A U+FFFD inside the held text (a partial character the reply showed as U+FFFD, sent
    back by the client) does continue: the model keeps the bytes it generated.
    """
    held = list(held_ids)
    if held:
        decoded = _decode_verbatim(tokenizer, held)
        if decoded and not decoded.endswith(_REPLACEMENT) and text.startswith(decoded):
            rest = text[len(decoded) :]
            rest_ids = list(tokenizer.encode(rest, add_special_tokens=False)) if rest else []
            seam = held[-_SEAM_TOKENS:]
            if _decode_verbatim(tokenizer, seam + rest_ids) == _decode_verbatim(tokenizer, seam) + rest:
                return held + rest_ids
    return encode_prompt(tokenizer, text)


# ---------------------------------------------------------------------------------------
# Incremental detokenization
# ---------------------------------------------------------------------------------------

_REPLACEMENT = "\ufffd"


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``decode(skip_special_tokens=True)`` drops."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            added = backend.get_added_tokens_decoder()
            return frozenset(i for i, token in added.items() if token.special)
        except AttributeError:
            pass
    return frozenset(getattr(tokenizer, "all_special_ids", ()) or ())


def _decode_fn(tokenizer: Any, skip_special_tokens: bool) -> Any:
    """The fastest decode that gives exactly ``tokenizer.decode``'s result.

    For a fast tokenizer without ``clean_up_tokenization_spaces`` (Llama's), that is the
    Rust tokenizer's own decode, skipping transformers' Python layer (several µs a call).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):

        def decode(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return decode

    def decode_slow(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    return decode_slow


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    Decoding one token alone is wrong twice over: a byte-level token may hold half of a
    UTF-8 character, and SentencePiece decoders drop the leading space of the first token
    decoded. So, as vLLM and TGI do, each step decodes a short window ``ids[prefix:]`` and
    emits what it adds beyond ``ids[prefix:read]`` (the text already sent). The offsets
    advance only when the window's text does not end in U+FFFD, i.e. when it ends on a
    whole character; until then nothing is emitted. The window stays a few tokens long, so
    a step costs O(1), never a re-decode of the whole output.

    Invariant: the concatenation of every :meth:`push` and the final :meth:`flush` equals
    ``tokenizer.decode(generated_ids, skip_special_tokens=...)`` when ``prompt_ids`` is
    None. With ``prompt_ids`` the last few prompt tokens are decoding context: the text is
    what the generated tokens add after the prompt, which keeps a SentencePiece leading
    space ("The capital is" + "▁Paris" gives " Paris", where decoding alone gives "Paris").
    Use that for text completions; for chat either works (byte-level BPE: identical).
    If generation ends inside a character, :meth:`flush` returns the text with U+FFFD for
    the incomplete bytes, as ``decode`` does (a ByteFallback decoder may replace a whole run
    of byte tokens, so ``decode`` can then show more U+FFFD than we do).

    Special tokens are skipped (when ``skip_special_tokens``) before they enter the window,
    exactly as ``decode`` drops them, so a run of them cannot grow the window.
    """

    #: Prompt tokens kept as context: enough for any merge or leading-space rule.
    CONTEXT_TOKENS = 5
    #: The id list is trimmed once this many ids lie before the window.
    _TRIM_AT = 512

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Iterable[int] | None = None,
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode = _decode_fn(tokenizer, skip_special_tokens)
        self._skip: frozenset[int] = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        context: list[int] = []
        if prompt_ids is not None:
            tail: list[int] = []
            for token_id in reversed(list(prompt_ids)):
                if token_id in self._skip:
                    continue
                tail.append(token_id)
                if len(tail) == self.CONTEXT_TOKENS:
                    break
            context = tail[::-1]
            # A prompt given as token ids may end in the middle of a character; such a
            # context would make the first delta's length arithmetic wrong. Drop it.
            while context and self._decode(context).endswith(_REPLACEMENT):
                context.pop()
        self._ids: list[int] = context
        self._prefix = 0  # window start: text before it is final
        self._read = len(context)  # ids before this have been emitted as text
        self._prefix_text: str | None = None  # cache of decode(ids[prefix:read])
        self.num_tokens = 0  # generated tokens pushed, special ones included

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often "", never a
        partial character)."""
        self.num_tokens += 1
        if token_id in self._skip:
            return ""
        ids = self._ids
        ids.append(token_id)
        if self._prefix_text is None:
            self._prefix_text = self._decode(ids[self._prefix : self._read])
        new_text = self._decode(ids[self._prefix :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._advance()
        return delta

    def flush(self) -> str:
        """The text still held back at the end of generation (an incomplete character
        decodes to U+FFFD here, exactly as ``decode`` would)."""
        ids = self._ids
        if self._read >= len(ids):
            return ""
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._decode(ids[self._prefix : self._read])
        new_text = self._decode(ids[self._prefix :])
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self._advance()
        return delta

    def _advance(self) -> None:
        self._prefix = self._read
        self._read = len(self._ids)
        self._prefix_text = None
        if self._prefix >= self._TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0


# ---------------------------------------------------------------------------------------
# Stop sequences
# ---------------------------------------------------------------------------------------


class StopMatcher:
    """Cuts streamed text at the first stop sequence, across any chunk boundaries.

    ``feed`` returns the text that is safe to send: a tail that could still become a stop
    sequence (``"\\nUs"`` while ``"\\nUser:"`` is a stop) is held back until the next
    chunk proves it is not one, or until :meth:`flush` at the end of generation. When a
    stop sequence completes, the text before it is returned with ``stopped=True``; the
    stop sequence and everything after it are never returned (OpenAI's behaviour). If
    several stops complete in the same chunk, the one that starts first wins.

    Cost per call: a ``str.find`` per stop over the held tail plus the new text, and, per
    stop, a ``startswith`` at each place in the tail where that stop's first character occurs.
    Memory is the stops themselves and a tail shorter than the longest one: linear in their
    length (a matcher that kept every prefix of every stop grew quadratically; a 1 MB stop
    string took gigabytes).
    """

    def __init__(self, stops: Iterable[str] | None) -> None:
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in (stops or ()) if s))
        self._max_len = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.stopped = False
        #: The stop sequence that ended the text, once ``stopped``.
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return ``(text safe to emit, stopped)``.

        After a stop every call returns ``("", True)``: the caller should stop generating.
        """
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        # Earliest stop occurrence. Only a match that ends inside the new text is new,
        # but searching the whole (short) buffer is simpler and equally cheap.
        cut = -1
        for stop in self.stops:
            at = buffer.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut, self.matched = at, stop
        if cut != -1:
            self.stopped = True
            self._held = ""
            return buffer[:cut], True
        hold = max((self._partial(buffer, stop) for stop in self.stops), default=0)
        if hold:
            self._held = buffer[-hold:]
            return buffer[:-hold], False
        self._held = ""
        return buffer, False

    @staticmethod
    def _partial(buffer: str, stop: str) -> int:
        """Length of the longest end of `buffer` that begins `stop` (a stop still in the making)."""
        begin = max(0, len(buffer) - len(stop) + 1)
        at = buffer.find(stop[0], begin)
        while at != -1:
            if stop.startswith(buffer[at:]):
                return len(buffer) - at
            at = buffer.find(stop[0], at + 1)
        return 0

    def flush(self) -> str:
        """Release the held-back tail at the end of generation (it is not a stop)."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return held


# ---------------------------------------------------------------------------------------
# Single tokens, for logprobs
# ---------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, used by byte-level BPE vocabularies."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


_BYTE_DECODER = {ch: b for b, ch in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenPieces:
    """The text and UTF-8 bytes of single tokens, for ``logprobs`` (cached per id).

    OpenAI reports each token as its own text (with its leading space) and its raw bytes,
    which matter when a token is part of a multi-byte character: then ``bytes`` holds the
    partial sequence and the text shows it backslash-escaped (``"\\xe4\\xbd"``), as
    OpenAI does. Byte-level BPE pieces are mapped back through GPT-2's byte table,
    SentencePiece pieces have ``▁`` turned into a space and ``<0xNN>`` into that byte.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special = _special_ids(tokenizer)
        self._byte_level = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        if decoder is not None:
            try:
                self._byte_level = b'"ByteLevel"' in decoder.__getstate__()
            except (AttributeError, TypeError):
                self._byte_level = False
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """``(text, bytes)`` of one token."""
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._raw_bytes(token_id)
            hit = (raw.decode("utf-8", errors="backslashreplace"), list(raw))
            self._cache[token_id] = hit
        return hit

    def text(self, token_id: int) -> str:
        """The token as text, as OpenAI's ``logprobs.content[].token`` shows it."""
        return self(token_id)[0]

    def bytes_of(self, token_id: int) -> list[int]:
        """The token's UTF-8 bytes, as OpenAI's ``logprobs.content[].bytes``."""
        return self(token_id)[1]

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self._special:
            return piece.encode()
        if self._byte_level:
            if all(ch in _BYTE_DECODER for ch in piece):
                return bytes(_BYTE_DECODER[ch] for ch in piece)
            return piece.encode()
        match = _BYTE_FALLBACK.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

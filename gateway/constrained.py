"""Constrained decoding: JSON Schema, regex, choice and grammar outputs, on llguidance.

Before every step of a constrained choice the gateway computes which token ids may come next and
sends them as a bitmask in ``Step.allowed_token_mask``; the last span masks every other logit, and
the gateway feeds the sampled token back (`Constraint.allowed_bits` / `Constraint.advance`, called by
`gateway.generation.generate`). The model is never retried: it can only write valid output.

Why llguidance (and not xgrammar, nor our own parser)
-----------------------------------------------------
Both libraries compile a JSON Schema / regex / grammar into a token mask per step on the CPU, and
both are what vLLM, SGLang and llama.cpp use. ``python -m loadtests.bench_constrained`` measured
them on our tokenizers (docs/benchmarks.md, "Constrained decoding"; per step, on 2 shared cores):

* **llguidance** imports no torch (the gateway must not: tests/test_layers.py), compiles a new
  schema lazily in ~1 ms (every request brings its own), and needs ~2 s once per 128k-152k
  vocabulary. Its mask takes 0.2 ms there with the closing plan below. Its Earley parser takes the
  full JSON Schema we need (``anyOf``, ``oneOf``, recursive ``$ref``, ``pattern``, ``format``,
  array, string and numeric bounds) and bounds its own work per step (`LIMITS`: lexer fuel, Earley
  items), so a hostile schema errors out instead of stalling the event loop.
* **xgrammar** imports torch at ``import xgrammar`` (2.6 s, and torch in a gateway process), and
  compiles each new schema eagerly: 20-40 ms at those vocabularies before the first token. Its
  bare mask is faster (0.05 ms), but on a big vocabulary both were dwarfed by turning ~150k allowed
  ids into the id list ``Step.allowed_token_ids`` (~2 ms to build, ~5 ms to serialize, 430 KB per
  step); the gateway therefore sends the mask itself, ``Step.allowed_token_mask`` (19 KB).
* The hand-written masker this module used to be walked a character trie of the vocabulary in
  Python: fine on the 1024-token demo vocabulary, 78-137 ms per step on average and up to 2.3 s
  per new parser state on a 128k-152k one, and only a subset of JSON Schema (no ``anyOf``, so no
  Pydantic ``Optional``).

Finishing within ``max_tokens``
-------------------------------
llguidance knows the grammar, not the budget. A random-weight model (the demo) would otherwise
write strings until it is cut at ``max_tokens``, and a real model can do the same. So each
constraint keeps a *closing plan*: the shortest way, found greedily, to complete the output from
the current state with one-character tokens, each checked by the matcher (`Constraint._plan`),
guided by the JSON structure written so far (close the string, then the container; the shortest
value where one is required). With ``left`` tokens of budget and a plan of ``need`` tokens:

* ``left > need + NEAR``: the whole mask;
* ``need < left <= need + NEAR`` (``NEAR``, or more once the model has opened something that
  long, such as another array item): only tokens without JSON structure (no ``{ [ , : " }``...), which
  cannot open anything new, plus the plan's next token (inside a string with a ``pattern`` or a
  ``format``, where any character may lengthen the plan: only the plan's next token);
* ``left == need``: only the plan's next token, so the output closes on the last token;
* ``left < need``: the whole mask (the plan cannot make it; the model's own tokens still might).

Every vocabulary we serve spells each ASCII character as one token (byte-level BPE, and the
SentencePiece byte fallback), which is what the plan is made of. A plan the greedy search cannot
find (a ``pattern`` it cannot satisfy one character at a time within `MAX_PLAN_TRIES` checks) leaves
the output unforced: it may then end at ``max_tokens`` with ``finish_reason: "length"``.

When the output is complete and nothing but EOS may follow (`Constraint.finished`), the choice
ends at once with ``finish_reason: "stop"``: no step is spent on sampling the EOS token.

Schemas
-------
Everything llguidance implements (docs: llguidance ``json_schema.md``), compact (no insignificant
whitespace: a model cannot spend its budget on spaces), properties in the schema's order,
``oneOf`` read as ``anyOf``. Keywords it cannot enforce (``not``, ``if``, ``uniqueItems``,
``contains``...) are refused with a 400 rather than silently ignored; an unknown ``format`` is an
annotation (JSON Schema 2020-12) and is dropped.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np

# Per-step work bounds (llguidance's defaults, error messages without the parser state)
LIMITS = llguidance.LLParserLimits(verbose_errors=False)
# Compact JSON; oneOf as anyOf; no client switch (x-guidance) can turn whitespace back on
JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True, "lenient": False}
FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"}
)

NEAR = 16  # tokens of budget over the closing plan below which only structure-free tokens are allowed
# (or more: the biggest jump of the plan seen so far, as when the model opens another array item)
FAR = 64  # past need + FAR, a token without structure does not trigger a new plan
REPLAN_EVERY = 16  # ...but at least every this many steps
LOOK_AHEAD = 8  # at most this many tokens with structure are each checked to leave a closing plan
MAX_PLAN_TRIES = 2000  # one-character checks per plan (~0.75 us each)
MAX_PLAN = 512  # characters

# A token holding any of these bytes may open a container, a key or a value, or end one
_STRUCTURE = frozenset(b'{}[],:"\\')


def _order(head: str) -> bytes:
    """`head`, then every other printable ASCII character, each once, then the UTF-8 continuation
    bytes (to finish a character the model left half-written)."""
    ascii_order = "".join(
        dict.fromkeys(head + '"}])0a1 ,:.-_' + string.ascii_letters + string.digits + string.punctuation)
    )
    return ascii_order.encode() + bytes(range(0x80, 0xC0))


_GENERIC = _order("")
_VALUE = '0"ntf[{-123456789'  # shortest first; null before an object that may recurse
_FILL = "a@.0-_:/ A1zZ9x"  # inside a string the plan tries these first, each once
_IN_STRING = _order('"' + _FILL)
_ORDERS = {key: _order(head) for key, head in {
    "escape": 'n"\\/', "value": _VALUE, "[": "]" + _VALUE, "{": '}"', ",{": '"', ",[": _VALUE, "key": ":",
    "}": "},", "]": "],", "": ",",
}.items()}  # fmt: skip


class SchemaError(ValueError):
    """The schema, regex or grammar cannot be enforced (a 400 for the client)."""


# -- grammars ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grammar:
    """A checked constraint, as llguidance's grammar text. ``json``: the output is JSON (the
    closing plan reads its structure)."""

    text: str
    json: bool = True


def _checked(text: str, json_output: bool) -> Grammar:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, None, limits=LIMITS)
    if is_error:
        raise SchemaError(messages[0] if messages else "invalid grammar")
    return Grammar(text, json_output)


def json_schema_grammar(schema: Any) -> Grammar:
    """Output one JSON value of `schema` (None: any JSON object, as ``json_object`` asks)."""
    if schema is None:
        schema = {"type": "object"}
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise SchemaError("a schema must be a JSON object")
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(_clean(schema), overrides=JSON_OPTIONS)
    except (TypeError, ValueError) as exc:
        raise SchemaError(str(exc)) from exc
    return _checked(text, True)


def regex_grammar(pattern: str) -> Grammar:
    """Output text matching `pattern` (Rust ``regex`` syntax, anchored at both ends)."""
    return _checked(llguidance.LLMatcher.grammar_from_regex(pattern), False)


def choice_grammar(options: list[str]) -> Grammar:
    """Output exactly one of `options`."""
    if not options or not all(isinstance(option, str) and option for option in options):
        raise SchemaError("choice must be a non-empty list of non-empty strings")
    lark = "start: " + " | ".join(json.dumps(option) for option in dict.fromkeys(options))
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), False)


def lark_grammar(text: str) -> Grammar:
    """Output text of a context-free grammar: llguidance's Lark syntax, or llama.cpp's GBNF."""
    try:
        converted = llguidance.grammar_from("grammar", text)
    except ValueError as exc:
        raise SchemaError(str(exc)) from exc
    return _checked(converted, False)


def _clean(schema: Any) -> Any:
    """A copy of `schema` without unknown ``format`` annotations or client ``x-guidance`` options."""
    if isinstance(schema, list):
        return [_clean(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "x-guidance" or (key == "format" and isinstance(value, str) and value not in FORMATS):
            continue
        out[key] = _clean(value)
    return out


# -- the vocabulary, once per served model ----------------------------------------------------------
class Vocabulary:
    """A tokenizer as the constraint engine sees it (built once per model: ~2 s for 128k tokens).

    ``plain[id]``: the token is whole UTF-8 characters without a JSON structure byte;
    ``single[byte]``: the token that is exactly that byte (the closing plan's alphabet)."""

    def __init__(self, tokenizer: Any, eos_ids: Iterable[int]):
        from llguidance.hf import from_tokenizer

        self.size = len(tokenizer)
        self.eos_ids = sorted(eos_ids)
        self.tokenizer = from_tokenizer(tokenizer, n_vocab=self.size, eos_token=self.eos_ids or None)
        self.words = (self.size + 31) // 32
        self.plain = np.zeros(self.size, dtype=bool)
        self.single: dict[int, int] = {}
        self.eos_mask = np.zeros(self.size, dtype=bool)
        self.eos_mask[[i for i in self.eos_ids if i < self.size]] = True
        for token_id in range(self.size):
            if self.tokenizer.is_special_token(token_id):
                continue
            data = self.tokenizer.decode_bytes([token_id])
            self.plain[token_id] = bool(data) and _STRUCTURE.isdisjoint(data) and _whole(data)
            if len(data) == 1:
                self.single.setdefault(data[0], token_id)

    def mask_ids(self, words: np.ndarray) -> np.ndarray:
        """The allowed ids of a llguidance bitmask (one bit per token, little-endian int32 words)."""
        return np.unpackbits(words.view(np.uint8), bitorder="little")[: self.size].view(bool)


def _whole(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- the JSON written so far, as far as the closing plan needs it -----------------------------------
class _JsonContext:
    """Containers open, inside a string or not (and whether it is a key), the last structural
    character. It only orders the closing plan's candidates; the matcher decides what is valid."""

    __slots__ = ("stack", "in_string", "escape", "is_key", "last", "used")

    def __init__(self):
        self.stack: list[str] = []
        self.in_string = self.escape = self.is_key = False
        self.last = ""
        self.used: set[str] = set()  # characters of the open string

    def copy(self) -> _JsonContext:
        other = _JsonContext()
        other.stack = list(self.stack)
        other.in_string, other.escape, other.is_key = self.in_string, self.escape, self.is_key
        other.last, other.used = self.last, set(self.used)
        return other

    def feed(self, data: bytes) -> None:
        for byte in data:
            ch = chr(byte)
            if self.in_string:
                self.used.add(ch)
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    self.last = ch
                continue
            if ch == '"':
                self.in_string = True
                self.used.clear()
                self.is_key = bool(self.stack) and self.stack[-1] == "{" and self.last in ("{", ",")
            elif ch in "{[":
                self.stack.append(ch)
            elif ch in "}]" and self.stack:
                self.stack.pop()
            if ch not in " \t\r\n":
                self.last = ch

    def order(self) -> bytes:
        """Candidate bytes, most closing first."""
        if self.in_string:
            if self.escape:
                return _ORDERS["escape"]
            fresh = "".join(ch for ch in _FILL if ch not in self.used)
            return _IN_STRING if not self.used else _order('"' + fresh)
        last, top = self.last, self.stack[-1] if self.stack else ""
        if last in ("", ":"):
            return _ORDERS["value"]
        if last in "[{":
            return _ORDERS[last]
        if last == ",":
            return _ORDERS["," + top] if top else _GENERIC
        if last == '"' and self.is_key:
            return _ORDERS["key"]
        # after a value, or inside a number or a literal: close the container first
        return _ORDERS["}" if top == "{" else "]" if top == "[" else ""]


# -- one choice's constraint ------------------------------------------------------------------------
class Constraint:
    """One choice: `allowed()` before each step, `advance(token)` after it.

    ``max_tokens`` is the choice's budget (see "Finishing within max_tokens"). Construction
    compiles the grammar for the vocabulary (about a millisecond; it releases the GIL, so callers
    may build it in a thread). Raises `SchemaError` if the grammar does not compile."""

    def __init__(self, grammar: Grammar, vocab: Vocabulary, max_tokens: int):
        self.vocab = vocab
        self.matcher = llguidance.LLMatcher(vocab.tokenizer, grammar.text, log_level=0, limits=LIMITS)
        if self.matcher.is_error():
            raise SchemaError(self.matcher.get_error())
        self.left = max_tokens
        self._json = _JsonContext() if grammar.json else None
        self._words = np.zeros(vocab.words, dtype=np.int32)
        self._plan: list[int] | None = None  # the closing plan from the current state, if fresh
        self._fresh = False
        self._need: int | None = None  # the last plan's length (None: none found)
        self._since_plan = 0
        self._structural = True  # the last token held structure: plan again
        self._margin = NEAR  # grows to the biggest jump of the plan seen (an array item, a nested object)

    @property
    def complete(self) -> bool:
        """The output so far is a whole value (it may still go on, a number for instance)."""
        return self.matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Complete, and nothing but EOS may follow (also after an error: nothing can follow)."""
        return self.matcher.is_stopped()

    def allowed(self) -> list[int]:
        """Token ids that may come next (never empty), for `Step.allowed_token_ids`."""
        return np.flatnonzero(self.allowed_mask()).tolist()

    def allowed_bits(self) -> bytes:
        """`allowed` packed as `Step.allowed_token_mask` (bit i of byte i // 8 little-endian)."""
        return np.packbits(self.allowed_mask(), bitorder="little").tobytes()

    def allowed_mask(self) -> np.ndarray:
        """`allowed` as one bool per vocabulary entry (never all False). Turning it into the id list
        costs more than computing it on a 150k vocabulary (docs/benchmarks.md)."""
        vocab, matcher = self.vocab, self.matcher
        if matcher.is_stopped():
            return vocab.eos_mask.copy()
        matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if matcher.is_error():
            return vocab.eos_mask.copy()
        bits = vocab.mask_ids(self._words) & ~vocab.eos_mask
        plan = self._closing_plan()
        if plan is not None:
            need = len(plan)
            if not plan:
                if self.left <= 1:  # complete, one token left: end here
                    return vocab.eos_mask.copy()
            elif self.left == need or (need < self.left <= need + self._margin and not self._relaxable()):
                bits[:] = False
                bits[plan[0]] = True
                return bits
            elif need < self.left <= need + self._margin:
                bits &= vocab.plain
                bits[plan[0]] = True
            elif self.left <= need + FAR:
                self._look_ahead(bits, plan)
        if matcher.is_accepting():
            bits |= vocab.eos_mask
        return bits if bits.any() else vocab.eos_mask.copy()

    def _look_ahead(self, bits: np.ndarray, plan: list[int]) -> None:
        """Where few tokens with structure may come (after a value: ``,`` ``]`` ``}``...), drop
        those after which the output could no longer close in the budget (another array item,
        another tool call, too late)."""
        candidates = np.flatnonzero(bits & ~self.vocab.plain)
        if not 0 < len(candidates) <= LOOK_AHEAD:
            return
        matcher = self.matcher
        for token_id in candidates.tolist():
            if token_id == plan[0] or matcher.validate_tokens([token_id]) != 1:
                continue
            matcher.consume_token(token_id)
            context = None
            if self._json is not None:
                context = self._json.copy()
                context.feed(self.vocab.tokenizer.decode_bytes([token_id]))
            after = self._shortest(self._greedy_plan(MAX_PLAN, context))
            matcher.rollback(1)
            if after is None or len(after) > self.left - 1:
                bits[token_id] = False

    def _relaxable(self) -> bool:
        """Near the end, may the model still write structure-free tokens of its own? In JSON, yes,
        except inside a string that cannot simply be closed (a ``pattern``, a ``format``: its plan
        could grow with any character). Other grammars are the client's: left alone."""
        context = self._json
        if context is None or not self._plan:
            return True
        return not context.in_string or self.vocab.tokenizer.decode_bytes(self._plan[:1]).startswith(b'"')

    def advance(self, token_id: int) -> None:
        self.left -= 1
        if token_id in self.vocab.eos_ids or self.matcher.is_stopped():
            return
        self.matcher.consume_token(token_id)  # a token the mask did not allow puts it in error: it stops
        data = self.vocab.tokenizer.decode_bytes([token_id])
        if self._json is not None:
            self._json.feed(data)
        self._since_plan += 1
        if self._fresh and self._plan and token_id == self._plan[0]:
            self._plan = self._plan[1:]
            self._need = len(self._plan)
        else:
            self._fresh = False
            self._structural = not self.vocab.plain[token_id] if token_id < self.vocab.size else True

    def _closing_plan(self) -> list[int] | None:
        """The closing plan from the current state (None: not needed yet, or none found)."""
        if self._fresh:
            return self._plan
        if self._still_closes():
            self._fresh = True
            return self._plan
        far = self.left > (self._need or 0) + FAR
        if far and not self._structural and self._since_plan < REPLAN_EVERY:
            return None  # nothing that could open a structure since the last plan, and far from the end
        self._plan = self._shortest(self._greedy_plan(MAX_PLAN, self._json.copy() if self._json else None))
        self._fresh, self._since_plan, self._structural = True, 0, False
        need = None if self._plan is None else len(self._plan)
        if need is not None and self._need is not None:
            self._margin = max(self._margin, need - self._need + NEAR // 4)
        self._need = need
        return self._plan

    def _still_closes(self) -> bool:
        """Inside a string, after a token without structure, the plan that closed the string still
        does (checked by the matcher): the common case of a long string costs no new plan."""
        plan, context = self._plan, self._json
        if self._structural or not plan or context is None or not context.in_string:
            return False
        if not self.vocab.tokenizer.decode_bytes(plan[:1]).startswith(b'"'):
            return False
        return self.matcher.validate_tokens(plan) == len(plan)

    def _shortest(self, plan: list[int] | None) -> list[int] | None:
        """The plan's text in as few tokens as the vocabulary spells it (when the matcher takes them)."""
        if not plan or len(plan) == 1:
            return plan
        tokenizer = self.vocab.tokenizer
        tokens = tokenizer.greedy_tokenize(tokenizer.decode_str(plan))
        if len(tokens) < len(plan) and self.matcher.validate_tokens(tokens) == len(tokens):
            return tokens
        return plan

    def _greedy_plan(self, limit: int, context: _JsonContext | None) -> list[int] | None:
        """Complete the output one character at a time, the most closing valid character first;
        the matcher walks the plan and rolls it back. `context`: the JSON so far (a copy: fed)."""
        matcher, single = self.matcher, self.vocab.single
        plan: list[int] = []
        tries = MAX_PLAN_TRIES
        found = True
        while not matcher.is_accepting():
            if len(plan) >= limit or tries <= 0:
                found = False
                break
            forced = matcher.compute_ff_bytes()  # what the grammar leaves no choice about (a key...)
            if forced and all(byte in single for byte in forced):
                tokens = [single[byte] for byte in forced]
                taken = matcher.try_consume_tokens(tokens)
                plan.extend(tokens[:taken])
                if context is not None:
                    context.feed(forced[:taken])
                if taken:
                    continue
            if context is not None:
                order = context.order()
            else:  # another grammar: characters the plan has not used yet first, so it moves on
                used = set(plan)
                order = bytes(b for b in _GENERIC if single.get(b) not in used) + _GENERIC
            for byte in order:
                token_id = single.get(byte)
                if token_id is None:
                    continue
                tries -= 1
                if matcher.validate_tokens([token_id]) == 1:
                    matcher.consume_token(token_id)
                    plan.append(token_id)
                    if context is not None:
                        context.feed(bytes((byte,)))
                    break
                if tries <= 0:
                    break
            else:
                found = False
                break
        if plan:
            matcher.rollback(len(plan))
        return plan if found else None

"""Constrained decoding for ``response_format`` (json_object, json_schema) and forced tool calls.

The gateway keeps an incremental JSON parser for each choice. Before every step it computes which
token ids may come next (every character of the token must keep the text a prefix of a valid
value) and sends them in ``Step.allowed_token_ids``; the last span masks every other logit. So the
model is never retried: it can only write valid JSON.

How the allowed set is computed
-------------------------------
* Each token's text is decoded once per tokenizer (``TokenTable``) and put in a character trie.
  Special tokens and tokens that are only part of a UTF-8 character are never allowed (so a
  constrained answer cannot hold characters the vocabulary only spells with byte tokens).
* The parser state is an immutable tuple of frames (a pushdown automaton), so a depth-first walk
  of the trie shares every prefix: a token is tried only when its prefix was valid. Results are
  memoized per state (the state inside a long string repeats, so most steps are cache hits).
* Termination is forced: each state knows the fewest characters that complete the value
  (``min_close``); a token is allowed only if what it leaves can still be closed in the tokens
  left (every vocabulary we serve spells each ASCII character as one token). When the value is
  complete, only EOS is allowed.

Cost: the walk visits at most the trie nodes that stay valid, O(vocab × token length) in the worst
case in pure Python (about a millisecond per step for the 1024-token demo vocabulary, more at the
first step of a state), and the allowed ids travel on every step: fine for small vocabularies. A
128k vocabulary would want the walk in a compiled library (outlines-core, llguidance) and the set
sent as a bitmask (16 KB per step) instead of a list of ids.

Supported JSON Schema subset: ``type`` (object, array, string, number, integer, boolean, null),
``properties`` (emitted in the schema's order, all of them, so ``required`` always holds),
``items``, ``minItems``/``maxItems``, ``enum`` and ``const`` of strings or literals,
``minLength``/``maxLength`` and local ``$ref`` to ``$defs``/``definitions``. Anything else
(``anyOf``, ``oneOf``, ``pattern``...) is refused with a 400 rather than silently ignored.
Strings are generated without escapes (no backslash, no control characters) and no insignificant
whitespace is produced; the output is still JSON that any parser reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_NO_STRING_CHARS = frozenset('"\\')
_UNSUPPORTED = (
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "if",
    "pattern",
    "patternProperties",
    "format",
    "multipleOf",
)
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_MAX_CACHE = 4096


def _key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


class SchemaError(ValueError):
    """The schema uses something constrained decoding cannot enforce."""


def _bounds(schema: dict[str, Any], low_key: str, high_key: str) -> tuple[int, int | None]:
    """``(min, max)`` of a length keyword pair, checked: client input must never crash a step."""
    low, high = schema.get(low_key, 0), schema.get(high_key)
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise SchemaError(f"'{key}' must be a non-negative integer")
    if high is not None and high < low:
        raise SchemaError(f"'{high_key}' is less than '{low_key}'")
    return low, high


# -- schemas compiled to a table of nodes, so that parser states can name them by index --------------
@dataclass(frozen=True)
class Node:
    kind: str  # "any", "object", "free_object", "array", "string", "number", "integer", "literal", "enum"
    properties: tuple[tuple[str, int], ...] = ()  # object: (key, node) in emission order
    items: int = -1  # array: node of the items
    min_items: int = 0
    max_items: int | None = None
    min_length: int = 0
    max_length: int | None = None
    options: tuple[str, ...] = ()  # enum / literal: JSON texts


class Grammar:
    """A compiled schema: ``nodes[0]`` is the root."""

    def __init__(self, schema: dict[str, Any] | None):
        self.nodes: list[Node] = []
        self._root_schema = schema or {}
        self._compile(schema, depth=0) if schema is not None else self._add(Node("free_object"))
        self.min_lens = [0] * len(self.nodes)
        for index in reversed(range(len(self.nodes))):
            self.min_lens[index] = self._min_len(index)

    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _resolve(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        ref = schema.get("$ref")
        if ref is None:
            return schema
        if depth > 16 or not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaError(f"only local, non-recursive $ref are supported, got {ref!r}")
        target: Any = self._root_schema
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"$ref {ref!r} points nowhere")
            target = target[part]
        return self._resolve(target, depth + 1)

    def _compile(self, schema: Any, depth: int) -> int:
        if depth > 16:
            raise SchemaError("the schema nests deeper than 16 levels (recursive $ref?)")
        if schema is True or schema == {}:
            return self._add(Node("any"))
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be an object")
        schema = self._resolve(schema, depth)
        for keyword in _UNSUPPORTED:
            if keyword in schema:
                raise SchemaError(f"the schema keyword '{keyword}' is not supported by constrained decoding")
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError("'enum' must be a non-empty list")
            texts = tuple(
                dict.fromkeys(
                    json.dumps(value, ensure_ascii=False, separators=(",", ":")) for value in values
                )
            )
            if any(a != b and b.startswith(a) for a in texts for b in texts):
                raise SchemaError("'enum' values where one is a prefix of another are not supported")
            return self._add(Node("enum", options=texts))
        kind = schema.get("type")
        if isinstance(kind, list):
            raise SchemaError("a list of types is not supported; use one type")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "any"
        if kind == "object":
            properties = schema.get("properties") or {}
            if not isinstance(properties, dict):
                raise SchemaError("'properties' must be an object")
            if not properties:
                return self._add(Node("free_object"))
            index = self._add(Node("object"))  # placeholder, children come after it
            pairs = tuple((str(key), self._compile(value, depth + 1)) for key, value in properties.items())
            self.nodes[index] = Node("object", properties=pairs)
            return index
        if kind == "array":
            index = self._add(Node("array"))
            items = self._compile(schema.get("items", {}), depth + 1)
            low, high = _bounds(schema, "minItems", "maxItems")
            self.nodes[index] = Node("array", items=items, min_items=low, max_items=high)
            return index
        if kind == "string":
            low, high = _bounds(schema, "minLength", "maxLength")
            return self._add(Node("string", min_length=low, max_length=high))
        if kind in ("number", "integer"):
            return self._add(Node(kind))
        if kind == "boolean":
            return self._add(Node("enum", options=("true", "false")))
        if kind == "null":
            return self._add(Node("enum", options=("null",)))
        raise SchemaError(f"unknown type {kind!r}")

    def _min_len(self, index: int) -> int:
        node = self.nodes[index]
        if node.kind in ("any", "number", "integer"):
            return 1
        if node.kind == "free_object":
            return 2
        if node.kind == "string":
            return 2 + node.min_length
        if node.kind == "enum":
            return min(len(text) for text in node.options)
        if node.kind == "array":
            return 2 + node.min_items * (self.min_lens[node.items] + 1)
        if node.kind == "object":
            return 1 + sum(len(_key(key)) + 2 + self.min_lens[child] for key, child in node.properties)
        raise AssertionError(node.kind)  # compile() makes only the kinds above


# -- the parser: states are tuples of frames, top of stack last -------------------------------------
# ("value", node)              a value of `node` must start here
# ("lit", text)                exactly `text` must follow
# ("enum", options, done)      one of `options` (JSON texts); `done` characters matched
# ("str", min, max, count)     inside a string; `max` -1 = unbounded; count only kept when bounded
# ("num", integer, phase)      phases: "sign" "zero" "int" "dot" "frac" (terminal: zero int frac)
# ("fobj", phase)              free object: "open" (after '{'), "next" (after a value)
# ("arr", node, count, phase)  array of items `node`: "open", "next"
# ("aany", phase)              array of any values: "open", "next"
# ("obj", node, next_index)    schema object: properties [next_index:] still to come
State = tuple


def _feed(grammar: Grammar, state: State, ch: str) -> State | None:
    """The state after one more character, or None when the text would stop being valid JSON."""
    while state:
        frame = state[-1]
        rest = state[:-1]
        tag = frame[0]
        if tag == "lit":
            return (
                (rest + (("lit", frame[1][1:]),) if len(frame[1]) > 1 else rest)
                if ch == frame[1][0]
                else None
            )
        if tag == "enum":
            options, done = frame[1], frame[2]
            keep = tuple(text for text in options if len(text) > done and text[done] == ch)
            if not keep:
                return None
            finished = [text for text in keep if len(text) == done + 1]
            if finished:  # options are prefix-free: this one is complete
                return rest
            return rest + (("enum", keep, done + 1),)
        if tag == "str":
            low, high, count = frame[1], frame[2], frame[3]
            if ch == '"':
                return rest if count >= low else None
            if ch in _NO_STRING_CHARS or ord(ch) < 0x20 or (high >= 0 and count >= high):
                return None
            if low == 0 and high < 0:
                return state  # unbounded: the count is not kept, so states repeat (cache hits)
            return rest + (("str", low, high, count + 1),)
        if tag == "num":
            integer, phase = frame[1], frame[2]
            nxt = _num_next(integer, phase, ch)
            if nxt is not None:
                return rest + (("num", integer, nxt),)
            if phase in ("zero", "int", "frac"):
                state = rest  # the number ended; the character belongs to what follows
                continue
            return None
        if tag == "value":
            return _start_value(grammar, rest, frame[1], ch)
        if tag == "fobj":
            if frame[1] == "open":
                if ch == "}":
                    return rest
                if ch == '"':
                    return rest + (("fobj", "next"), ("value", -1), ("lit", ":"), ("str", 0, -1, 0))
                return None
            if ch == "}":
                return rest
            if ch == ",":
                return rest + (("fobj", "next"), ("value", -1), ("lit", ":"), ("str", 0, -1, 0), ("lit", '"'))
            return None
        if tag == "aany":  # an array of any values
            if ch == "]":
                return rest
            if frame[1] == "open":
                return _start_value(grammar, rest + (("aany", "next"),), -1, ch)
            return rest + (("aany", "next"), ("value", -1)) if ch == "," else None
        if tag == "arr":
            node = grammar.nodes[frame[1]]
            count, phase = frame[2], frame[3]
            can_close = count >= node.min_items
            can_add = node.max_items is None or count < node.max_items
            if ch == "]" and can_close:
                return rest
            if phase == "open":
                if not can_add:
                    return None
                return _start_value(grammar, rest + (("arr", frame[1], count + 1, "next"),), node.items, ch)
            if ch == "," and can_add:
                return rest + (("arr", frame[1], count + 1, "next"), ("value", node.items))
            return None
        if tag == "obj":
            node = grammar.nodes[frame[1]]
            index = frame[2]
            if index >= len(node.properties):
                return rest if ch == "}" else None
            key, child = node.properties[index]
            prefix = ("," if index else "") + _key(key) + ":"
            pushed = rest + (("obj", frame[1], index + 1), ("value", child), ("lit", prefix))
            return _feed(grammar, pushed, ch)
        raise AssertionError(tag)
    return None  # the value is complete: nothing may follow


def _num_next(integer: bool, phase: str, ch: str) -> str | None:
    digit = "0" <= ch <= "9"
    if phase == "sign":
        return "zero" if ch == "0" else "int" if digit else None
    if phase == "int":
        return "int" if digit else "dot" if ch == "." and not integer else None
    if phase == "zero":
        return "dot" if ch == "." and not integer else None
    if phase in ("dot", "frac"):
        return "frac" if digit else None
    return None


def _start_value(grammar: Grammar, rest: State, index: int, ch: str) -> State | None:
    """Begin a value of node `index` (-1: any JSON value) with character `ch`."""
    node = grammar.nodes[index] if index >= 0 else Node("any")
    kind = node.kind
    if kind == "any":
        if ch == "{":
            return rest + (("fobj", "open"),)
        if ch == "[":
            return rest + (("aany", "open"),)
        if ch == '"':
            return rest + (("str", 0, -1, 0),)
        if ch in _LITERALS:
            return rest + (("lit", _LITERALS[ch]),)
        kind = "number"
    if kind == "free_object":
        return rest + (("fobj", "open"),) if ch == "{" else None
    if kind == "object":
        return rest + (("obj", index, 0),) if ch == "{" else None
    if kind == "array":
        return rest + (("arr", index, 0, "open"),) if ch == "[" else None
    if kind == "string":
        high = -1 if node.max_length is None else int(node.max_length)
        return rest + (("str", node.min_length, high, 0),) if ch == '"' else None
    if kind == "enum":
        return _feed(grammar, rest + (("enum", node.options, 0),), ch)
    if kind in ("number", "integer"):
        integer = kind == "integer"
        if ch == "-":
            return rest + (("num", integer, "sign"),)
        if ch == "0":
            return rest + (("num", integer, "zero"),)
        if "1" <= ch <= "9":
            return rest + (("num", integer, "int"),)
        return None
    raise AssertionError(kind)


def min_close(grammar: Grammar, state: State) -> int:
    """The fewest characters that complete the value from `state`."""
    total = 0
    for frame in state:
        tag = frame[0]
        if tag == "value":
            total += grammar.min_lens[frame[1]] if frame[1] >= 0 else 1
        elif tag == "lit":
            total += len(frame[1])
        elif tag == "enum":
            total += min(len(text) for text in frame[1]) - frame[2]
        elif tag == "str":
            total += 1 + max(0, frame[1] - frame[3])
        elif tag == "num":
            total += 0 if frame[2] in ("zero", "int", "frac") else 1
        elif tag in ("fobj", "aany"):
            total += 1
        elif tag == "arr":
            node = grammar.nodes[frame[1]]
            total += 1 + max(0, node.min_items - frame[2]) * (grammar.min_lens[node.items] + 1)
        elif tag == "obj":
            node = grammar.nodes[frame[1]]
            total += 1 + sum(
                len(_key(key)) + 1 + (1 if i else 0) + grammar.min_lens[child]
                for i, (key, child) in enumerate(node.properties[frame[2] :], start=frame[2])
            )
    return total


def is_complete(state: State) -> bool:
    """The text is a whole value (a top-level number may still grow, but may also end here)."""
    return not state or (len(state) == 1 and state[0][0] == "num" and state[0][2] in ("zero", "int", "frac"))


# -- tokens ---------------------------------------------------------------------------------------------
class TokenTable:
    """Every token's text, once per tokenizer, in a character trie (see the module docstring)."""

    def __init__(self, pieces: Any, vocab_size: int, special_ids: Iterable[int]):
        special = set(special_ids)
        self.trie: dict = {}
        for token_id in range(vocab_size):
            if token_id in special:
                continue
            try:
                text = bytes(pieces.bytes_of(token_id)).decode("utf-8")
            except UnicodeDecodeError:
                continue  # part of a character: never allowed
            if not text:
                continue
            node = self.trie
            for ch in text:
                node = node.setdefault(ch, {})
            node.setdefault(None, []).append(token_id)


class JsonConstraint:
    """One choice's constraint: `allowed()` before each step, `advance(token)` after it.

    ``max_tokens`` is the generation budget: a token is allowed only if the value can still be
    closed in the tokens left after it. ``eos_ids`` are allowed (alone) once the value is complete.
    """

    def __init__(self, grammar: Grammar, table: TokenTable, eos_ids: Iterable[int], max_tokens: int):
        self.grammar = grammar
        self.table = table
        self.eos_ids = sorted(eos_ids)
        self.left = max_tokens
        self.state: State = (("value", 0),)
        # state -> {token id: (state after it, characters still needed to close after it)}
        self._cache: dict[State, dict[int, tuple[State, int]]] = {}

    @property
    def complete(self) -> bool:
        return is_complete(self.state)

    def allowed(self) -> list[int]:
        """Token ids that may come next (never empty)."""
        options = self._options(self.state)
        room = self.left - 1  # tokens left after this one
        ids = [token_id for token_id, (_, need) in options.items() if need <= room]
        if not ids and options:
            # Too few tokens left to close char by char: take those that leave the least to write
            # (multi-character tokens may still make it; else the answer is cut at max_tokens).
            least = min(need for _, need in options.values())
            ids = [token_id for token_id, (_, need) in options.items() if need == least]
        if self.complete:  # complete (a top-level number may also go on)
            ids += self.eos_ids
        return ids or list(self.eos_ids)

    def advance(self, token_id: int) -> None:
        self.left -= 1
        option = self._options(self.state).get(token_id)
        if option is not None:  # else EOS, or a token the mask did not allow: keep the state
            self.state = option[0]

    def _options(self, state: State) -> dict[int, tuple[State, int]]:
        cached = self._cache.get(state)
        if cached is None:
            cached = {
                token_id: (after, min_close(self.grammar, after))
                for token_id, after in self._walk(state).items()
            }
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()
            self._cache[state] = cached
        return cached

    def _walk(self, state: State) -> dict[int, State]:
        """Depth-first over the trie: every token whose characters all keep the text valid."""
        found: dict[int, State] = {}
        stack = [(self.table.trie, state)]
        grammar = self.grammar
        while stack:
            node, current = stack.pop()
            for ch, child in node.items():
                if ch is None:
                    continue
                after = _feed(grammar, current, ch)
                if after is None:
                    continue
                for token_id in child.get(None, ()):
                    found[token_id] = after
                stack.append((child, after))
        return found

"""The models this gateway can serve: tokenizer, chat template and limits, read from a local folder.

The gateway holds no weights: only `config.json`, `generation_config.json` and the tokenizer files
are read. Whether a model is actually servable right now depends on the swarm (see `/v1/models`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

log = logging.getLogger("gateway.models")

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


@dataclass
class ServedModel:
    id: str
    path: Path
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    num_blocks: int
    max_context: int
    eos_token_ids: set[int]
    # what a peer's answer must fit (`gateway.answer_checks`); 0: not checked
    hidden_size: int = 0
    vocab_size: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    @cached_property
    def pieces(self):
        """Text and bytes of single tokens (`gateway.text.TokenPieces`), for logprobs and constraints."""
        from gateway.text import TokenPieces

        return TokenPieces(self.tokenizer)

    @cached_property
    def constraint_vocab(self):
        """The tokenizer as constrained decoding sees it (`gateway.constrained.Vocabulary`; built on
        first use, ~2 s for a 128k vocabulary: call it off the event loop)."""
        from gateway.constrained import Vocabulary

        return Vocabulary(self.tokenizer, self.eos_token_ids)

    @cached_property
    def tool_format(self) -> str:
        """How this model writes a tool call (`gateway.tool_formats`), from its template and tokens."""
        from gateway.tool_formats import detect

        return detect(self.tokenizer)

    @property
    def has_fim(self) -> bool:
        vocab = self.tokenizer.get_vocab()
        return all(token in vocab for token in FIM_TOKENS)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its piece as the vocabulary spells it: one
        character per byte for byte-level BPE, `<0x..>` for byte fallback, special tokens whole)."""
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return max((len(piece) for piece in pieces if piece), default=1)

    def check_fits(self, chars: int, param: str) -> None:
        """A 400 for text so long that it cannot fit the context whatever its tokens, before the
        work (and the memory: a 4 MB prompt took ~1 GB) of tokenizing it. Twice the strict bound,
        for normalizers that shrink text."""
        at_least = chars // (2 * self.max_token_chars)
        if at_least > self.max_context:
            from gateway import errors

            raise errors.context_length_exceeded(self.max_context, at_least, param=param)

    def new_token_budget(self, prompt_ids: list[int], requested: int | None, param: str) -> int:
        """New tokens a request may generate, or a 400 when the context cannot hold it (a prompt
        that fills the context is fine when nothing is to be generated: an echo that scores it)."""
        room = self.max_context - len(prompt_ids)
        if room < 0 or (room == 0 and requested != 0) or (requested is not None and requested > room):
            from gateway import errors

            raise errors.context_length_exceeded(self.max_context, len(prompt_ids), requested, param=param)
        return room if requested is None else requested

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        start, hole, middle = FIM_TOKENS
        return f"{start}{prefix}{hole}{suffix}{middle}"


def _eos_ids(path: Path, config: dict, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources = [config.get("eos_token_id")]
    generation = path / "generation_config.json"
    if generation.exists():
        sources.append(json.loads(generation.read_text()).get("eos_token_id"))
    sources.append(tokenizer.eos_token_id)
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(item) for item in source)
    return ids


def load_model(model_id: str, location: str) -> ServedModel:
    from transformers import AutoTokenizer

    from common.model_dir import read_model_config, resolve_model_dir

    path = resolve_model_dir(location)
    config = read_model_config(path)  # standard field names, also for BLOOM / Falcon
    tokenizer = AutoTokenizer.from_pretrained(path)
    max_context = int(config.get("max_position_embeddings") or tokenizer.model_max_length)
    model = ServedModel(
        id=model_id,
        path=path,
        tokenizer=tokenizer,
        num_blocks=int(config["num_hidden_layers"]),
        max_context=max_context,
        eos_token_ids=_eos_ids(path, config, tokenizer),
        hidden_size=int(config.get("hidden_size") or 0),
        vocab_size=int(config.get("vocab_size") or 0),
    )
    model.tool_format  # noqa: B018 - read once here, off the event loop
    model.max_token_chars  # noqa: B018 - computed here, off the event loop (a 150k vocabulary takes ~0.1 s)
    log.info("serving %s from %s (%d blocks, context %d)", model_id, path, model.num_blocks, max_context)
    return model

"""Train the demo code model: a small Llama on the Python standard library's own source, on CPU.

    python -m peer.train_demo --out peer/models/swarm-demo-code     (the committed model, ~25 min)
    swarm demo-model --train --path DIR                              (the same run)

No weights can be downloaded here, but every machine with Python has ~10 MB of well-written code:
the standard library (``sysconfig.get_paths()["stdlib"]``). This module trains on it, from a seed,
and writes a normal Hugging Face folder that ``swarm up`` serves (``peer.demo_model.CODE_MODEL_DIR``).

* **Data.** Every ``.py`` file under the stdlib except tests (``test``, ``tests``, ``idle_test``),
  ``site-packages``, and two folders that are data rather than code (``encodings``: generated
  charmap tables; ``pydoc_data``: the docs as one big dict). The held-out files are chosen by a
  hash of their path relative to the stdlib (``held_out``), never by position, so a machine whose
  stdlib has a few files more or less still agrees on the split of the files both have.
* **Tokenizer.** A byte-level BPE with 4096 entries trained on the training files, with the same
  special tokens (ids 0-8, the FIM tokens the gateway knows among them) and the same ChatML
  template as the random demo model. The demo's 1024-entry tokenizer was trained on a page of
  English prose: on this code it gives 1.6 bytes per token against 3.5 (so a training row holds
  half the code, and a prompt costs twice the steps), with no pieces for indentation runs or
  ``self``. 4096 keeps the embedding small (tied to the LM head: 1 M of the ~4 M parameters).
* **Examples.** Rows of ``context + 1`` tokens packed from three kinds of example.
  Fill-in-the-middle, half of the draws: ``<fim_prefix>P<fim_suffix>S<fim_middle>M</s>``, the
  prompt the gateway builds for ``suffix``, cut from a window of 64-512 characters of whole lines
  (short, so that rows hold several and the end of the prefix is never far from the middle). Half
  of the holes start where an editor's cursor rests (after a space or a symbol, before code), the
  others anywhere; three in four end at a line end (the rest of the line, or one or two more
  lines: the suffix then starts with a newline, as an editor sends it), the others are random
  spans. Chat, a tenth: the request is the first paragraph of a function's docstring, the answer
  is the function in a fenced block, rendered as the chat template does, so a chat request gets
  code back. Plain text, the rest: a random slice of the training files joined by ``</s>``, which
  also fills each row to its end.
* **Training.** The blocks of the random ``demo`` preset (hidden 256, 4 blocks, GQA 8/4 heads, MLP
  688), tied embeddings: ~4 M parameters, 7.9 MB in float16. 2400 steps of 16 x 256 tokens (~10 M
  tokens, ~3.8 passes over the training text), sized to ~22 minutes on 2 idle cores. AdamW,
  linear warm-up then cosine decay, gradient clipping; fp32 on CPU with ``torch.compile`` where a
  C++ compiler is available (~1.7x faster here: the small model's time goes to elementwise ops,
  which it fuses; ``--no-compile`` runs eager, with slightly different weights). A rerun gives
  a model of the same quality, not the same bytes (see the card). The held-out loss is measured every
  ``eval_every`` steps and shown on the progress bar (a log line each when not on a terminal).
* **Output.** Weights in float16 (half the bytes; ``config.json`` asks for float32, so
  ``from_pretrained`` and the peers compute in float32), tokenizer files, a model card
  (``README.md``) and ``training.json`` (configuration, versions, split, loss curve and the final
  figures, all measured on the float16 weights as written).

Figures (``evaluate``): held-out loss per token and bits per byte (comparable across tokenizers)
on chunks of the held-out files, and the share of fill-in-the-middle completions that parse
(``fim_holes``: a hole inside one line of a function from a held-out file, greedy completion,
``ast.parse`` of the function with the completion in place).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import time
import tokenize
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from peer.demo_model import (
    BOS_ID,
    CODE_MODEL_DIR,
    EOS_ID,
    FIM_MIDDLE_ID,
    FIM_PREFIX_ID,
    FIM_SUFFIX_ID,
    IM_END_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    train_tokenizer,
    write_tokenizer,
)

COMMAND = "python -m peer.train_demo --out peer/models/swarm-demo-code"
SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"})
FIM_TEXT = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")  # gateway/models.py FIM_TOKENS


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the weights (with the stdlib's files and the library versions)."""

    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    intermediate_size: int = 688
    context: int = 256  # tokens per training row (the model serves up to max_position_embeddings)
    max_position_embeddings: int = 1024
    batch_size: int = 16
    steps: int = 2400
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    fim_rate: float = 0.5  # chance that the next example of a row is fill-in-the-middle
    chat_rate: float = 0.1  # ... or chat; otherwise plain text fills the rest of the row
    held_out_percent: int = 5
    eval_every: int = 100
    eval_chunks: int = 32  # held-out chunks scored at each evaluation during training
    final_eval_chunks: int = 400  # ... and at the end (all of them when fewer)
    fim_holes: int = 60
    fim_max_tokens: int = 48
    threads: int = 2
    compile: bool = True
    max_files: int = 0  # use only this many training files (0: all); the smoke configuration's knob


# A few steps on a few files with a tiny model: the test suite runs it (seconds).
SMOKE = TrainConfig(
    vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=172, context=64, max_position_embeddings=512, batch_size=8, steps=30, lr=1e-2,
    min_lr=1e-3, warmup_steps=3, eval_every=10, eval_chunks=8, final_eval_chunks=8, fim_holes=4,
    fim_max_tokens=8, compile=False, max_files=12,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def held_out(relative_path: str, percent: int) -> bool:
    """Whether a file is held out: by a hash of its path (posix, relative to the stdlib)."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def source_files(root: Path) -> list[str]:
    """The stdlib's code files as sorted posix paths relative to ``root`` (see the module docstring)."""
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root).as_posix()
        parts = relative.split("/")
        if SKIPPED_DIRS.intersection(parts[:-1]) or parts[0].startswith("config-"):
            continue
        if parts[-1].startswith("_sysconfigdata"):  # describes this machine's build, not code
            continue
        found.append(relative)
    return sorted(found)


def read_source(path: Path) -> str | None:
    """A file's text, decoded as Python does (its coding cookie), with newlines normalised."""
    try:
        with tokenize.open(path) as handle:
            return handle.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


@dataclass
class Corpus:
    root: Path
    train: dict[str, str]
    held_out: dict[str, str]

    @classmethod
    def load(cls, root: Path | None, held_out_percent: int, max_files: int = 0) -> Corpus:
        root = Path(root) if root else stdlib_root()
        train: dict[str, str] = {}
        held: dict[str, str] = {}
        for relative in source_files(root):
            text = read_source(root / relative)
            if text and text.strip():
                (held if held_out(relative, held_out_percent) else train)[relative] = text
        if max_files:
            train = dict(list(train.items())[:max_files])
            held = dict(list(held.items())[: max(2, max_files // 4)])
        if not train or not held:
            raise RuntimeError(f"no Python sources to train on under {root}")
        return cls(root, train, held)

    def summary(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "train_files": len(self.train),
            "train_bytes": sum(len(text.encode()) for text in self.train.values()),
            "held_out_files": len(self.held_out),
            "held_out_bytes": sum(len(text.encode()) for text in self.held_out.values()),
            "held_out": sorted(self.held_out),
        }


# ---------------------------------------------------------------------------------------------
# Examples


def chat_text(request: str, answer: str) -> str:
    """One user turn and the assistant's answer, as ``CHAT_TEMPLATE`` renders them (tested)."""
    return f"<s><|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def documented_functions(text: str) -> list[tuple[str, str]]:
    """(request, answer) pairs from a file: the first paragraph of each function's docstring, and
    the function's source (dedented, decorators left out) in a fenced block."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        request = " ".join(doc.split("\n\n")[0].split())
        if not 10 <= len(request) <= 300:
            continue
        source = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).rstrip()
        pairs.append((request, f"```python\n{source}\n```"))
    return pairs


class Examples:
    """Packed training rows, drawn with ``rng`` (the data order is part of the seed)."""

    def __init__(self, tokenizer, texts: Sequence[str], config: TrainConfig, rng: random.Random):
        import numpy as np

        self.tokenizer = tokenizer
        self.config = config
        self.rng = rng
        self.texts = list(texts)
        self.row_length = config.context + 1
        stream: list[int] = []
        for encoding in tokenizer.encode_batch(self.texts, add_special_tokens=False):
            stream.extend(encoding.ids)
            stream.append(EOS_ID)
        self.stream = np.asarray(stream, dtype=np.int64)
        # files drawn for fill-in-the-middle in proportion to their length
        self.cumulative = list(np.cumsum([len(text) for text in self.texts]))
        self.chats = []
        pairs = [pair for text in self.texts for pair in documented_functions(text)]
        rendered = [chat_text(request, answer) for request, answer in pairs]
        for encoding in tokenizer.encode_batch(rendered, add_special_tokens=False):
            if len(encoding.ids) <= self.row_length:
                self.chats.append(encoding.ids)

    @property
    def stream_tokens(self) -> int:
        return len(self.stream)

    def batch(self):
        import torch

        rows = [self.row() for _ in range(self.config.batch_size)]
        return torch.tensor(rows, dtype=torch.long)

    def row(self) -> list[int]:
        config, rng = self.config, self.rng
        row: list[int] = []
        while len(row) < self.row_length:
            room = self.row_length - len(row)
            draw = rng.random()
            example = None
            if draw < config.fim_rate:
                example = self.fim()
            elif draw < config.fim_rate + config.chat_rate and self.chats:
                example = self.chats[rng.randrange(len(self.chats))]
            if example is None or len(example) > room:  # plain text fills the rest of the row
                start = rng.randrange(len(self.stream) - room)
                example = self.stream[start : start + room].tolist()
            row.extend(example)
        return row

    def fim(self) -> list[int] | None:
        """``<fim_prefix>P<fim_suffix>S<fim_middle>M</s>`` from a window of whole lines of a file."""
        rng = self.rng
        text = self.texts[_bisect(self.cumulative, rng.randrange(self.cumulative[-1]))]
        # short windows: several examples per row, and the end of the prefix close to the middle
        budget = rng.randint(64, 2 * self.config.context)  # characters
        if len(text) > budget:
            start = text.rfind("\n", 0, rng.randrange(len(text) - budget)) + 1
            end = text.rfind("\n", start, start + budget) + 1 or start + budget
            text = text[start:end]
        if len(text) < 8:
            return None
        cut = rng.randrange(len(text) - 1)
        if rng.random() < 0.5:  # where an editor's cursor rests: after a space or a symbol, before code
            cut = _boundary_after(text, cut)
        if rng.random() < 0.75:  # to the end of this line (or of one or two more)
            end = _line_end(text, cut + 1)
            for _ in range(rng.choice((0, 0, 0, 1, 2))):
                end = _line_end(text, end + 1)
        else:
            end = min(len(text), cut + rng.randint(1, 160))
        prefix, middle, suffix = (
            encoding.ids
            for encoding in self.tokenizer.encode_batch(
                [text[:cut], text[cut:end], text[end:]], add_special_tokens=False
            )
        )
        return [FIM_PREFIX_ID, *prefix, FIM_SUFFIX_ID, *suffix, FIM_MIDDLE_ID, *middle, EOS_ID]


def _boundary_after(text: str, start: int) -> int:
    """The first position from ``start`` after a character that ends a word (a space, a bracket, an
    operator...) and before one that is not a space; ``start`` itself when there is none."""
    for i in range(max(1, start), len(text) - 1):
        if not (text[i - 1].isalnum() or text[i - 1] == "_" or text[i].isspace()):
            return i
    return start


def _line_end(text: str, start: int) -> int:
    end = text.find("\n", start)
    return len(text) if end < 0 else end


def _bisect(cumulative: list[int], value: int) -> int:
    import bisect

    return bisect.bisect_right(cumulative, value)


# ---------------------------------------------------------------------------------------------
# Figures


def held_out_chunks(texts: Iterable[str], count: int, chars: int = 700) -> list[str]:
    """``count`` pieces of ~``chars`` characters (whole lines), spread evenly over ``texts``."""
    chunks = []
    for text in texts:
        start = 0
        while start < len(text):
            end = text.rfind("\n", start, start + chars) + 1
            if end <= start:
                end = min(len(text), start + chars)
            if text[start:end].strip():
                chunks.append(text[start:end])
            start = end
    if count and len(chunks) > count:
        step = len(chunks) / count
        chunks = [chunks[int(i * step)] for i in range(count)]
    return chunks


def token_bytes(tokenizer) -> list[int]:
    """Bytes each id stands for in a byte-level BPE (one byte per character of its vocabulary
    entry); special tokens and ``<extra_N>`` padding count 0."""
    sizes = [0] * len(tokenizer)
    special = set(tokenizer.all_special_tokens) | set(SPECIAL_TOKENS)
    for token, token_id in tokenizer.get_vocab().items():
        if token not in special and not token.startswith("<extra_"):
            sizes[token_id] = len(token)
    return sizes


def score(model, tokenizer, chunks: Sequence[str], context: int, batch_size: int = 16) -> dict[str, float]:
    """Held-out figures of ``model`` on ``chunks`` (each tokenized alone and cut to ``context + 1``
    tokens; every token after the first is predicted): loss per token, perplexity, bits per byte."""
    import torch

    sizes = token_bytes(tokenizer)
    rows = tokenizer(list(chunks), add_special_tokens=False, truncation=True, max_length=context + 1)[
        "input_ids"
    ]
    nats = 0.0
    tokens = 0
    size = 0
    model.eval()
    with torch.inference_mode():
        for first in range(0, len(rows), batch_size):
            group = [row for row in rows[first : first + batch_size] if len(row) > 1]
            width = max(len(row) for row in group)
            ids = torch.full((len(group), width), PAD_ID, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for i, row in enumerate(group):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nats += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum", ignore_index=-100
            ).item()
            tokens += int(mask[:, 1:].sum())
            size += sum(sizes[token] for row in group for token in row[1:])
    loss = nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / size,
        "tokens": tokens,
        "bytes": size,
    }


@dataclass(frozen=True)
class Hole:
    """A function from a held-out file with a hole from a point inside one line to its end."""

    path: str
    function: str
    prefix: str
    middle: str
    suffix: str


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def fim_holes(texts: dict[str, str], count: int, seed: int = 0, max_chars: int = 700) -> list[Hole]:
    """Up to ``count`` holes, at most one per function (dedented, 4-30 lines, ASCII), chosen
    deterministically from ``texts`` ({path: source}).

    The hole starts strictly inside the value of a one-line ``return``, assignment or call and runs
    to the end of that line, so the suffix starts with a newline: what an editor sends when the
    cursor is inside a line. A hole whose empty completion would already parse is skipped.
    """
    holes = []
    for path in sorted(texts):
        try:
            tree = ast.parse(texts[path])
        except (SyntaxError, ValueError):
            continue
        lines = texts[path].splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            source = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
            if not (4 <= source.count("\n") <= 30 and len(source) <= max_chars and source.isascii()):
                continue
            hole = _hole_in(source, random.Random(f"{seed}:{path}:{node.lineno}"))
            if hole:
                holes.append(Hole(path, node.name, *hole))
    random.Random(seed).shuffle(holes)
    return sorted(holes[:count], key=lambda hole: (hole.path, hole.function))


def _hole_in(source: str, rng: random.Random) -> tuple[str, str, str] | None:
    try:
        function = ast.parse(source)
    except SyntaxError:
        return None
    values = []
    for node in ast.walk(function):
        if isinstance(node, ast.Return | ast.Assign | ast.AugAssign | ast.Expr) and node.value is not None:
            value = node.value
            if isinstance(node, ast.Expr) and not isinstance(value, ast.Call):
                continue  # docstrings and other bare expressions
            if node.lineno == node.end_lineno == value.lineno == value.end_lineno:
                values.append(value)
    rng.shuffle(values)
    offsets = [0]
    for line in source.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    for value in values:
        start = offsets[value.lineno - 1] + value.col_offset  # ASCII: byte offsets are characters
        end = offsets[value.lineno - 1] + value.end_col_offset
        if end - start < 2:
            continue
        cut = rng.randrange(start + 1, end)
        line_end = source.index("\n", cut)
        prefix, middle, suffix = source[:cut], source[cut:line_end], source[line_end:]
        if not _parses(prefix + suffix):
            return prefix, middle, suffix
    return None


def fim_prompt(prefix: str, suffix: str) -> str:
    """The prompt the gateway builds for a completion with ``suffix`` (gateway/models.py)."""
    start, hole, middle = FIM_TEXT
    return f"{start}{prefix}{hole}{suffix}{middle}"


def complete(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy completion of ``prompt`` up to an end token (``</s>`` or ``<|im_end|>``), as text."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=PAD_ID,
        )  # fmt: skip
    new = [token for token in out[0, len(ids) :].tolist() if token not in (EOS_ID, IM_END_ID)]
    return tokenizer.decode(new)


def fim_parse_rate(model, tokenizer, holes: Sequence[Hole], max_new_tokens: int) -> dict[str, Any]:
    """Share of holes whose greedy completion makes the function parse, and of exact ones."""
    parsed = exact = 0
    for hole in holes:
        middle = complete(model, tokenizer, fim_prompt(hole.prefix, hole.suffix), max_new_tokens)
        parsed += _parses(hole.prefix + middle + hole.suffix)
        exact += middle.strip() == hole.middle.strip()
    return {"holes": len(holes), "parse_rate": parsed / len(holes), "exact_rate": exact / len(holes)}


def evaluate(model_dir: Path, corpus: Corpus, config: TrainConfig) -> dict[str, Any]:
    """The figures of the card for the model in ``model_dir`` (float32 compute)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunks = held_out_chunks(corpus.held_out.values(), config.final_eval_chunks)
    holes = fim_holes(corpus.held_out, config.fim_holes, config.seed)
    return {
        "held_out": score(model, tokenizer, chunks, config.context) | {"chunks": len(chunks)},
        "fim": fim_parse_rate(model, tokenizer, holes, config.fim_max_tokens) if holes else None,
    }


def random_demo_figures(corpus: Corpus, config: TrainConfig) -> dict[str, Any]:
    """The same figures for the random-weight ``demo`` preset that ``swarm up`` served before."""
    from peer.demo_model import create_demo_model

    with tempfile.TemporaryDirectory() as folder:
        figures = evaluate(create_demo_model(Path(folder) / "demo", preset="demo"), corpus, config)
    return {
        "loss": figures["held_out"]["loss"],
        "bits_per_byte": figures["held_out"]["bits_per_byte"],
        "fim_parse_rate": figures["fim"]["parse_rate"] if figures["fim"] else None,
    }


# ---------------------------------------------------------------------------------------------
# Training


def _lr(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def llama_config(config: TrainConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        initializer_range=0.02, hidden_act="silu", tie_word_embeddings=True,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )  # fmt: skip


@dataclass
class Run:
    """What a training run reports: the curve as it goes, the figures at the end."""

    config: TrainConfig
    curve: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def train(
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    root: Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> Run:
    """Train on the stdlib under ``root`` (default: this interpreter's) and write the folder ``out``.

    The folder is written under a temporary name next to ``out`` and renamed into place at the end.
    """
    import torch
    from tokenizers import Tokenizer
    from tqdm import tqdm
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    progress = sys.stderr.isatty() if progress is None else progress
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    # Compiled code adds into the embedding's gradient with atomic adds, whose order varies from
    # run to run; in deterministic mode inductor keeps aten's ordered kernel for that instead.
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    started = time.monotonic()
    run = Run(config)
    try:
        corpus = Corpus.load(root, config.held_out_percent, config.max_files)
        log(
            f"stdlib {corpus.root}: {len(corpus.train)} training files, {len(corpus.held_out)} held out "
            f"(Python {platform.python_version()})"
        )
        write_tokenizer(
            staging, train_tokenizer(corpus.train.values(), config.vocab_size), config.max_position_embeddings
        )
        fast = Tokenizer.from_file(str(staging / "tokenizer.json"))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(staging)
        rng = random.Random(config.seed)
        examples = Examples(fast, list(corpus.train.values()), config, rng)
        log(f"{examples.stream_tokens:,} training tokens, {len(examples.chats):,} chat examples")
        eval_chunks = held_out_chunks(corpus.held_out.values(), config.eval_chunks)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = LlamaForCausalLM(llama_config(config))
        parameters = sum(p.numel() for p in model.parameters())
        log(
            f"model: {parameters:,} parameters; {config.steps} steps of {config.batch_size}x{config.context} tokens"
        )
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=True,
        )  # fmt: skip

        def loss_of(batch):
            logits = model(input_ids=batch[:, :-1]).logits
            return torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
            )

        step_loss = loss_of
        compiled = False
        if config.compile:
            try:
                step_loss = torch.compile(loss_of)
                compiled = True
            except Exception as exc:  # noqa: BLE001 - no compiler: eager works, only slower
                log(f"torch.compile unavailable ({type(exc).__name__}: {exc}); training eager")

        bar = tqdm(total=config.steps, desc="training", unit="step", disable=not progress)
        train_loss = float("nan")
        for step in range(config.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, config)
            model.train()
            batch = examples.batch()
            try:
                loss = step_loss(batch)
            except Exception as exc:
                if not compiled or step:
                    raise
                log(f"torch.compile failed ({type(exc).__name__}); training eager")
                step_loss, compiled = loss_of, False
                loss = step_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            train_loss = value if math.isnan(train_loss) else 0.9 * train_loss + 0.1 * value
            bar.update()
            last = step + 1 == config.steps
            if (step + 1) % config.eval_every == 0 or last or step == 0:
                held = score(model, tokenizer, eval_chunks, config.context)["loss"]
                point = {
                    "step": step + 1,
                    "tokens": (step + 1) * config.batch_size * config.context,
                    "train_loss": round(train_loss, 4),
                    "held_out_loss": round(held, 4),
                    "seconds": round(time.monotonic() - started, 1),
                }
                run.curve.append(point)
                bar.set_postfix(loss=f"{train_loss:.3f}", held_out=f"{held:.3f}")
                if not progress:
                    log(
                        f"step {point['step']}/{config.steps}  train loss {train_loss:.3f}  "
                        f"held-out loss {held:.3f}  {point['seconds']:.0f} s"
                    )
            else:
                bar.set_postfix(loss=f"{train_loss:.3f}", held_out=f"{run.curve[-1]['held_out_loss']:.3f}")
        bar.close()
        train_seconds = time.monotonic() - started

        model.generation_config.bos_token_id = BOS_ID
        model.generation_config.eos_token_id = [EOS_ID, IM_END_ID]
        model.generation_config.pad_token_id = PAD_ID
        model.to(torch.float16).save_pretrained(staging)
        config_file = staging / "config.json"
        saved = json.loads(config_file.read_text())
        saved["dtype"] = "float32"  # stored in float16, computed in float32 (see the module docstring)
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

        log("measuring the held-out figures on the float16 weights as written ...")
        figures = evaluate(staging, corpus, config)
        log("... and on the random-weight demo model, for comparison")
        figures["random_demo"] = random_demo_figures(corpus, config)
        run.summary = {
            "command": COMMAND if config == TrainConfig() else None,
            "config": asdict(config),
            "parameters": parameters,
            "weights_bytes": (staging / "model.safetensors").stat().st_size,
            "train_tokens_seen": config.steps * config.batch_size * config.context,
            "train_stream_tokens": examples.stream_tokens,
            "chat_examples": len(examples.chats),
            "train_seconds": round(train_seconds, 1),
            "compiled": compiled,
            "threads": config.threads,
            "python": platform.python_version(),
            "versions": _versions(),
            "machine": platform.machine(),
            "stdlib": corpus.summary(),
            **figures,
            "samples": samples(staging),
            "curve": run.curve,
        }
        (staging / "training.json").write_text(json.dumps(run.summary, indent=1) + "\n")
        (staging / "README.md").write_text(model_card(run.summary))
        staging.chmod(0o755)  # mkdtemp's 0700 would follow the folder into place
        for file in staging.iterdir():
            file.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        log(
            f"wrote {out}: held-out loss {figures['held_out']['loss']:.3f} "
            f"(perplexity {figures['held_out']['perplexity']:.1f}, "
            f"{figures['held_out']['bits_per_byte']:.3f} bits/byte) in {train_seconds / 60:.1f} min"
        )
        return run
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "tokenizers")}


# The README's three requests (greedy): a completion that stops before the next function, an
# editor's fill-in-the-middle with the cursor inside a line, and a chat turn.
SAMPLE_PROMPTS = {
    "completion": "def fibonacci(n):",
    "completion_stop": "\ndef ",
    "fim": ("def read_text(path):\n    with open(path) as f:\n        return ", "\n"),
    "chat": "Hello!",
}


def samples(model_dir: Path, max_new_tokens: int = 64) -> dict[str, str]:
    """Greedy answers to the README's three requests, as the swarm gives them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": SAMPLE_PROMPTS["chat"]}], tokenize=False, add_generation_prompt=True
    )
    completion = complete(model, tokenizer, SAMPLE_PROMPTS["completion"], max_new_tokens)
    return {
        "completion": completion.split(SAMPLE_PROMPTS["completion_stop"])[0],
        "fim": complete(model, tokenizer, fim_prompt(*SAMPLE_PROMPTS["fim"]), max_new_tokens),
        "chat": complete(model, tokenizer, chat, max_new_tokens),
    }


# ---------------------------------------------------------------------------------------------
# The model card


def model_card(summary: dict[str, Any]) -> str:
    """The folder's README.md, from its ``training.json``."""
    config = summary["config"]
    held = summary["held_out"]
    fim = summary["fim"] or {"holes": 0, "parse_rate": float("nan"), "exact_rate": float("nan")}
    stdlib = summary["stdlib"]
    minutes = summary["train_seconds"] / 60
    random_demo = summary["random_demo"]
    samples = summary["samples"]
    command = summary["command"] or "(not the default configuration: see training.json)"
    curve = "\n".join(
        f"| {p['step']} | {p['tokens'] / 1e6:.2f} M | {p['train_loss']:.3f} | {p['held_out_loss']:.3f} "
        f"| {p['seconds'] / 60:.1f} |"
        for p in summary["curve"]
    )
    versions = ", ".join(f"{name} {version}" for name, version in summary["versions"].items())
    fim_prefix, fim_suffix = SAMPLE_PROMPTS["fim"]
    lines = [
        "---",
        "license: other",
        "license_name: psf-2.0",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llama, code, python, fill-in-the-middle, demo]",
        "---",
        "",
        "# swarm-demo-code",
        "",
        f"A {summary['parameters'] / 1e6:.1f} M-parameter Llama trained for {minutes:.0f} minutes on "
        f"{summary['threads']} CPU cores on the source of Python {summary['python']}'s standard library, "
        "with fill-in-the-middle and chat examples mixed in. It is the model `swarm up` serves (as "
        f"`swarm-demo`): small enough to commit ({summary['weights_bytes'] / 1e6:.1f} MB of float16 "
        "safetensors), good enough that what comes back looks like Python. It is a code model and a demo "
        "of the serving, not an assistant.",
        "",
        "## Figures",
        "",
        "Measured on the float16 weights as written (computed in float32), on standard-library files it "
        f"never trained on ({stdlib['held_out_files']} files, {stdlib['held_out_bytes'] / 1e3:.0f} kB, "
        "chosen by a hash of their path; listed in `training.json`):",
        "",
        "| figure | this model | random-weight `demo` preset |",
        "| --- | --: | --: |",
        f"| held-out loss, nats per token | {held['loss']:.3f} | {random_demo['loss']:.3f} (own tokenizer) |",
        f"| held-out perplexity, per token | {held['perplexity']:.1f} | |",
        f"| held-out bits per byte | {held['bits_per_byte']:.3f} | {random_demo['bits_per_byte']:.3f} |",
        f"| fill-in-the-middle completions that parse ({fim['holes']} holes, greedy) | {fim['parse_rate']:.0%} "
        f"| {random_demo['fim_parse_rate']:.0%} |",
        f"| ... that give back exactly what was there | {fim['exact_rate']:.0%} | |",
        f"| parameters | {summary['parameters']:,} | |",
        f"| training time ({summary['threads']} threads, `torch.compile` {'on' if summary['compiled'] else 'off'})"
        f" | {minutes:.1f} min | |",
        f"| tokens seen | {summary['train_tokens_seen'] / 1e6:.1f} M | |",
        "",
        f"Loss, perplexity and bits per byte are over {held['chunks']} chunks of ~700 characters "
        f"({held['tokens']:,} tokens of the model's 4096-entry vocabulary; bits per byte compare across "
        "tokenizers). A fill-in-the-middle hole cuts one line of a held-out function (a `return`, an "
        "assignment or a call) at a point inside its value and asks for the rest of the line, the way an "
        "editor does with the cursor inside a line; a completion counts when the function with it in place "
        "passes `ast.parse` (`fim_holes` in `peer/train_demo.py`).",
        "",
        "## What it was trained on",
        "",
        f"* {stdlib['train_files']} `.py` files ({stdlib['train_bytes'] / 1e6:.1f} MB) of the standard library "
        f"of CPython {summary['python']} ({summary['machine']}): everything but the tests, `site-packages`, "
        "`encodings` and `pydoc_data`. The standard library is under the Python Software Foundation "
        "License, which is why this card names it.",
        f"* Rows of {config['context']} tokens packed from fill-in-the-middle examples "
        f"(`<fim_prefix>…<fim_suffix>…<fim_middle>…</s>`, {config['fim_rate']:.0%} of draws), chat examples "
        f"({config['chat_rate']:.0%}: the first paragraph of a function's docstring as the request, the function "
        f"in a fenced block as the answer; {summary['chat_examples']:,} of them) and plain text, "
        f"{summary['train_tokens_seen'] / summary['train_stream_tokens']:.1f} times the "
        f"{summary['train_stream_tokens'] / 1e6:.1f} M tokens of the training files in all.",
        f"* A byte-level BPE tokenizer of {config['vocab_size']} entries trained on the same files, with the "
        "special tokens (FIM tokens included) and the ChatML template of the random demo model.",
        f"* {config['steps']} steps of {config['batch_size']} × {config['context']} tokens; AdamW, lr "
        f"{config['lr']:g} after {config['warmup_steps']} warm-up steps, cosine to {config['min_lr']:g}, weight "
        f"decay {config['weight_decay']:g}, seed {config['seed']}. Hidden size {config['hidden_size']}, "
        f"{config['num_hidden_layers']} blocks, {config['num_attention_heads']} heads "
        f"({config['num_key_value_heads']} KV heads), MLP {config['intermediate_size']}, tied embeddings. "
        f"{versions}.",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        "Two runs of the same configuration in one process give the same bytes (the test suite checks "
        "this on a small configuration), but a rerun of this command is not byte-identical: on the same "
        "machine it followed the same curve to within ~0.02 nats of held-out loss (step 300: 4.627 against "
        "4.643 below). Expect a model of the same quality, not these exact weights; another CPU, thread "
        "count or Python's stdlib also changes the bytes. The held-out loss as training went:",
        "",
        "| step | tokens | train loss | held-out loss | minutes |",
        "| --: | --: | --: | --: | --: |",
        curve,
        "",
        "## What it cannot do",
        "",
        "* Follow instructions, answer questions or hold a conversation: a chat request gets a Python "
        "function in a fenced block, whose docstring is at best loosely related to the request, because "
        "that is all it ever saw after a user turn.",
        "* Write correct programs: it writes code that looks right, for a few lines. It knows nothing "
        "outside the standard library, and greedy decoding soon repeats itself.",
        f"* Read long prompts with skill: it was trained on {config['context']}-token windows (the config "
        f"allows {config['max_position_embeddings']}).",
        "* Anything but Python: it saw no other language, and little prose beyond docstrings and comments.",
        "",
        "## Samples (greedy, 64 tokens at most; `swarm up` gives the same)",
        "",
        f"Completion of `def fibonacci(n):`, stopped at `{SAMPLE_PROMPTS['completion_stop']!r}`",
        "",
        "```python",
        "def fibonacci(n):" + samples["completion"],
        "```",
        "",
        f"Fill in the middle, prefix `{fim_prefix!r}` and suffix `{fim_suffix!r}`: the middle is "
        f"`{samples['fim']}`, so the editor shows",
        "",
        "```python",
        fim_prefix + samples["fim"] + fim_suffix.rstrip("\n"),
        "```",
        "",
        f"Chat: `{SAMPLE_PROMPTS['chat']}`",
        "",
        "~~~markdown",
        samples["chat"],
        "~~~",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=CODE_MODEL_DIR, help="folder to write (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the data order")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the committed run's)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 2)")
    parser.add_argument("--stdlib", type=Path, default=None, help="stdlib folder (default: this Python's)")
    parser.add_argument("--smoke", action="store_true", help="the test suite's tiny configuration (seconds)")
    parser.add_argument("--no-compile", action="store_true", help="train eager, without torch.compile")
    parser.add_argument(
        "--card",
        action="store_true",
        help="only take the samples again and rewrite README.md from training.json",
    )
    return parser


def config_from(args: argparse.Namespace) -> TrainConfig:
    config = SMOKE if args.smoke else TrainConfig()
    changes: dict[str, Any] = {"seed": args.seed}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.threads is not None:
        changes["threads"] = args.threads
    if args.no_compile:
        changes["compile"] = False
    return replace(config, **changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.card:
        summary = json.loads((args.out / "training.json").read_text())
        summary["samples"] = samples(args.out)
        (args.out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
        (args.out / "README.md").write_text(model_card(summary))
    else:
        train(config_from(args), args.out, root=args.stdlib)
    return 0


if __name__ == "__main__":
    sys.exit(main())

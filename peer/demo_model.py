"""Write a small random-weight Llama as a normal Hugging Face folder, from a fixed seed.

There is no model hub here, so the demo, the tests and the benchmarks all use models made by this
module. The folder loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` like any checkpoint:

* ``config.json``, ``generation_config.json``, ``model.safetensors``: ``LlamaForCausalLM(config)``
  initialised by transformers itself (normal, std = ``initializer_range``) under
  ``torch.manual_seed(seed)``; the caller's RNG state is left untouched. Same seed => same bytes.
* ``tokenizer.json`` + ``tokenizer_config.json``: a byte-level BPE trained (in ~50 ms) on the small
  English corpus below, special tokens ``<unk> <s> </s> <|im_start|> <|im_end|> <fim_prefix>
  <fim_middle> <fim_suffix> <pad>`` at ids 0-8, and a ChatML-like Jinja ``chat_template``.

The tokenizer has exactly ``vocab_size`` entries so that every id the random model samples decodes
to something. The ids the corpus cannot fill are plain vocabulary entries ``<extra_N>``: no merge
ever produces them, so they never appear when encoding, and they decode to their own text. (Filling
them with ``added_tokens`` instead works too, but 30k added tokens make ``AutoTokenizer`` load in
~1.5 s instead of ~0.05 s and would match ``<extra_N>`` typed by a user.)

Presets (any config field can be overridden by keyword, e.g. ``vocab_size=1000``):

=========  ======  ======  =====  ========  =====  ======  ====================================
preset     hidden  layers  heads  kv heads  inter  vocab   use
=========  ======  ======  =====  ========  =====  ======  ====================================
``demo``   256     4       8      4         688    1024    ``swarm up`` demo, most tests (~3 M)
``tiny``   128     3       4      2         344    512     fast tests; tied embeddings
``bench``  1024    8       16     4         2816   32000   load tests: ~156 M parameters, fp32
=========  ======  ======  =====  ========  =====  ======  ====================================
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<pad>",
)
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID, FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID, PAD_ID = range(9)
MARKER = ".complete"
# The trained demo model committed with the package (peer/train_demo.py wrote it): `swarm up` serves it.
CODE_MODEL_DIR = Path(__file__).resolve().parent / "models" / "swarm-demo-code"

_COMMON: dict[str, Any] = {
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "hidden_act": "silu",
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "tie_word_embeddings": False,
}
# demo/tiny use initializer_range 0.1 instead of HF's 0.02: at 0.02 a small random model's greedy
# output collapses into one repeated token (top-2 logit gaps ~1e-4), which makes a dull demo and a
# weak exactness test; at 0.1 greedy text varies (63 distinct ids in 64 steps).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 688,
        "vocab_size": 1024,
        "initializer_range": 0.1,
    },
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 344,
        "vocab_size": 512,
        "tie_word_embeddings": True,
        "initializer_range": 0.1,
    },
    # 4 KV heads is what makes this the 156M model the DESIGN numbers were measured on
    # (with 16 KV heads it would be 168M).
    "bench": {
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "intermediate_size": 2816,
        "vocab_size": 32000,
    },
}

# ChatML with a leading BOS. Content may be a string or a list of OpenAI content parts (only
# "text" parts are rendered); None content (an assistant turn with tool calls) renders empty.
# With `tools`, a system turn lists them and the call format the gateway parses (`gateway/tools.py`);
# an assistant turn's tool calls render in that format. Without tools the output is unchanged.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|im_start|>system\\nYou can call these tools. To call one, answer with '"
    ' + \'<tool_call>{"name": <name>, "arguments": <object>}</tool_call>\\n\' }}'
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% set content = message['content'] %}"
    "{% if content is string %}{{ content }}"
    "{% elif content is not none %}"
    "{% for part in content %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set arguments = call['function']['arguments'] %}"
    "{{ '<tool_call>{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' }}"
    "{% if arguments is string %}{{ arguments }}{% else %}{{ arguments | tojson }}{% endif %}"
    "{{ '}</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The lighthouse keeper climbed the stairs every evening at six. There were one hundred and twelve
steps, and he knew each of them by the sound it made under his boots. At the top he wiped the
glass, trimmed the wick, and watched the ships come home before the storm.

A good recipe for bread needs only four things: flour, water, salt and time. Mix the flour with
warm water, let it rest for an hour, then add the salt and fold the dough every thirty minutes.
Bake it in a very hot oven until the crust sings when you tap it.

The river starts as a small spring in the mountains. It runs through forests and farms, under old
stone bridges and past the busy harbor of the city, where it finally meets the sea. Children on
the bank throw sticks into the water and race them to the next bridge.

Computers are patient machines. They follow instructions exactly, one step after another, and
they never get bored. A program is a list of such instructions written in a language that both
people and machines can read. When a program has a bug, the computer still does exactly what it
was told, which is not always what we meant.

In the spring the garden wakes up slowly. First come the green tips of the tulips, then the
apple tree covers itself with white flowers, and bees arrive from the neighbor's hives. By the
summer there are tomatoes, beans, and more zucchini than anyone can eat.

Hello! How are you today? I am fine, thank you. Could you tell me the way to the station? Go
straight ahead, turn left at the bakery, and you will see it on your right. It takes about ten
minutes on foot, or two stops by bus.

The small robot looked at the stars and asked its friend what they were made of. Mostly hydrogen
and helium, said the friend, burning for billions of years. The robot thought about this for a
long time and then decided that it, too, would like to shine.

def greet(name):
    return "Hello, " + name + "!"

for i in range(10):
    print(i, greet("world"))

Numbers are everywhere: 1, 2, 3, 10, 42, 100, 2024, 3.14 and 0.5. A week has 7 days, a year has
12 months, and a good night of sleep lasts about 8 hours. Questions, answers, lists; quotes,
"dialogue", and (parentheses) all help a tokenizer learn the shape of ordinary text.
"""


def model_config(preset: str = "demo", **overrides: Any) -> dict[str, Any]:
    """The ``LlamaConfig`` keyword arguments of a preset with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return {**_COMMON, **PRESETS[preset], **overrides}


def create_demo_model(
    path: str | os.PathLike[str], *, preset: str = "demo", seed: int = 0, **config_overrides: Any
) -> Path:
    """Write a random-weight Llama folder (weights, config, tokenizer) to ``path`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    kwargs = model_config(preset, **config_overrides)
    try:
        config = LlamaConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid model config {kwargs}: {exc}") from exc
    minimum = 256 + len(SPECIAL_TOKENS)  # byte-level BPE: every byte needs a token
    if config.vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be >= {minimum} for a byte-level tokenizer, got {config.vocab_size}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    # a bar on a terminal only (the bench preset takes a few seconds); logs and tests stay clean
    bar = tqdm(total=3, desc=f"writing the {preset} model", unit="step", disable=not sys.stderr.isatty())
    _write_tokenizer(path, config.vocab_size, config.max_position_embeddings)
    bar.update()
    # fork_rng: seed transformers' init without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    bar.update()
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = [EOS_ID, IM_END_ID]  # </s> for text, <|im_end|> for chat
    model.generation_config.pad_token_id = PAD_ID
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise in CLIs and tests
    try:
        model.save_pretrained(path)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    bar.update()
    bar.close()
    return path


def ensure_demo_model(
    cache_dir: str | os.PathLike[str], *, preset: str = "demo", seed: int = 0, **config_overrides: Any
) -> Path:
    """Return ``cache_dir/<name>`` holding the model, creating it first if needed.

    The folder is written under a temporary name, its marker file last, and renamed into place,
    so a crash or a concurrent creator never leaves a half-written folder that looks usable.
    """
    kwargs = model_config(preset, **config_overrides)
    name = f"{preset}-seed{seed}"
    if config_overrides:
        digest = hashlib.sha256(
            json.dumps(config_overrides, sort_keys=True, default=str).encode()
        ).hexdigest()
        name += f"-{digest[:10]}"
    cache_dir = Path(cache_dir)
    final = cache_dir / name
    if (final / MARKER).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        create_demo_model(staging, preset=preset, seed=seed, **config_overrides)
        (staging / MARKER).write_text(
            json.dumps({"preset": preset, "seed": seed, "config": kwargs}, default=str)
        )
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # left by a crashed writer of an older version
        try:
            staging.rename(final)
        except OSError:
            if not (final / MARKER).is_file():  # not "someone else won the race": a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _write_tokenizer(path: Path, vocab_size: int, max_length: int) -> None:
    """Train the byte-level BPE on the small corpus above and write both tokenizer files."""
    write_tokenizer(path, train_tokenizer(CORPUS.split("\n\n"), vocab_size), max_length)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> dict[str, Any]:
    """A byte-level BPE trained on ``texts`` with ``SPECIAL_TOKENS`` at ids 0-8, as the JSON of a
    ``tokenizer.json``, its vocabulary padded to exactly ``vocab_size`` entries (``<extra_N>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)

    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # Pad with entries no merge produces (see the module docstring for why not added tokens).
    for token_id in range(len(vocab), vocab_size):
        vocab[f"<extra_{token_id}>"] = token_id
    if len(vocab) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(vocab)} entries, expected {vocab_size}")
    return data


def write_tokenizer(path: Path, data: dict[str, Any], max_length: int) -> None:
    """Write ``tokenizer.json`` (``data``) and a ``tokenizer_config.json`` with the chat template."""
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))


def main(argv: list[str] | None = None) -> None:
    """``python -m peer.demo_model PATH [--preset demo] [--seed 0]`` (the CLI has ``demo-model``)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(create_demo_model(args.path, preset=args.preset, seed=args.seed))


if __name__ == "__main__":
    main()

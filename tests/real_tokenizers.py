"""Real tokenizers of several families, offline: llama.cpp's vocab-only GGUF files.

No model hub is reachable here, but the source distribution of ``llama-cpp-python`` on PyPI
carries llama.cpp's vocab-only GGUF files (``vendor/llama.cpp/models/ggml-vocab-*.gguf``), the
real vocabularies, merges and special tokens of the families it tests. `loadtests.vocabs`
downloads that sdist once with pip (76 MB; the test setup runs this module:
``bash deploy/setup.sh test``), and ``tokenizer_folder(name)`` converts one GGUF to a model folder's
tokenizer files (``tokenizer.json`` + ``tokenizer_config.json`` with a chat template) once, cached
outside the repository (``$SWARM_VOCAB_CACHE``, default ``~/.cache/swarm-serve``). Nothing of it is
committed.

Chat templates: the Qwen2 and Phi-3 GGUFs carry their own, used as they are, except that Qwen2's
has no tools, so the Qwen (Hermes) format with tools is written here (``QWEN_TOOLS``), following
Qwen2.5's published template. The other GGUFs carry none: each family's well-known format is
written here in our own words (Llama 3.1 with its JSON tool calls, Mistral with
``[AVAILABLE_TOOLS]`` / ``[TOOL_CALLS]``, DeepSeek LLM's ``User:``/``Assistant:``, Falcon's).
Mistral's vocabulary is not among the GGUFs: ``mistral`` is Llama 2's SentencePiece vocabulary
(Mistral 7B v0.1's is the same kind, 32000 pieces) with Mistral v0.3's control tokens appended.

Conversion fix-up: transformers' GGUF reader maps a control token whose text its byte-level
encoding changes (DeepSeek's full-width ``<｜begin▁of▁sentence｜>``) to a new id past the
vocabulary; ``_fix_added_tokens`` puts every GGUF control token back at its GGUF id.

    python -m tests.real_tokenizers      # fetch and convert all (the test setup does this)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from loadtests import vocabs

LLAMA31 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' and loop.first and tools %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper '"
    " + 'arguments that best answers the given prompt.\\n\\n' }}"
    '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and \''
    " + 'its value}. Do not use variables.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson + '\\n\\n' }}{%- endfor %}"
    "{{- message['content'] + '<|eot_id|>' }}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for call in message['tool_calls'] %}{%- set f = call.get('function', call) %}"
    "{{- '{\"name\": \"' + f['name'] + '\", \"parameters\": ' + f['arguments'] | tojson + '}' }}"
    "{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- elif message['role'] in ('tool', 'ipython') %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] | string + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '"
    " + 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    ' + \'{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|im_start|>assistant' }}{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}{%- set f = call.get('function', call) %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' + f['arguments'] | tojson"
    " + '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] | string + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MISTRAL = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- set last_user = namespace(i=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set last_user.i = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if tools and loop.index0 == last_user.i %}"
    "{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{%- if system and loop.index0 == last_user.i %}"
    "{{- '[INST] ' + system + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '[TOOL_CALLS] [' }}{%- for call in message['tool_calls'] %}{%- set f = call.get('function', call) %}"
    "{{- '{\"name\": \"' + f['name'] + '\", \"arguments\": ' + f['arguments'] | tojson + '}' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- ']' + eos_token }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + message['content'] | tojson + '}[/TOOL_RESULTS]' }}"
    "{%- endif %}{%- endfor %}"
)
MISTRAL_CONTROL = (
    "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)  # fmt: skip

DEEPSEEK = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- else %}{{- 'Assistant: ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)

FALCON = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- 'System: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\\n' }}"
    "{%- else %}{{- 'Falcon: ' + message['content'] + eos_token + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Falcon:' }}{%- endif %}"
)


@dataclass(frozen=True)
class RealVocab:
    """One family's real tokenizer and how its test model uses it."""

    name: str  # a key of `loadtests.vocabs.VOCABS`: which GGUF
    arch: str  # the `peer.demo_families` arch of its test model
    end_of_turn: str  # the token that closes an assistant turn (a stop id)
    template: str | None = None  # None: the GGUF's own
    added: tuple[str, ...] = ()  # control tokens appended to the vocabulary
    renamed: tuple[tuple[int, str], ...] = ()  # (id, text): a padding slot that is a plain added token


VOCABS = {
    vocab.name: vocab
    for vocab in (
        RealVocab("llama3", "llama", "<|eot_id|>", LLAMA31),
        # Qwen2.5 gives two of Qwen2's padding slots to its tool-call tags, as plain added tokens
        RealVocab(
            "qwen2",
            "qwen2",
            "<|im_end|>",
            QWEN_TOOLS,
            renamed=((151657, "<tool_call>"), (151658, "</tool_call>")),
        ),
        RealVocab("mistral", "mistral", "</s>", MISTRAL, MISTRAL_CONTROL),
        RealVocab("phi3", "phi3", "<|end|>"),
        RealVocab("deepseek", "llama", "<｜end▁of▁sentence｜>", DEEPSEEK),
        RealVocab("falcon", "falcon", "<|endoftext|>", FALCON),
    )
}


@cache
def load_tokenizer(name: str):  # noqa: ANN201 - a transformers tokenizer, shared: only read it
    """The tokenizer of `tokenizer_folder(name)`, loaded once per process (~4 s for 128k pieces)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder(name))


def tokenizer_folder(name: str) -> Path:
    """A folder with the tokenizer files of vocabulary `name` (converted once, then cached)."""
    vocab = VOCABS[name]
    folder = vocabs.cache_dir() / "chat-tokenizers" / name
    if (folder / "tokenizer_config.json").exists():
        return folder
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    source = vocabs.gguf_file(name)
    reader = GGUFReader(source)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if vocab.template is not None:
        tokenizer.chat_template = vocab.template
    elif "tokenizer.chat_template" in reader.fields:
        tokenizer.chat_template = reader.fields["tokenizer.chat_template"].contents()
    partial = folder.with_name(folder.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(partial)
    _fix_added_tokens(partial, reader, vocab.added, vocab.renamed)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def _fix_added_tokens(folder: Path, reader, added: tuple[str, ...], renamed) -> None:  # noqa: ANN001
    """Every GGUF control token as a special added token at its GGUF id, none past the vocabulary
    but `added` (appended in order), `renamed` slots as plain added tokens, and BOS / EOS / PAD
    named by the GGUF's ids."""
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    for i, text in renamed:
        tokens[i] = text
    kinds = reader.fields["tokenizer.ggml.token_type"].contents()
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    control = {i for i, kind in enumerate(kinds) if kind == 3}
    plain = {i for i, _ in renamed}
    kept = [
        token
        for token in data["added_tokens"]
        if token["id"] < len(tokens) and token["id"] not in control and token["id"] not in plain
    ]
    specials = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i in sorted(control)
    ] + [
        {"id": len(tokens) + k, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for k, text in enumerate(added)
    ] + [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": False}
        for i, text in renamed
    ]  # fmt: skip
    data["added_tokens"] = sorted(kept + specials, key=lambda token: token["id"])
    # An added token keeps its id only where the model's vocabulary has its text at that id.
    vocabulary = data["model"]["vocab"]
    if isinstance(vocabulary, dict):
        spelled = {i: piece for piece, i in vocabulary.items()}
        for i in control | plain:
            if spelled.get(i, tokens[i]) != tokens[i]:
                del vocabulary[spelled[i]]
                vocabulary[tokens[i]] = i
    else:  # a Unigram model: a list of [piece, score]
        for i in control | plain:
            vocabulary[i][0] = tokens[i]
    path.write_text(json.dumps(data, ensure_ascii=False))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for role in ("bos", "eos", "padding"):
        field = f"tokenizer.ggml.{role}_token_id"
        if field in reader.fields:
            key = "pad_token" if role == "padding" else f"{role}_token"
            config[key] = tokens[int(reader.fields[field].contents())]
    config.pop("added_tokens_decoder", None)
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))


def main() -> int:
    print(f"llama.cpp's vocab-only GGUF files ({vocabs.SDIST}), as tokenizer folders with chat templates:")
    for name in VOCABS:
        print(f"  {name}: {tokenizer_folder(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

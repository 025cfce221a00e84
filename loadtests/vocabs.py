"""Real tokenizers without a model hub (../shared/DESIGN.md, "Environment facts").

The source distribution of ``llama-cpp-python`` on PyPI (76 MB) carries llama.cpp's vocab-only GGUF
files. `real_tokenizer` fetches it once with pip, extracts only the GGUF it needs, converts it with
``transformers`` (``gguf`` package: 12-17 s) and keeps the result as a normal tokenizer folder, so
later loads take about a second. Everything lives under ``$SWARM_VOCAB_CACHE``
(``~/.cache/swarm-serve``), outside the repository.

    from loadtests.vocabs import real_tokenizer
    tokenizer = real_tokenizer("qwen2")  # 151,936 tokens
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
VOCABS = {
    "llama3": "ggml-vocab-llama-bpe.gguf",
    "qwen2": "ggml-vocab-qwen2.gguf",
    "mistral": "ggml-vocab-llama-spm.gguf",  # Llama 2's SentencePiece vocabulary (tests.real_tokenizers)
    "phi3": "ggml-vocab-phi-3.gguf",
    "deepseek": "ggml-vocab-deepseek-llm.gguf",
    "falcon": "ggml-vocab-falcon.gguf",
}


def cache_dir() -> Path:
    return Path(os.environ.get("SWARM_VOCAB_CACHE", "~/.cache/swarm-serve")).expanduser()


def gguf_file(name: str) -> Path:
    """The vocab-only GGUF of `name` (a key of `VOCABS`), fetched and extracted on first use."""
    filename = VOCABS[name]
    folder = cache_dir() / "llama-cpp"
    target = folder / "models" / filename
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    archives = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SDIST,
             "-d", str(folder)],
            check=True,
        )  # fmt: skip
        archives = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archives[-1]) as archive:
        member = next(
            m for m in archive.getmembers() if m.name.endswith(f"vendor/llama.cpp/models/{filename}")
        )
        data = archive.extractfile(member).read()
    target.parent.mkdir(exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def real_tokenizer(name: str):
    """The ``transformers`` tokenizer of `name` ("llama3": Llama 3, 128,256 tokens; "qwen2": Qwen2,
    151,936), converted once from its GGUF and cached as a tokenizer folder."""
    from transformers import AutoTokenizer

    folder = cache_dir() / "tokenizers" / name
    if not (folder / "tokenizer.json").exists():
        gguf = gguf_file(name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)

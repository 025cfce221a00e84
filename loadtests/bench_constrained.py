"""Token-mask time per step of constrained decoding: the hand-written engine this gateway used to
have, llguidance (what `gateway.constrained` uses now) and xgrammar, on the demo tokenizer and on
real 128k-152k vocabularies (Llama 3, Qwen2; `loadtests.vocabs`).

    python -m loadtests.bench_constrained
    # -> loadtests/results/constrained.json; the table in docs/benchmarks.md is made from it
    # xgrammar imports torch, so it is not in the project's environment; measure it from one that has it:
    #   <python with xgrammar> -m loadtests.bench_constrained --engines xgrammar   (merged into the same JSON)

What one step costs is what the gateway pays on its event loop between two steps of a choice: the
tokens allowed next (llguidance: `Constraint.allowed_bits()`, the mask and the closing plan packed
as the bitmask `Step.allowed_token_mask` carries; the others: their id list), then taking the
sampled token (`advance`).
Each engine walks the same token ids: a compact JSON document of the schema, tokenized by the
tokenizer itself (so every engine sees every kind of state: keys, long strings, numbers, arrays).
The hand-written engine is loaded from git (commit `LEGACY_COMMIT`, before llguidance) and stops
after `--legacy-budget` seconds per run: on a 128k vocabulary each new parser state walks the
whole vocabulary in Python.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtests.swarm_bench import write_results

RESULTS = Path(__file__).parent / "results" / "constrained.json"
LEGACY_COMMIT = "d7dc224"  # gateway/constrained.py before llguidance
TOKENIZERS = ("demo", "llama3", "qwen2")
ENGINES = ("handwritten", "llguidance", "xgrammar")

# A schema the hand-written engine supports too (no anyOf / format / pattern), and a document of it
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string"},
            },
            "required": ["street", "city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
        "notes": {"type": "string"},
    },
    "required": ["name", "age", "email", "address", "tags", "scores", "active", "notes"],
}
DOCUMENT = {
    "name": "Ada Lovelace of the Analytical Engine Society",
    "age": 36,
    "email": "ada.lovelace@example.org",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "tags": ["mathematics", "poetry of science", "engines", "notes on the sketch"],
    "scores": [98.5, 87.25, 100, 42],
    "active": True,
    "notes": (
        "She wrote what is often called the first published program, for computing Bernoulli numbers "
        "on a machine that was never finished, and she saw that such an engine could act on other "
        "things than numbers: music, for one, if its rules could be expressed."
    ),
}
WORKLOADS = {"json_schema": SCHEMA, "json_object": None}


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "demo":
        from loadtests.vocabs import cache_dir
        from peer.demo_model import ensure_demo_model

        return AutoTokenizer.from_pretrained(ensure_demo_model(cache_dir(), preset="demo"))
    from loadtests.vocabs import real_tokenizer

    return real_tokenizer(name)


def target_tokens(tokenizer) -> list[int]:
    text = json.dumps(DOCUMENT, ensure_ascii=False, separators=(",", ":"))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def summary(times: list[float]) -> dict:
    ms = np.array(times) * 1e3
    return {
        "steps": len(ms),
        "mask_ms_mean": round(float(ms.mean()), 4),
        "mask_ms_median": round(float(np.median(ms)), 4),
        "mask_ms_p99": round(float(np.percentile(ms, 99)), 4),
        "mask_ms_max": round(float(ms.max()), 3),
    }


# -- engines: each returns (vocabulary build s, compile ms, per-step seconds, tokens the mask refused) --
def run_llguidance(tokenizer, eos: list[int], schema, tokens: list[int], vocab_cache: dict) -> dict:
    from gateway.constrained import Constraint, Vocabulary, json_schema_grammar

    began = time.perf_counter()
    if "llguidance" not in vocab_cache:
        vocab_cache["llguidance"] = Vocabulary(tokenizer, eos)
    vocab_s = time.perf_counter() - began
    grammar = json_schema_grammar(schema)
    began = time.perf_counter()
    constraint = Constraint(grammar, vocab_cache["llguidance"], 4096)
    compile_ms = (time.perf_counter() - began) * 1e3
    times, mask_times, refused = [], [], 0
    for token in tokens:
        began = time.perf_counter()
        mask = constraint.allowed_mask()
        masked = time.perf_counter()
        np.packbits(mask, bitorder="little").tobytes()  # = constraint.allowed_bits(), what goes on the wire
        times.append(time.perf_counter() - began)
        mask_times.append(masked - began)
        refused += not mask[token]
        constraint.advance(token)
    only_mask = {
        f"bool_mask_{key[5:]}": value for key, value in summary(mask_times).items() if key != "steps"
    }
    return {"vocab_build_s": round(vocab_s, 3), "compile_ms": round(compile_ms, 2), "refused": refused,
            "complete": constraint.complete, **summary(times), **only_mask}  # fmt: skip


def legacy_module():
    source = subprocess.run(
        ["git", "show", f"{LEGACY_COMMIT}:gateway/constrained.py"],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "legacy_constrained.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("legacy_constrained", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_handwritten(
    tokenizer, eos: list[int], schema, tokens: list[int], vocab_cache: dict, budget: float
) -> dict:
    from gateway.text import TokenPieces, _special_ids

    legacy = legacy_module()
    began = time.perf_counter()
    if "handwritten" not in vocab_cache:
        vocab_cache["handwritten"] = legacy.TokenTable(
            TokenPieces(tokenizer), len(tokenizer), _special_ids(tokenizer)
        )
    vocab_s = time.perf_counter() - began
    began = time.perf_counter()
    constraint = legacy.JsonConstraint(legacy.Grammar(schema), vocab_cache["handwritten"], eos, 4096)
    compile_ms = (time.perf_counter() - began) * 1e3
    times, refused = [], 0
    deadline = time.perf_counter() + budget
    for token in tokens:
        began = time.perf_counter()
        allowed = constraint.allowed()
        times.append(time.perf_counter() - began)
        refused += token not in set(allowed)
        constraint.advance(token)
        if time.perf_counter() > deadline:
            break
    return {"vocab_build_s": round(vocab_s, 3), "compile_ms": round(compile_ms, 2), "refused": refused,
            "complete": constraint.complete, "stopped_after_s": budget if len(times) < len(tokens) else None,
            **summary(times)}  # fmt: skip


def run_xgrammar(tokenizer, eos: list[int], schema, tokens: list[int], vocab_cache: dict) -> dict:
    import xgrammar

    began = time.perf_counter()
    if "xgrammar" not in vocab_cache:
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=len(tokenizer), stop_token_ids=eos
        )
        vocab_cache["xgrammar"] = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    vocab_s = time.perf_counter() - began
    compiler = vocab_cache["xgrammar"]
    began = time.perf_counter()
    if schema is None:
        compiled = compiler.compile_builtin_json_grammar()
    else:
        compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    matcher = xgrammar.GrammarMatcher(compiled)
    compile_ms = (time.perf_counter() - began) * 1e3
    size = len(tokenizer)
    words = np.zeros((1, (size + 31) // 32), dtype=np.int32)
    times, mask_times, refused = [], [], 0
    for token in tokens:
        began = time.perf_counter()
        matcher.fill_next_token_bitmask(words)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:size]
        masked = time.perf_counter()
        allowed = np.flatnonzero(bits).tolist()  # what would go on the wire
        times.append(time.perf_counter() - began)
        mask_times.append(masked - began)
        refused += token not in set(allowed)
        if not matcher.accept_token(token):
            break
    only_mask = {
        f"bool_mask_{key[5:]}": value for key, value in summary(mask_times).items() if key != "steps"
    }
    return {"vocab_build_s": round(vocab_s, 3), "compile_ms": round(compile_ms, 2), "refused": refused,
            **summary(times), **only_mask}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=TOKENIZERS)
    parser.add_argument("--engines", nargs="+", default=["handwritten", "llguidance"], choices=ENGINES)
    parser.add_argument("--legacy-budget", type=float, default=60.0, help="seconds per hand-written run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    previous = json.loads(args.out.read_text()) if args.out.exists() else {"results": []}
    measured = {(r["tokenizer"], r["engine"], r["workload"]): r for r in previous.get("results", [])}
    for name in args.tokenizers:
        tokenizer = load_tokenizer(name)
        eos = [tokenizer.eos_token_id]
        tokens = target_tokens(tokenizer)
        cache: dict = {}
        for engine in args.engines:
            for workload, schema in WORKLOADS.items():
                if engine == "handwritten":
                    result = run_handwritten(tokenizer, eos, schema, tokens, cache, args.legacy_budget)
                elif engine == "llguidance":
                    result = run_llguidance(tokenizer, eos, schema, tokens, cache)
                else:
                    result = run_xgrammar(tokenizer, eos, schema, tokens, cache)
                row = {"tokenizer": name, "vocab": len(tokenizer), "engine": engine, "workload": workload,
                       "document_tokens": len(tokens), **result}  # fmt: skip
                measured[(name, engine, workload)] = row
                print(json.dumps(row), flush=True)
    results = sorted(measured.values(), key=lambda r: (TOKENIZERS.index(r["tokenizer"]), ENGINES.index(r["engine"]), r["workload"]))  # fmt: skip
    out = {
        "command": "python -m loadtests.bench_constrained",
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        },  # fmt: skip
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "versions": {**previous.get("versions", {}), **_versions()},
        "results": results,
    }
    write_results(args.out, out, indent=2)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("llguidance", "xgrammar", "transformers", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


if __name__ == "__main__":
    main()

"""Every model family side by side (issue 17): decode ms/token through gateway + 2 peers over
``transformers`` ``generate()``, MoE batching, and sliding-window KV memory. Writes one JSON.

* ``decode``: for each family a ~100-150M-parameter random model (``peer.demo_families`` with
  bench shapes: hidden 768, 12 layers, 32k vocabulary) runs through ``loadtests.bench_decode``'s
  own measurement (a real ``LocalSwarm``: DHT, 2 peers, gateway; ``http`` and ``reference``
  interleaved in every repeat, medians), so the ratio means what the Llama table in
  docs/benchmarks.md means.
* ``moe_streams``: a MoE family's aggregate decode tokens/s at 16 sessions packed in one pass
  over 1 session, through the peer's spans in this process (rows grouped per expert, one matmul
  per expert per pass): what batching buys a MoE peer, without the gateway. Llama's row (when
  benched) is the same measurement on a dense model: what batching buys on this machine at all.
* ``kv_memory``: bytes a peer's ``KVCache`` holds for one session after 4096 tokens (filled in
  256-token chunks through ``prepare``/``append``/``commit``, the span's calls) for a model whose
  layers all have a 4096-token window in the config vs 512 (Mistral-style), and for Gemma-style
  alternation (every other layer windowed), each against the same geometry without windows.
* ``mla_memory``: DeepSeek-V3's real geometry (``DeepseekV3Config()`` defaults: 61 layers, 128
  heads) in bf16, one session at 4096 tokens: the latent cache a ``deepseek_v3`` peer holds
  (``peer.mla``, filled through the cache's own calls) and what the memory budget reserves for it,
  against the keys and values expanded per head (what a cache of transformers' expanded states
  would hold: ``heads x (qk_nope + qk_rope + v)`` per token and layer).

    python -m loadtests.bench_families [--archs llama,mistral,...] [--new-tokens 48] [--repeats 2]
                                       [--out loadtests/results/families.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from loadtests import bench_decode
from loadtests.swarm_bench import command_line

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = (
    "llama,mistral,qwen2,qwen3,gemma2,gemma3_text,phi3,falcon,bloom,mixtral,qwen3_moe,gpt_oss,deepseek_v3"
)
MOE_ARCHS = ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3")
_WIDE = {"vocab_size": 32000, "hidden_size": 768, "max_position_embeddings": 4096}
_DENSE = {**_WIDE, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
          "intermediate_size": 2048, "head_dim": 64}  # fmt: skip


def bench_shape(arch: str) -> dict:
    """Overrides that make ``arch``'s demo model ~100-150M parameters (windows of 256 tokens)."""
    if arch == "bloom":
        return {"vocab_size": 32000, "hidden_size": 768, "n_layer": 12, "n_head": 12}
    if arch in ("falcon", "falcon7b"):
        extra = {"num_kv_heads": 4, "ffn_hidden_size": 2048} if arch == "falcon" else {}
        return {**_WIDE, "num_hidden_layers": 12, "num_attention_heads": 12, **extra}
    shape = dict(_DENSE)
    if arch in ("llama", "qwen2", "phi3", "falcon"):
        shape.pop("head_dim")
    if arch == "deepseek_v3":  # 8 routed experts of 256 + 1 shared, latent ranks 384 / 256
        return {**_WIDE, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
                "intermediate_size": 2048, "moe_intermediate_size": 256, "q_lora_rank": 384,
                "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64}  # fmt: skip
    if arch in MOE_ARCHS:  # 4 experts of a third of the dense MLP: a similar size
        shape.update(intermediate_size=768, moe_intermediate_size=768)
        if arch in ("mixtral", "gpt_oss"):  # their experts are intermediate_size wide
            shape.pop("moe_intermediate_size")
    if arch in ("mistral", "mixtral", "phi3", "qwen2", "gemma2", "gemma3_text"):
        shape["sliding_window"] = 256
    if arch == "gpt_oss":  # its own alternation (window layers first), YaRN as shipped
        shape.update(sliding_window=256, swiglu_limit=7.0, rope_parameters=None)
    if arch in ("gemma2", "gemma3_text", "gpt_oss"):
        shape["layer_types"] = ["sliding_attention", "full_attention"] * 6
        shape["query_pre_attn_scalar"] = 64
    if arch == "qwen2":
        shape["max_window_layers"] = 6
    return shape


def moe_streams(model_dir: Path, streams: int = 16, steps: int = 16, repeats: int = 3) -> dict:
    """Aggregate decode tokens/s of ``streams`` sessions packed in one pass, and of one alone.

    The two are interleaved ``repeats`` times and the best of each kept: on a shared machine
    contention only ever adds time, and one sample of each once gave 3.8x and 4.8x for the same
    model a minute apart. Each span multiplies its small batches as a peer started with the
    default flags would (`peer.batching_config`: the packed weight copy when it fits the memory
    budget), so the figure is what `swarm peer` gives."""
    import torch

    from peer import gemm
    from peer.model import BlockSpan, last_token_rows
    from peer.server import PeerConfig, choose_batching

    spans, batching = [], []
    for start, end in ((0, 6), (6, 12)):
        span = BlockSpan.load(model_dir, start, end, calibrate=False)
        config = choose_batching(span, PeerConfig(model_dir, model_dir.name, start, end))  # no flags
        gemm.calibrate(span.modules(), prepack=config.prepack)
        spans.append(span)
        batching.append(config.describe())

    def run(sessions: int) -> float:
        caches = [[span.new_cache() for _ in range(sessions)] for span in spans]
        prompts = torch.randint(9, 32000, (sessions, 8), generator=torch.Generator().manual_seed(0))
        hidden = prompts.reshape(-1)
        lengths = [8] * sessions
        for _ in range(steps + 1):
            for span, span_caches in zip(spans, caches, strict=True):
                hidden = span(hidden, span_caches, lengths)
            nxt = spans[-1].logits(hidden[last_token_rows(lengths)]).argmax(-1)
            if lengths[0] == 8:
                started = time.perf_counter()  # decode only: the prefill pass is not timed
            hidden, lengths = nxt, [1] * sessions
        return sessions * steps / (time.perf_counter() - started)

    pairs = [(run(1), run(streams)) for _ in range(repeats)]
    one, many = max(a for a, _ in pairs), max(b for _, b in pairs)
    return {"streams": streams, "tokens_per_s_1": round(one, 2), f"tokens_per_s_{streams}": round(many, 2),
            "ratio": round(many / one, 2), "steps": steps, "repeats": repeats,
            "paired_ratios": [round(b / a, 2) for a, b in pairs], "batching": batching}  # fmt: skip


def kv_memory(tokens: int = 4096, chunk: int = 256) -> list[dict]:
    """Bytes one session's cache holds after ``tokens`` tokens, with and without windows."""
    import torch

    from peer.kv_cache import KVCache

    def held(windows: tuple[int, ...]) -> int:
        cache = KVCache(len(windows), 8, 128, torch.bfloat16, windows=windows)  # Mistral-7B's KV geometry
        for _ in range(0, tokens, chunk):
            cache.prepare(chunk)
            k = torch.zeros(8, chunk, 128, dtype=torch.bfloat16)
            for layer in range(len(windows)):
                cache.append(layer, k, k)
            cache.commit(chunk)
        return cache.nbytes

    rows = []
    for name, windows in (
        ("all layers windowed, window 4096 (Mistral 7B v0.1)", (4096,) * 32),
        ("all layers windowed, window 512", (512,) * 32),
        ("every other layer windowed, window 512 (Gemma 2 style)", (512, 0) * 16),
    ):
        with_windows, without = held(windows), held((0,) * 32)
        rows.append({"model": name, "tokens": tokens, "bytes_with_windows": with_windows,
                     "bytes_without_windows": without, "ratio": round(with_windows / without, 3)})  # fmt: skip
    return rows


def mla_memory(tokens: int = 4096, chunk: int = 256) -> dict:
    """Bytes of one DeepSeek-V3 session at ``tokens`` tokens: latent cache vs expanded heads."""
    import torch
    from transformers import DeepseekV3Config

    from peer.kv_cache import KVCache
    from peer.model import SpanConfig

    config = SpanConfig.from_hf(DeepseekV3Config())
    heads, dim, parts = config.cache_geometry
    layers = config.num_hidden_layers
    cache = KVCache(layers, heads, dim, torch.bfloat16, max_capacity=tokens, parts=parts)
    latent = torch.zeros(heads, chunk, dim, dtype=torch.bfloat16)
    for _ in range(0, tokens, chunk):
        cache.prepare(chunk)
        for layer in range(layers):
            cache.append(layer, latent)
        cache.commit(chunk)
    per_head = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    expanded = tokens * layers * config.num_attention_heads * per_head * 2  # bf16
    return {
        "model": "DeepSeek-V3 geometry (61 layers, 128 heads, kv_lora_rank 512, rope 64, nope 128, v 128), bf16",
        "tokens": tokens,
        "latent_bytes_held": cache.nbytes,
        "latent_bytes_reserved": cache.budget_tokens(tokens, chunk) * cache.bytes_per_token,
        "expanded_bytes": expanded,
        "ratio_expanded_over_latent": round(expanded / cache.nbytes, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=DEFAULT_ARCHS)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="http,reference,spans",
                        help="bench_decode's modes; spans (the peers' compute in this process) splits the "
                        "gap to generate() into compute and messages")  # fmt: skip
    parser.add_argument("--skip-decode", action="store_true", help="only the MoE and memory figures")
    parser.add_argument("--skip-moe", action="store_true", help="keep the MoE figures of --out")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="per peer, on a loaded machine")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "families.json")
    args = parser.parse_args(argv)
    import torch

    from peer.demo_families import create_family_model

    torch.set_num_threads(1)
    archs = [a for a in args.archs.split(",") if a]
    decode_args = bench_decode.parse_args(
        [
            "--new-tokens",
            str(args.new_tokens),
            "--repeats",
            str(args.repeats),
            "--modes",
            args.modes,
            "--warmup-tokens",
            "8",
            "--docs",
            "",
            "--start-timeout",
            str(args.start_timeout),
        ]  # fmt: skip
    )
    root = decode_args.cache_dir / "families-bench"
    decode_args.model_dirs = {}
    for arch in archs:
        folder = root / arch
        if not (folder / "model.safetensors").is_file():
            create_family_model(folder, arch, **bench_shape(arch))
        decode_args.model_dirs[arch] = folder
    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
        },
        "command": command_line("loadtests.bench_families", argv),
        "decode": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # a run of some families adds to the figures of earlier runs
        earlier = json.loads(args.out.read_text())
        result["decode"] = earlier.get("decode", {})
        result["earlier_runs"] = [*earlier.get("earlier_runs", []), earlier.get("machine")]
        result["moe_streams"] = earlier.get("moe_streams", {})  # the families rerun are replaced

    def save() -> None:
        result["machine"]["loadavg_end"] = os.getloadavg()
        args.out.write_text(json.dumps(result, indent=1, default=str))

    result["kv_memory"] = kv_memory()
    result["mla_memory"] = mla_memory()
    save()
    for arch in (*MOE_ARCHS, "llama"):  # llama: the same ratio for a dense model, the machine's ceiling
        if arch in archs and not args.skip_moe:
            result.setdefault("moe_streams", {})[arch] = moe_streams(decode_args.model_dirs[arch])
            print(arch, result["moe_streams"][arch], flush=True)
            save()
    if not args.skip_decode:
        for arch in archs:
            one = bench_decode.bench_model(arch, decode_args)
            result["decode"][arch] = {k: one.get(k) for k in (
                "params_millions", "swarm_ms_per_token", "reference_ms_per_token", "ratio", "paired_ratios",
                "cpu_ratio", "loadavg_before", "loadavg_after")}  # fmt: skip
            result["decode"][arch]["same_text_as_reference"] = one["modes"]["http"].get(
                "same_text_as_reference"
            )
            if "spans" in one["modes"]:  # the peers' compute alone: the gap splits into compute and messages
                result["decode"][arch]["spans_ms_per_token"] = one["modes"]["spans"]["decode_ms_per_token"]
            print(arch, result["decode"][arch], flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

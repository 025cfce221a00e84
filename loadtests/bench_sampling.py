"""The last span's sampling cost per session and step, side by side: `peer.sampling.Sampler`
against the textbook formulation (HF's top-p by a full sort, `torch.multinomial` for the draw) on
the same logits, for the parameters clients send most: greedy, OpenAI's defaults (temperature 1,
nothing else), temperature 0.7 with top-p 0.9, and top-k 40.

The last peer samples once per session in every pass, on its event loop's thread or its forward
thread, so at 16 streams a 1 ms sampler costs 16 ms of every pass. One thread, as the peers run
in the benchmarks; medians of alternating rounds.

    python -m loadtests.bench_sampling [--vocab 32000,128256] [--out loadtests/results/sampling.json]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

from loadtests.swarm_bench import run_header, write_results

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> SamplingParams keyword arguments
    "greedy": {"temperature": 0.0},
    "openai_default": {"temperature": 1.0},
    "t0.7_top_p0.9": {"temperature": 0.7, "top_p": 0.9},
    "top_k40": {"temperature": 0.8, "top_k": 40},
}


def textbook_sample(logits, params, generator, seed: int) -> int:
    """The straightforward formulation of the same processors (what `Sampler` did before)."""
    import torch

    scores = logits.clone()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("not finite")
    torch.log_softmax(scores, dim=-1)  # the logprob of the token is reported either way
    if params.greedy:
        return int(torch.argmax(scores))
    scores = scores / params.temperature
    if 0 < params.top_k < len(scores):
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - params.top_p
        drop[-1] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    probs = scores.softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("not finite")
    generator.manual_seed(seed)
    return int(torch.multinomial(probs, 1, generator=generator))


def time_setting(vocab: int, kwargs: dict, calls: int, rounds: int) -> dict:
    import torch

    from peer.sampling import Sampler, SamplingParams

    params = SamplingParams(seed=1, **kwargs)
    sampler, generator = Sampler(params), torch.Generator()
    # logits shaped like a language model's: a few likely tokens over a long tail
    logits = [torch.randn(vocab, generator=torch.Generator().manual_seed(i)) * 3 for i in range(8)]
    history = list(range(100))
    timings: dict[str, list[float]] = {"sampler": [], "textbook": []}
    for _ in range(rounds):
        begin = time.perf_counter()
        for i in range(calls):
            sampler.sample(logits[i % 8], history)
        timings["sampler"].append((time.perf_counter() - begin) / calls * 1e3)
        begin = time.perf_counter()
        for i in range(calls):
            textbook_sample(logits[i % 8], params, generator, i)
        timings["textbook"].append((time.perf_counter() - begin) / calls * 1e3)
    sampler_ms = statistics.median(timings["sampler"])
    textbook_ms = statistics.median(timings["textbook"])
    return {
        "sampler_ms": round(sampler_ms, 4),
        "textbook_ms": round(textbook_ms, 4),
        "ratio": round(sampler_ms / textbook_ms, 3),
        "rounds_ms": timings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="32000,128256", help="comma-separated vocabulary sizes")
    parser.add_argument("--calls", type=int, default=200, help="samples per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "sampling.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    result: dict = {**run_header("sampling", "loadtests.bench_sampling", argv), "ms_per_sample": {}}
    for vocab in (int(v) for v in args.vocab.split(",")):
        for name, kwargs in SETTINGS.items():
            entry = time_setting(vocab, kwargs, args.calls, args.rounds)
            result["ms_per_sample"][f"{name}@{vocab}"] = entry
            print(f"vocab {vocab:6d}  {name:15s}  sampler {entry['sampler_ms']:7.3f} ms"
                  f"  textbook {entry['textbook_ms']:7.3f} ms  ({entry['ratio']:.2f}x)", flush=True)  # fmt: skip
    result["loadavg_after"] = os.getloadavg()
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

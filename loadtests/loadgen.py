"""Load generator: drive an OpenAI-compatible gateway and report as vLLM's serving benchmark does.

    python -m loadtests.loadgen --base-url http://127.0.0.1:8000 --concurrency 8 \\
        --input-len 128 --output-len 128 --num-requests 64 [--multi-turn 3] [--output out.json]
    python -m loadtests.loadgen --base-url ... --rate 2.0 ...      # Poisson arrivals, 2 req/s

Every request streams `/v1/chat/completions` with `stream_options.include_usage`; token counts
come from `usage` (no tokenizer needed here), `ignore_eos` makes outputs exactly `--output-len`
long. `--input-len` is prompt tokens as the server counts them (chat template included), like
vLLM's random dataset: two probe requests (one token out) measure how many tokens the filler
words and the template take with the served model's tokenizer, and each user message gets the
number of words that comes closest. Timings per request: TTFT (first content chunk), ITL (gaps
between content chunks), TPOT = (E2E - TTFT) / (output tokens - 1), E2E. Reported at mean, p50,
p90, p99, with requests completed / failed, request rate and output / total tokens per second,
as JSON.

`--multi-turn N` makes each request a conversation of N turns: every turn resends the history
plus a new user message, as plain chat clients do (no session header unless `--session-header`),
so the gateway's cache reuse across turns shows in the TTFT of turns 2..N (reported apart).

Why our own and not aiperf or guidellm: both drive an OpenAI endpoint and report TTFT / ITL
percentiles, and on a local `swarm up` (4 streams, 32 tokens out, 30 s) they agree with this
module. aiperf and this module sized prompts to the same 64 server-counted tokens; guidellm
counted 64 too. But they cost far more and miss what the benchmarks use. Footprint:
aiperf 0.13 is 142 packages and 1.2 GB (transformers, pandas, scipy, dash, kubernetes; Python
3.11-3.13), and guidellm 0.8.1 is 6 GB because it requires unpinned torch (it pulled 2.14 with
CUDA 13 wheels, which clashes with our CPU torch). This module needs only httpx. Client cost per
run: 2.3 CPU-s and 39 MB RSS here, against 17 CPU-s and 270 MB for aiperf (41 s wall) and
18 CPU-s and 1.1 GB for guidellm (53 s wall). A CPU swarm shares those cores, so aiperf measured
8.4 req/s where this module measured 10.1 and guidellm 9.8. Missing features:
`bench_batching` calls `run_load` and `stream_chat` in process (per level, while it samples peer
RSS; the second-turn TTFT), and `tests/test_serving.py` runs this CLI. Both libraries are CLIs
with worker processes that need a local tokenizer to size prompts, where this module asks the
server. aiperf also counts output tokens by re-tokenizing the text by default, which read 64.5
"tokens" per 32-token reply from this model, unless `--use-server-token-count` is given. Token-
exact and failover checks stay in `chaos.py` / `bench_decode.py`; neither library records
per-stream tokens. Names differ: their "ITL" is our TPOT, and our ITL (gaps between chunks, as
in vLLM) is aiperf's `inter_chunk_latency`. Use aiperf only as an optional cross-check, from its
own virtualenv and on other cores, never as a dependency:
`aiperf profile --model swarm-demo --url URL --endpoint-type chat --streaming --concurrency 4
--benchmark-duration 30 --prompt-input-tokens-mean 50 --prompt-output-tokens-mean 32
--extra-inputs ignore_eos:true --use-server-token-count --tokenizer MODEL_DIR --ui none`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

WORDS = [
    "swarm",
    "peer",
    "block",
    "cache",
    "token",
    "stream",
    "route",
    "model",
    "layer",
    "batch",
    "gateway",
    "session",
    "budget",
    "turn",
    "reply",
    "prompt",
    "memory",
    "hidden",
    "state",
    "weight",
    "shard",
    "network",
    "latency",
    "answer",
    "question",
]


PROBE_TRIES = 5  # attempts of a probe request answered 429 / 503


@dataclass
class LoadConfig:
    base_url: str
    model: str | None = None
    concurrency: int | None = None
    rate: float | None = None  # requests/s, Poisson arrivals
    input_len: int = 128
    output_len: int = 128
    num_requests: int = 32
    multi_turn: int = 1
    session_header: bool = False
    api_key: str | None = None
    seed: int = 0
    timeout: float = 600.0
    progress: bool = True
    words: int | None = None  # filler words per user message; None = sized to input_len by probing
    temperature: float = 0.0  # 0: greedy; above, sampled with nothing else set (OpenAI's default is 1)


@dataclass
class TurnResult:
    ok: bool
    turn: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def make_text(rng: random.Random, words: int) -> str:
    """`words` words of filler (how many tokens that is depends on the tokenizer: see
    `words_for_tokens`)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


async def prompt_tokens(client: httpx.AsyncClient, model: str, text: str) -> int:
    """The server's count of prompt tokens for one user message (one token generated)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    for attempt in range(1, PROBE_TRIES + 1):
        response = await client.post("/v1/chat/completions", json=body)
        if response.status_code not in (429, 503) or attempt == PROBE_TRIES:
            break
        # a busy or just-started swarm: wait as told (briefly), the run itself has not begun
        await asyncio.sleep(min(2.0, float(response.headers.get("retry-after", 1))))
    response.raise_for_status()
    return int(response.json()["usage"]["prompt_tokens"])


async def words_for_tokens(client: httpx.AsyncClient, model: str, tokens: int, probe_words: int = 50) -> int:
    """Filler words per user message that make a first turn of about `tokens` prompt tokens:
    the template's share and the tokens per word come from two probes of 1 and `probe_words`."""
    rng = random.Random(0)
    one = await prompt_tokens(client, model, make_text(rng, 1))
    many = await prompt_tokens(client, model, make_text(rng, probe_words))
    per_word = max(1e-3, (many - one) / (probe_words - 1))
    fixed = one - per_word  # chat template around the message
    return max(1, round((tokens - fixed) / per_word))


async def stream_chat(
    client: httpx.AsyncClient, cfg: LoadConfig, messages: list[dict], headers: dict
) -> tuple[TurnResult, str]:
    """One streamed chat completion; returns its timings and the reply text."""
    body = {
        "model": cfg.model,
        "messages": messages,
        "max_tokens": cfg.output_len,
        "temperature": cfg.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    result = TurnResult(ok=False)
    reply: list[str] = []
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result, ""
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return result, ""
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        reply.append(content)
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.output_tokens = usage["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result, ""
    result.e2e = time.perf_counter() - start
    result.ok = result.output_tokens > 0 and last is not None
    if not result.ok:
        result.error = "no tokens or no usage in the stream"
    return result, "".join(reply)


async def conversation(client: httpx.AsyncClient, cfg: LoadConfig, rng: random.Random) -> list[TurnResult]:
    messages: list[dict] = []
    headers = {"X-Session-Id": uuid.uuid4().hex} if cfg.session_header else {}
    results = []
    for turn in range(cfg.multi_turn):
        messages.append({"role": "user", "content": make_text(rng, cfg.words or cfg.input_len)})
        result, reply = await stream_chat(client, cfg, messages, headers)
        result.turn = turn
        results.append(result)
        if not result.ok:
            break
        messages.append({"role": "assistant", "content": reply})
    return results


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean / p50 / p90 / p99 in milliseconds (nearest-rank)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] * scale

    return {"mean": statistics.fmean(values) * scale, "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99)}


def summarize(results: list[TurnResult], duration: float, cfg: LoadConfig) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    report = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "progress")},
        "duration_s": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "request_throughput": len(done) / duration if duration else 0.0,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "tpot_ms": percentiles([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": percentiles([gap for r in done for gap in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in done]),
    }
    if cfg.multi_turn > 1:
        report["ttft_first_turn_ms"] = percentiles([r.ttft for r in done if r.turn == 0])
        report["ttft_later_turns_ms"] = percentiles([r.ttft for r in done if r.turn > 0])
    return report


async def run_load(cfg: LoadConfig) -> dict:
    """Run the whole load and return the report (used by the CLI and by the benchmarks)."""
    if cfg.concurrency is None and cfg.rate is None:
        cfg.concurrency = 1
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=cfg.base_url, headers=headers, timeout=cfg.timeout, limits=limits
    ) as client:
        if cfg.model is None:
            models = (await client.get("/v1/models")).json()["data"]
            if not models:
                raise RuntimeError("the gateway serves no model right now")
            cfg.model = models[0]["id"]
        if cfg.words is None:
            cfg.words = await words_for_tokens(client, cfg.model, cfg.input_len)
        rng = random.Random(cfg.seed)
        seeds = [rng.random() for _ in range(cfg.num_requests)]
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.num_requests * cfg.multi_turn, desc="turns", unit="turn", file=sys.stderr)
        results: list[TurnResult] = []
        limit = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None

        async def one(index: int) -> None:
            if limit is not None:
                await limit.acquire()
            try:
                turns = await conversation(client, cfg, random.Random(seeds[index]))
            finally:
                if limit is not None:
                    limit.release()
            results.extend(turns)
            if bar is not None:
                bar.update(cfg.multi_turn)

        start = time.perf_counter()
        tasks = []
        arrivals = random.Random(cfg.seed + 1)
        for index in range(cfg.num_requests):
            tasks.append(asyncio.create_task(one(index)))
            if cfg.rate:
                await asyncio.sleep(arrivals.expovariate(cfg.rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return summarize(results, duration, cfg)


def format_report(report: dict) -> str:
    lines = [
        f"completed {report['completed']}, failed {report['failed']} in {report['duration_s']:.2f} s",
        f"request rate      {report['request_throughput']:.2f} req/s",
        f"output tokens/s   {report['output_throughput']:.1f}",
        f"total tokens/s    {report['total_token_throughput']:.1f}",
        f"{'ms':<18}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}",
    ]
    names = ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "ttft_first_turn_ms", "ttft_later_turns_ms"]
    for name in names:
        if name in report:
            row = report[name]
            lines.append(
                f"{name[:-3]:<18}" + "".join(f"{row[q]:>9.1f}" for q in ("mean", "p50", "p90", "p99"))
            )
    for error in report["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="gateway URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id (default: the first in /v1/models)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=None, help="streams in flight (default 1)")
    mode.add_argument("--rate", type=float, default=None, help="Poisson arrival rate, requests/s")
    parser.add_argument(
        "--input-len",
        type=int,
        default=128,
        help="prompt tokens per request (first turn; chat template included)",
    )
    parser.add_argument("--output-len", type=int, default=128, help="tokens per reply")
    parser.add_argument(
        "--num-requests", type=int, default=32, help="requests (conversations with --multi-turn)"
    )
    parser.add_argument("--multi-turn", type=int, default=1, metavar="TURNS", help="turns per conversation")
    parser.add_argument("--session-header", action="store_true", help="send X-Session-Id per conversation")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("concurrency", "num_requests", "multi_turn", "input_len", "output_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    cfg = LoadConfig(
        base_url=args.base_url.rstrip("/").removesuffix("/v1"),
        model=args.model,
        concurrency=args.concurrency,
        rate=args.rate,
        input_len=args.input_len,
        output_len=args.output_len,
        num_requests=args.num_requests,
        multi_turn=args.multi_turn,
        session_header=args.session_header,
        api_key=args.api_key,
        seed=args.seed,
        progress=not args.no_progress,
    )
    report = asyncio.run(run_load(cfg))
    print(format_report(report), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

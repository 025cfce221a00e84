"""Chaos benchmark: concurrent greedy streams while block peers are SIGKILLed and restarted.

    python -m loadtests.chaos [--duration 120] [--concurrency 16] [--kill-interval 20] \\
        [--spans 3] [--replicas 2] [--max-tokens 48] [--output loadtests/results/chaos.json] \\
        [--markdown docs/benchmarks-chaos.md]

It starts a local swarm of real processes (`swarm.launcher.LocalSwarm`: one DHT node, `--spans`
spans of the demo model with `--replicas` peers each, `--threads 1`, and a gateway), then:

1. reference: every fixed prompt is streamed once with no failure (greedy, `ignore_eos`, the
   same concurrency), recording its token sequence;
2. chaos: `--concurrency` clients stream those prompts back to back for `--duration` seconds
   while, every `--kill-interval` seconds (the first at half an interval), one peer is SIGKILLed
   and a new peer for the same span is started. The victim is the peer of the next span (round
   robin) that carries the most live streams, as the clients see from `x-swarm-route`, among
   spans that keep another ready replica (a kill with no replica left would measure the
   failover budget, not failover);
3. every chaos stream is compared token by token with the reference of its prompt (token texts
   from `logprobs`): tokens lost, duplicated or different must all be 0.

The pause a failover causes is reported two ways: the gateway's own figure (`/health` ->
`failover.pauses_ms`: how much longer the step that met the failure took) and, on the client
side, the largest gap between two tokens of each stream (compared with the same figure in the
reference run, which had no failure). Results go to JSON and to a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtests.swarm_bench import percentile, round1, wait_models, write_results
from swarm.launcher import Child, LocalSwarm, free_port, num_blocks_of, split_blocks

MODEL = "swarm-demo"
TOPICS = ["swarm", "peer", "cache", "token", "stream", "route", "gateway", "session", "layer", "block",
          "network", "memory", "replica", "failover", "prompt", "answer"]  # fmt: skip
PEER_ID = re.compile(r"peer ([0-9a-f]{16}) serving")


def prompts(count: int) -> list[str]:
    """Fixed, distinct prompts (so each stream has its own reference)."""
    return [
        f"Prompt {i}: explain how the {TOPICS[i % len(TOPICS)]} relates to the "
        f"{TOPICS[(i * 7 + 3) % len(TOPICS)]}, in {i + 2} sentences."
        for i in range(count)
    ]


@dataclass
class StreamRecord:
    prompt: int
    worker: int
    started: float  # seconds since the chaos phase began
    ended: float = 0.0
    ok: bool = False
    error: str = ""
    route: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    max_gap_ms: float = 0.0  # largest gap between two consecutive tokens
    lost: int = 0  # reference tokens missing from this stream
    duplicated: int = 0  # tokens in this stream the reference does not have
    different: int = 0  # tokens replaced by others
    max_logprob_diff: float = 0.0


async def stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int, record: StreamRecord,
                     live: dict[int, list[str]]) -> None:  # fmt: skip
    """Stream one greedy chat completion into `record`; `live` holds the routes of open streams."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "stream": True,
    }
    last = None
    key = id(record)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}: {response.text[:300]}"
                return
            record.route = response.headers.get("x-swarm-route", "").split(",")
            live[key] = record.route
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message", chunk["error"]))[:300]
                    continue
                for choice in chunk.get("choices") or []:
                    content = (choice.get("logprobs") or {}).get("content") or []
                    if content:
                        now = time.perf_counter()
                        if last is not None:
                            record.max_gap_ms = max(record.max_gap_ms, (now - last) * 1000)
                        last = now
                    for item in content:
                        record.tokens.append(item["token"])
                        record.logprobs.append(item["logprob"])
            record.ok = done and not record.error and len(record.tokens) == max_tokens
            if done and not record.error and len(record.tokens) != max_tokens:
                record.error = f"{len(record.tokens)} tokens instead of {max_tokens}"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        live.pop(key, None)


def compare(record: StreamRecord, reference: StreamRecord) -> None:
    """Count tokens lost, duplicated and different against the reference (difflib opcodes)."""
    matcher = difflib.SequenceMatcher(a=reference.tokens, b=record.tokens, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "delete":
            record.lost += i2 - i1
        elif tag == "insert":
            record.duplicated += j2 - j1
        elif tag == "replace":
            common = min(i2 - i1, j2 - j1)
            record.different += common
            record.lost += (i2 - i1) - common
            record.duplicated += (j2 - j1) - common
    pairs = zip(reference.logprobs, record.logprobs, strict=False)
    record.max_logprob_diff = max((abs(a - b) for a, b in pairs), default=0.0)


def peer_ids(swarm: LocalSwarm) -> dict[str, Child]:
    """peer id -> live, ready peer process (from each peer's start-up log line)."""
    found = {}
    for child in swarm.children:
        if not child.name.startswith("peer") or not child.alive():
            continue
        log = child.log()
        match = PEER_ID.search(log)
        if match and "PEER_READY" in log:
            found[match.group(1)] = child
    return found


def span_of(child: Child) -> tuple[int, int]:
    args = child.process.args
    start, end = args[args.index("--blocks") + 1].split(":")
    return int(start), int(end)


def choose_victim(swarm: LocalSwarm, spans: list[tuple[int, int]], turn: int,
                  live: dict[int, list[str]]) -> tuple[str, Child] | None:  # fmt: skip
    """The peer of the next span (round robin) that carries the most live streams, among spans
    that keep another ready replica."""
    ready = peer_ids(swarm)
    load: dict[str, int] = {}
    for route in live.values():
        for peer in route:
            load[peer] = load.get(peer, 0) + 1
    for offset in range(len(spans)):
        span = spans[(turn + offset) % len(spans)]
        replicas = [(pid, child) for pid, child in ready.items() if span_of(child) == span]
        if len(replicas) >= 2:
            return max(replicas, key=lambda item: (load.get(item[0], 0), item[0]))
    return None


async def run(args: argparse.Namespace) -> dict:
    from peer.demo_model import create_demo_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    model_dir = create_demo_model(workdir / "model", preset=args.preset)
    spans = split_blocks(num_blocks_of(model_dir), args.spans)
    peer_flags = ["--threads", "1", *args.peer_flag]
    swarm = LocalSwarm(model_dir, workdir=workdir, heartbeat=args.heartbeat, ttl=args.ttl, model_name=MODEL)
    texts = prompts(args.prompts)
    kills: list[dict] = []
    with swarm:
        swarm.start_dht()
        swarm.start_peers(spans * args.replicas, *peer_flags)
        gateway = swarm.start_gateway(
            None, "--step-timeout", str(args.step_timeout), "--failover-timeout", str(args.failover_timeout),
            "--dht-port", str(free_port(2)),
        )  # fmt: skip
        limits = httpx.Limits(max_connections=args.concurrency + 4)
        async with httpx.AsyncClient(base_url=gateway.address, timeout=300, limits=limits) as client:
            await wait_models(client)
            live: dict[int, list[str]] = {}
            # 1. reference run, same concurrency, no failure
            print(f"reference run: {len(texts)} prompts, {args.max_tokens} tokens each", flush=True)
            references = [StreamRecord(i, i, 0.0) for i in range(len(texts))]
            gate = asyncio.Semaphore(args.concurrency)

            async def reference_one(record: StreamRecord) -> None:
                async with gate:
                    await stream_one(client, texts[record.prompt], args.max_tokens, record, live)

            await asyncio.gather(*(reference_one(r) for r in references))
            bad = [r for r in references if not r.ok]
            if bad:
                raise RuntimeError(f"reference run failed: {[r.error for r in bad]}")
            before = (await client.get("/health")).json()["failover"]

            # 2. chaos
            print(f"chaos: {args.concurrency} streams for {args.duration:.0f} s, a SIGKILL every "
                  f"{args.kill_interval:.0f} s", flush=True)  # fmt: skip
            records: list[StreamRecord] = []
            began = time.perf_counter()
            stop_at = began + args.duration

            async def worker(index: int) -> None:
                turn = 0
                while time.perf_counter() < stop_at:
                    prompt = (index + turn * args.concurrency) % len(texts)
                    record = StreamRecord(prompt, index, time.perf_counter() - began)
                    records.append(record)
                    await stream_one(client, texts[prompt], args.max_tokens, record, live)
                    record.ended = time.perf_counter() - began
                    compare(record, references[prompt])
                    if not record.ok:
                        print(
                            f"  stream failed (worker {index}, prompt {prompt}): {record.error}", flush=True
                        )
                    turn += 1

            async def chaos() -> None:
                turn = 0
                while True:
                    at = began + args.kill_interval * (turn + 0.5)
                    if at >= stop_at:
                        return
                    await asyncio.sleep(at - time.perf_counter())
                    victim = choose_victim(swarm, spans, turn, live)
                    turn += 1
                    if victim is None:
                        kills.append(
                            {
                                "t_s": round(time.perf_counter() - began, 1),
                                "skipped": "no span has 2 ready replicas",
                            }
                        )
                        continue
                    peer_id, child = victim
                    carried = sum(peer_id in route for route in live.values())
                    child.signal(signal.SIGKILL)
                    span = span_of(child)
                    swarm.spawn_peer(*span, *peer_flags)  # same span; it joins once ready
                    kills.append({"t_s": round(time.perf_counter() - began, 1), "peer": peer_id,
                                  "span": list(span), "streams_on_it": carried})  # fmt: skip
                    print(f"  t={kills[-1]['t_s']:.1f}s SIGKILL {peer_id} {span} carrying {carried} stream(s)",
                          flush=True)  # fmt: skip

            await asyncio.gather(chaos(), *(worker(i) for i in range(args.concurrency)))
            elapsed = time.perf_counter() - began
            health = (await client.get("/health")).json()["failover"]
        logs = {
            child.name: child.log()[-4000:] for child in swarm.children if not child.name.startswith("peer")
        }
    return summarize(args, spans, references, records, kills, before, health, elapsed, workdir, logs)


def summarize(args, spans, references, records, kills, before, health, elapsed, workdir, logs) -> dict:
    completed = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    # pauses of the failovers that happened during the chaos phase (the reference run had none)
    new_events = health["failovers"] + health["migrations"] - before["failovers"] - before["migrations"]
    pauses = health["pauses_ms"][-new_events:] if new_events > 0 else []
    chaos_gaps = [r.max_gap_ms for r in records if r.ok]
    reference_gaps = [r.max_gap_ms for r in references]
    return {
        "benchmark": "chaos",
        "command": " ".join(["python -m loadtests.chaos", *sys.argv[1:]]),
        "setup": {
            "model": f"demo preset '{args.preset}' (random weights), {num_blocks_of(workdir / 'model')} blocks",
            "spans": [list(s) for s in spans],
            "replicas_per_span": args.replicas,
            "peer_flags": ["--threads", "1", *args.peer_flag],
            "gateway_flags": {
                "step_timeout_s": args.step_timeout,
                "failover_timeout_s": args.failover_timeout,
            },
            "heartbeat_s": args.heartbeat,
            "ttl_s": args.ttl,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "kill_interval_s": args.kill_interval,
            "max_tokens": args.max_tokens,
            "prompts": len(references),
            "sampling": "greedy (temperature 0), ignore_eos",
            "host": f"{platform.machine()}, {platform.python_version()}, {__import__('os').cpu_count()} CPU cores",
        },
        "elapsed_s": round(elapsed, 1),
        "kills": kills,
        "streams_started": len(records),
        "streams_completed": len(completed),
        "streams_failed": len(failed),
        "failures": [
            {"worker": r.worker, "prompt": r.prompt, "t_s": round(r.started, 1), "error": r.error}
            for r in failed
        ],  # fmt: skip
        "tokens_received": sum(len(r.tokens) for r in records),
        "tokens_lost": sum(r.lost for r in records),
        "tokens_duplicated": sum(r.duplicated for r in records),
        "tokens_different": sum(r.different for r in records),
        "streams_differing_from_reference": sum(1 for r in records if r.lost or r.duplicated or r.different),
        "max_logprob_diff": max((r.max_logprob_diff for r in records), default=0.0),
        "gateway_failover": {
            "failovers": health["failovers"] - before["failovers"],
            "migrations": health["migrations"] - before["migrations"],
            "exhausted": health["exhausted"] - before["exhausted"],
            "pause_ms_p50": statistics.median(pauses) if pauses else None,
            "pause_ms_max": max(pauses) if pauses else None,
            "pauses_ms": pauses,
        },
        "client_max_gap_ms": {
            "chaos_p50": round1(statistics.median(chaos_gaps) if chaos_gaps else None),
            "chaos_p99": round1(percentile(chaos_gaps, 0.99)),
            "chaos_max": round1(max(chaos_gaps, default=None)),
            "reference_p50": round1(statistics.median(reference_gaps) if reference_gaps else None),
            "reference_max": round1(max(reference_gaps, default=None)),
        },
        "workdir": str(workdir),
        "logs_tail": logs if failed else {},
    }


def markdown(result: dict) -> str:
    s, g, c = result["setup"], result["gateway_failover"], result["client_max_gap_ms"]
    kills = [k for k in result["kills"] if "peer" in k]
    rows = [
        ("streams started / completed / failed",
         f"{result['streams_started']} / {result['streams_completed']} / {result['streams_failed']}"),
        ("peers SIGKILLed (and restarted, same span)", f"{len(kills)} (streams on the victim: "
         f"{', '.join(str(k['streams_on_it']) for k in kills)})"),
        ("failovers (gateway `/health`)", f"{g['failovers']} (exhausted: {g['exhausted']})"),
        ("failover pause, gateway: p50 / max", f"{g['pause_ms_p50']} ms / {g['pause_ms_max']} ms"),
        ("largest inter-token gap per stream, chaos: p50 / p99 / max",
         f"{c['chaos_p50']} ms / {c['chaos_p99']} ms / {c['chaos_max']} ms"),
        ("same, reference run (no failure): p50 / max", f"{c['reference_p50']} ms / {c['reference_max']} ms"),
        ("tokens received", str(result["tokens_received"])),
        ("tokens lost / duplicated / different vs reference",
         f"{result['tokens_lost']} / {result['tokens_duplicated']} / {result['tokens_different']}"),
        ("largest logprob difference vs reference", f"{result['max_logprob_diff']:.2e}"),
    ]  # fmt: skip
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""# Chaos benchmark: streams while peers die

Command (from the repository root):

```
{result["command"]}
```

Setup: {s["model"]}, spans {s["spans"]} with {s["replicas_per_span"]} replicas each, peers
`{" ".join(s["peer_flags"])}`, gateway step timeout {s["gateway_flags"]["step_timeout_s"]} s and
failover timeout {s["gateway_flags"]["failover_timeout_s"]} s, DHT heartbeat {s["heartbeat_s"]} s /
ttl {s["ttl_s"]} s. {s["concurrency"]} clients stream {s["prompts"]} fixed prompts back to back
({s["max_tokens"]} tokens each, {s["sampling"]}) for {s["duration_s"]:.0f} s while every
{s["kill_interval_s"]:.0f} s one peer is SIGKILLed (the replica carrying the most live streams of
the next span, round robin) and a new peer for its span is started. Every stream is compared token
by token with a reference run of the same prompt made before the chaos, with no failure.
Host: {s["host"]} (shared with other work: timings are noisy).

| figure | value |
| --- | --- |
{table}

How to read it: the gateway's pause is how much longer the step that met the failure took than a
normal step would have (detecting the broken stream, banning the peer, opening a replacement, and
replaying the stream's history to rebuild its KV cache). The client-side figure is the largest gap
between two tokens of each stream; compare it with the reference run, where no peer failed.
Raw results: `loadtests/results/chaos.json`.

## What the chaos run found
The first full run (same command) completed every stream with identical tokens, but the second kill
of each span paused its streams for 2.4-4.9 s (p50 363 ms, max 4867 ms). After a failure the gateway
tries the peers it knows first; that list still held the peer killed a minute earlier (a record
outlives its peer), its open failed at once, and the runner then fell back to a fresh DHT lookup,
which waits a DHT RPC timeout (2 s) for every dead node it meets, though a live replica was known
all along. The runner now prefers unexpired records and tries the other known peers before any
lookup (`RouteRunner._recover`; regression test
`tests/test_failover.py::test_a_dead_known_peer_is_skipped_before_any_dht_lookup`). The table
above is from the run after that fix.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of chaos")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent streams")
    parser.add_argument("--kill-interval", type=float, default=20.0, help="seconds between SIGKILLs")
    parser.add_argument("--spans", type=int, default=3, help="spans the model is split into")
    parser.add_argument("--replicas", type=int, default=2, help="peers per span")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per stream")
    parser.add_argument("--prompts", type=int, default=16, help="distinct fixed prompts")
    parser.add_argument("--preset", default="demo", help="demo model preset (peer/demo_model.py)")
    parser.add_argument("--step-timeout", type=float, default=10.0, help="gateway --step-timeout")
    parser.add_argument("--failover-timeout", type=float, default=5.0, help="gateway --failover-timeout")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="peers' DHT heartbeat, seconds")
    parser.add_argument("--ttl", type=float, default=10.0, help="peers' DHT record ttl, seconds")
    parser.add_argument(
        "--peer-flag", action="append", default=[], help="extra flag for every peer (repeatable)"
    )
    parser.add_argument(
        "--workdir", default=None, help="where the model and the logs go (default: a temp dir)"
    )
    parser.add_argument("--output", default="loadtests/results/chaos.json", help="JSON results")
    parser.add_argument("--markdown", default="docs/benchmarks-chaos.md", help="markdown table ('' to skip)")
    parser.add_argument("--render", default=None, help="only rewrite --markdown from this JSON result")
    args = parser.parse_args(argv)
    if args.render:
        Path(args.markdown).write_text(markdown(json.loads(Path(args.render).read_text())))
        return 0
    if args.concurrency < 1 or args.duration <= 0 or args.kill_interval <= 0 or args.replicas < 2:
        parser.error("need --concurrency >= 1, --duration > 0, --kill-interval > 0 and --replicas >= 2")
    result = asyncio.run(run(args))
    write_results(Path(args.output), result, indent=2)
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    summary = {k: result[k] for k in ("streams_started", "streams_completed", "streams_failed", "tokens_lost",
                                      "tokens_duplicated", "tokens_different")}  # fmt: skip
    print(json.dumps({**summary, "gateway_failover": {k: v for k, v in result["gateway_failover"].items()
                                                      if k != "pauses_ms"},
                      "client_max_gap_ms": result["client_max_gap_ms"]}, indent=2))  # fmt: skip
    clean = not (result["streams_failed"] or result["tokens_lost"] or result["tokens_duplicated"]
                 or result["tokens_different"])  # fmt: skip
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())

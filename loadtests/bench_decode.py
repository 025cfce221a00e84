"""Decode benchmark (issue 2): ms/token through the local swarm against ``transformers`` ``generate()``.

For each model a real ``LocalSwarm`` is started (DHT node, 2 block peers, gateway: separate
processes, as ``swarm up`` runs them) and one generation of ``--new-tokens`` tokens at batch 1,
greedy, is timed in four ways, interleaved inside every repeat so that machine noise hits all of
them alike:

``http``       the product: ``POST /v1/completions`` with ``stream: true``, ``temperature: 0``,
               ``ignore_eos: true`` through the gateway; a token's time is when its SSE chunk
               arrives. ``logprobs: 0`` is set so that the gateway sends exactly one chunk per token
               (without it a token whose text is still an incomplete UTF-8 sequence sends no chunk,
               and chunks could not be mapped to tokens); it costs the gateway one
               ``tokenizer.decode`` per token.
``reference``  ``AutoModelForCausalLM.from_pretrained(folder).generate(do_sample=False,
               max_new_tokens=N, min_new_tokens=N)`` in this process; a token's time is when
               ``generate`` hands it to a streamer.
``grpc``       the same peers driven straight from this process with ``common.peer_client.PeerSession``
               (the gateway's step loop without HTTP, FastAPI, SSE or detokenizing); also times
               each hop as the client sees it.
``spans``      both ``BlockSpan`` halves loaded in this process and run back to back, sampling
               with the peer's own ``Sampler``: the peers' compute without gRPC or processes.

``http_stepwise`` ``http`` through a second gateway on the same peers started with
               ``--no-decode-loop``: the gateway sends every decode step itself instead of the last
               peer sending each next step straight to the first (push's decode loop,
               docs/self-organizing.md); ``http`` over it is what the loop saves
               (``decode_loop_ratio``).
``http_secure`` (with ``--secure``) ``http`` through a second swarm of the same model that runs
               private (a swarm key: HMAC-tagged DHT datagrams and a membership credential on
               every gRPC call) over mutual TLS between gateway and peers; its median over
               ``http``'s is the cost of security (``security_ratio``).

Decode ms/token = (time of the last token - time of the first token) / (tokens - 1), so prefill is
excluded; TTFT (request to first token) is reported beside it. Medians over ``--repeats``; the
headline ratio is median(http) / median(reference). The peers get ``--threads N`` and this process
``torch.set_num_threads(N)``, so both sides compute with the same threads; N defaults to 1, not to
the core count (see ``--threads`` and docs/benchmarks.md for why). The CPU time the working
processes used is recorded per run too: CPU ms/token is steadier than wall time on a shared machine.

    python -m loadtests.bench_decode [--models demo,bench] [--new-tokens 128] [--repeats 3]
                                     [--out loadtests/results/decode.json] [--docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.swarm_bench import command_line, write_marked_section, write_results

REPO = Path(__file__).resolve().parent.parent
# A fixed prompt; its text is tokenized by each model's own tokenizer (16 tokens or so).
PROMPT = "The lighthouse keeper climbed the stairs every evening at six and"


@dataclass
class Run:
    """One timed generation."""

    mode: str
    decode_ms: float  # per token, first token excluded
    ttft_ms: float
    tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)
    text: str = field(default="", repr=False)
    hops_ms: list[float] = field(default_factory=list)  # per-hop (grpc) or per-span (spans) ms/token
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU seconds the processes doing the work used during the run (all threads)


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, all threads (Linux /proc; 0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(pids: list[int], fn) -> Run:  # noqa: ANN001
    """Run ``fn`` and note its wall time and the CPU time ``pids`` used meanwhile.

    On a busy machine CPU time per token is the steadier figure, and cpu/wall (the share of a core
    the work got) shows when a run was starved by other processes.
    """
    before = sum(process_cpu_s(pid) for pid in pids)
    begin = time.perf_counter()
    run = fn()
    run.wall_s = time.perf_counter() - begin
    run.cpu_s = sum(process_cpu_s(pid) for pid in pids) - before
    return run


def decode_ms(stamps: list[float]) -> float:
    if len(stamps) < 2:
        raise RuntimeError(f"need at least 2 tokens to time decoding, got {len(stamps)}")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000


# ---- reference: transformers generate() -----------------------------------------------------------
class TimingStreamer:
    """A ``generate`` streamer that only records when each new token arrives."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:  # noqa: ANN001 - a tensor of token ids
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        now = time.perf_counter()
        self.stamps.extend([now] * int(value.numel()))

    def end(self) -> None:
        pass


def run_reference(model, prompt_ids: list[int], new_tokens: int) -> Run:  # noqa: ANN001
    import torch

    input_ids = torch.tensor([prompt_ids])
    streamer = TimingStreamer()
    begin = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            streamer=streamer,
        )
    ids = out[0, len(prompt_ids) :].tolist()
    return Run("reference", decode_ms(streamer.stamps), (streamer.stamps[0] - begin) * 1000, len(ids), ids)


# ---- the product: HTTP through the gateway --------------------------------------------------------
def run_http(client, base_url: str, model_id: str, prompt_ids: list[int], new_tokens: int) -> Run:  # noqa: ANN001
    body = {
        "model": model_id,
        "prompt": prompt_ids,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "logprobs": 0,
        "stream_options": {"include_usage": True},
    }
    stamps: list[float] = []
    text, usage = "", None
    begin = time.perf_counter()
    with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(
                f"gateway answered {response.status_code}: {response.read().decode(errors='replace')}"
            )
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                logprobs = choice.get("logprobs") or {}
                stamps.extend([now] * len(logprobs.get("tokens") or []))
                text += choice.get("text") or ""
            usage = chunk.get("usage") or usage
    if usage and usage.get("completion_tokens") != len(stamps):
        raise RuntimeError(f"counted {len(stamps)} token chunks, usage says {usage.get('completion_tokens')}")
    return Run("http", decode_ms(stamps), (stamps[0] - begin) * 1000, len(stamps), text=text)


# ---- the peers without the gateway ----------------------------------------------------------------
async def run_grpc(pool, hops: list[tuple[str, int, int]], prompt_ids: list[int], new_tokens: int) -> Run:  # noqa: ANN001
    """The gateway's step loop (gateway/generation.py) written out, timing each hop."""
    from common.peer_client import PeerSession
    from protos import swarm_pb2

    sessions = [PeerSession(pool, address) for address, _, _ in hops]
    last = len(hops) - 1
    begin = time.perf_counter()
    try:
        opens = []
        for i, (session, (_, start, end)) in enumerate(zip(sessions, hops, strict=True)):
            message = swarm_pb2.OpenSession(
                start_block=start, end_block=end, max_length=len(prompt_ids) + new_tokens
            )
            if i == last:
                message.sampling.CopyFrom(swarm_pb2.SamplingParams(temperature=0.0))  # greedy
            opens.append(session.open(message))
        await asyncio.gather(*opens)
        stamps: list[float] = []
        hop_time = [0.0] * len(hops)
        ids: list[int] = []
        step_ids, position = list(prompt_ids), 0
        while len(ids) < new_tokens:
            hidden = None
            for i, session in enumerate(sessions):
                step = swarm_pb2.Step(token_ids=step_ids, position=position, sample=i == last)
                if hidden is not None:
                    step.hidden.CopyFrom(hidden)
                t = time.perf_counter()
                result = await session.step(step)
                if ids:  # decode steps only
                    hop_time[i] += time.perf_counter() - t
                hidden = result.hidden
            stamps.append(time.perf_counter())
            ids.append(result.token_id)
            position += len(step_ids)
            step_ids = [result.token_id]
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    steps = max(1, len(ids) - 1)
    return Run("grpc", decode_ms(stamps), (stamps[0] - begin) * 1000, len(ids), ids,
               hops_ms=[t / steps * 1000 for t in hop_time])  # fmt: skip


# ---- the spans' compute in this process -----------------------------------------------------------
def run_spans(spans, prompt_ids: list[int], new_tokens: int) -> Run:  # noqa: ANN001
    import torch

    from peer.sampling import Sampler, SamplingParams

    sampler = Sampler(SamplingParams(temperature=0.0))
    caches = [span.new_cache() for span in spans]
    history = list(prompt_ids)
    stamps: list[float] = []
    span_time = [0.0] * len(spans)
    ids: list[int] = []
    begin = time.perf_counter()
    with torch.inference_mode():
        x = torch.tensor(prompt_ids, dtype=torch.long)
        while len(ids) < new_tokens:
            for i, (span, cache) in enumerate(zip(spans, caches, strict=True)):
                t = time.perf_counter()
                x = span(x, [cache], [x.shape[0]])
                if span.is_last:
                    token = sampler.sample(span.logits(x[-1:])[0], history).token_id
                if ids:
                    span_time[i] += time.perf_counter() - t
            stamps.append(time.perf_counter())
            ids.append(token)
            history.append(token)
            x = torch.tensor([token], dtype=torch.long)
    steps = max(1, len(ids) - 1)
    return Run("spans", decode_ms(stamps), (stamps[0] - begin) * 1000, len(ids), ids,
               hops_ms=[t / steps * 1000 for t in span_time])  # fmt: skip


# ---- one model ------------------------------------------------------------------------------------
def wait_for_model(client, base_url: str, model_id: str, timeout: float = 60.0) -> None:  # noqa: ANN001
    """The gateway lists a model once the DHT shows peers covering all of its blocks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"{base_url}/v1/models")
        if response.status_code == 200 and any(card["id"] == model_id for card in response.json()["data"]):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{model_id} never became routable at {base_url}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_model(preset: str, args: argparse.Namespace) -> dict:
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.peer_client import ChannelPool, peer_info
    from peer.demo_model import ensure_demo_model
    from peer.model import BlockSpan
    from swarm.launcher import LocalSwarm, num_blocks_of, split_blocks

    # a folder written by the caller (loadtests.bench_families: one per model family), else a preset
    model_dir = getattr(args, "model_dirs", {}).get(preset) or ensure_demo_model(
        args.cache_dir, preset=preset
    )
    model_id = f"bench-{preset}"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = sum(p.numel() for p in reference.parameters())
    split = split_blocks(num_blocks_of(model_dir), args.peers)
    spans = [BlockSpan.load(model_dir, start, end) for start, end in split] if "spans" in args.modes else []
    n = args.new_tokens
    print(f"\n== {preset}: {params / 1e6:.1f} M params, {model_dir}, spans {split}, prompt {len(prompt_ids)} tokens",
          flush=True)  # fmt: skip

    runs: dict[str, list[Run]] = {mode: [] for mode in args.modes}
    # In-process torch work runs in one worker thread, as a peer runs its forward passes (in its
    # BatchScheduler's single thread), so both sides compute under the same OpenMP conditions.
    torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    torch_thread.submit(torch.set_num_threads, args.threads).result()
    load_before = os.getloadavg()
    swarm = LocalSwarm(model_dir, log_level="WARNING", model_name=model_id)
    secure = secure_swarm(model_dir, model_id) if "http_secure" in args.modes else None
    loop = asyncio.new_event_loop()
    pool = ChannelPool()
    try:
        started = time.perf_counter()
        swarm.start_dht()
        peers = [swarm.start_peer(start, end, "--threads", str(args.threads), timeout=args.start_timeout)
                 for start, end in split]  # fmt: skip
        gateway = swarm.start_gateway()
        if "http_stepwise" in args.modes:
            stepwise_gateway = swarm.start_gateway(None, "--no-decode-loop", name="gateway-stepwise")
        if secure is not None:
            secure_gateway = start_secure_swarm(secure, split, args.threads)
        hops = [(peer.address, start, end) for peer, (start, end) in zip(peers, split, strict=True)]
        with httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0)) as client:
            wait_for_model(client, gateway.address, model_id)
            if "http_stepwise" in args.modes:
                wait_for_model(client, stepwise_gateway.address, model_id)
            if secure is not None:
                wait_for_model(client, secure_gateway.address, model_id)
            startup_s = time.perf_counter() - started
            throughput = [
                loop.run_until_complete(peer_info(pool, address)).throughput for address, _, _ in hops
            ]

            me = os.getpid()
            swarm_pids = [child.process.pid for child in swarm.children]
            secure_pids = [child.process.pid for child in secure.children] if secure is not None else []

            def one(mode: str, tokens: int) -> Run:
                if mode == "http":  # the client's own parsing is not the swarm's cost
                    return timed(
                        swarm_pids, lambda: run_http(client, gateway.address, model_id, prompt_ids, tokens)
                    )
                if mode == "http_stepwise":
                    return timed(
                        swarm_pids,
                        lambda: run_http(client, stepwise_gateway.address, model_id, prompt_ids, tokens),
                    )
                if mode == "http_secure":
                    return timed(
                        secure_pids,
                        lambda: run_http(client, secure_gateway.address, model_id, prompt_ids, tokens),
                    )
                if mode == "reference":
                    return timed(
                        [me],
                        lambda: torch_thread.submit(run_reference, reference, prompt_ids, tokens).result(),
                    )
                if mode == "grpc":  # this process plays the gateway
                    return timed(
                        [me, *swarm_pids],
                        lambda: loop.run_until_complete(run_grpc(pool, hops, prompt_ids, tokens)),
                    )
                return timed([me], lambda: torch_thread.submit(run_spans, spans, prompt_ids, tokens).result())

            for mode in args.modes:  # warm-up: first connections, allocator, OpenMP teams, lazy imports
                one(mode, min(n, args.warmup_tokens))
            for repeat in range(args.repeats):
                for mode in args.modes:
                    run = one(mode, n)
                    runs[mode].append(run)
                    hops_text = f"  per hop/span {[round(h, 2) for h in run.hops_ms]}" if run.hops_ms else ""
                    print(f"  repeat {repeat + 1}/{args.repeats} {mode:9s} {run.decode_ms:8.2f} ms/token  "
                          f"ttft {run.ttft_ms:7.1f} ms  cpu {run.cpu_s / run.tokens * 1000:6.2f} ms/token "
                          f"(share {run.cpu_s / run.wall_s:4.2f})  load {os.getloadavg()[0]:.1f}{hops_text}",
                          flush=True)  # fmt: skip
    finally:
        loop.run_until_complete(pool.close())
        loop.close()
        swarm.stop()
        if secure is not None:
            secure.stop()
        torch_thread.shutdown()
    load_after = os.getloadavg()

    ref_ids = runs["reference"][0].token_ids if runs.get("reference") else []
    ref_text = tokenizer.decode(ref_ids) if ref_ids else ""

    def summary(mode: str) -> dict:
        items = runs[mode]
        out = {
            "decode_ms_per_token": round(median([r.decode_ms for r in items]), 3),
            "ttft_ms": round(median([r.ttft_ms for r in items]), 2),
            "runs_decode_ms": [round(r.decode_ms, 3) for r in items],
            "runs_ttft_ms": [round(r.ttft_ms, 2) for r in items],
            "tokens": items[0].tokens if items else 0,
            "cpu_ms_per_token": round(median([r.cpu_s / r.tokens * 1000 for r in items]), 3),
            "cpu_share": round(median([r.cpu_s / r.wall_s for r in items]), 3),
        }
        if items and items[0].hops_ms:
            key = "per_hop_ms" if mode == "grpc" else "per_span_ms"
            out[key] = [round(median([r.hops_ms[i] for r in items]), 3) for i in range(len(items[0].hops_ms))]
        if ref_ids and mode in ("grpc", "spans"):
            out["same_tokens_as_reference"] = all(r.token_ids == ref_ids for r in items)
            out["matching_prefix_tokens"] = min(_common_prefix(r.token_ids, ref_ids) for r in items)
        if ref_ids and mode in ("http", "http_stepwise", "http_secure"):
            out["same_text_as_reference"] = all(r.text == ref_text for r in items)
        return out

    result = {
        "model": preset,
        "model_dir": str(model_dir),
        "params": params,
        "params_millions": round(params / 1e6, 1),
        "config": {
            k: reference.config.to_dict().get(k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
            )
        },  # fmt: skip
        "settings": {
            "peers": args.peers,
            "spans": [list(s) for s in split],
            "batch": 1,
            "greedy": True,
            "dtype": "float32",
            "prompt_tokens": len(prompt_ids),
            "new_tokens": n,
            "repeats": args.repeats,
            "threads": args.threads,
            "order_within_repeat": list(args.modes),
            "http_request": "POST /v1/completions stream=true temperature=0 ignore_eos=true logprobs=0",
            "reference_call": f"generate(do_sample=False, max_new_tokens={n}, min_new_tokens={n})",
        },
        "swarm_startup_s": round(startup_s, 2),
        "peer_announced_tokens_per_s": [round(t, 1) for t in throughput],
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "modes": {mode: summary(mode) for mode in args.modes},
    }
    modes = result["modes"]
    if "http" in modes and "reference" in modes:
        ref = modes["reference"]["decode_ms_per_token"]
        result["swarm_ms_per_token"] = modes["http"]["decode_ms_per_token"]
        result["reference_ms_per_token"] = ref
        result["ratio"] = round(modes["http"]["decode_ms_per_token"] / ref, 3)
        result["paired_ratios"] = _paired(runs, "http", "reference")
        result["cpu_ratio"] = round(
            modes["http"]["cpu_ms_per_token"] / modes["reference"]["cpu_ms_per_token"], 3
        )
        result["swarm_ttft_ms"] = modes["http"]["ttft_ms"]
        result["reference_ttft_ms"] = modes["reference"]["ttft_ms"]
        result["breakdown_ms_per_token"] = breakdown(modes)
    if "http" in modes and "http_stepwise" in modes:
        result["decode_loop_ratio"] = round(
            modes["http"]["decode_ms_per_token"] / modes["http_stepwise"]["decode_ms_per_token"], 3
        )
        result["decode_loop_paired_ratios"] = _paired(runs, "http", "http_stepwise")
    if "http" in modes and "http_secure" in modes:
        result["security_ratio"] = round(
            modes["http_secure"]["decode_ms_per_token"] / modes["http"]["decode_ms_per_token"], 3
        )
        result["security_paired_ratios"] = _paired(runs, "http_secure", "http")
        result["security_cpu_ratio"] = round(
            modes["http_secure"]["cpu_ms_per_token"] / modes["http"]["cpu_ms_per_token"], 3
        )
    return result


def _paired(runs: dict[str, list], mode: str, over: str) -> list[float]:
    """`mode`'s decode ms/token over `over`'s, repeat by repeat (each pair timed back to back)."""
    return [round(a.decode_ms / b.decode_ms, 3) for a, b in zip(runs[mode], runs[over], strict=False)]


def secure_swarm(model_dir: Path, model_id: str):
    """A `LocalSwarm` of the model that will run private (a new swarm key) over mutual TLS."""
    from common.swarm_key import create_swarm_key
    from swarm.launcher import LocalSwarm

    swarm = LocalSwarm(model_dir, log_level="WARNING", model_name=model_id)
    swarm.swarm_key_file = create_swarm_key(swarm.workdir / "swarm.key")
    return swarm


def start_secure_swarm(swarm, split: list[tuple[int, int]], threads: int):  # noqa: ANN001
    """Start `secure_swarm`'s DHT node, peers and gateway with a throw-away CA; returns the gateway."""
    from common.pki import make_swarm_pki

    pki = make_swarm_pki(swarm.workdir / "pki")

    def tls(role: str) -> list[str]:
        return ["--tls-cert", str(pki[f"{role}_cert"]), "--tls-key", str(pki[f"{role}_key"]),
                "--tls-ca", str(pki["ca"])]  # fmt: skip

    swarm.start_dht()
    for start, end in split:
        swarm.start_peer(start, end, "--threads", str(threads), *tls("peer"))
    return swarm.start_gateway(None, *tls("gateway"), name="gateway-secure")


def breakdown(modes: dict) -> dict:
    """Where the swarm's time per token goes, by differences of medians (noisy when small)."""
    get = lambda mode: modes[mode]["decode_ms_per_token"] if mode in modes else None  # noqa: E731
    ref, spans, grpc, http = get("reference"), get("spans"), get("grpc"), get("http")
    out: dict = {"reference_generate": ref}
    if spans is not None:
        out["span_compute_in_process"] = spans
        out["span_compute_minus_reference"] = round(spans - ref, 3)
    if grpc is not None and spans is not None:
        out["grpc_peers_minus_span_compute"] = round(grpc - spans, 3)
        hop_ms, span_ms = modes["grpc"].get("per_hop_ms"), modes["spans"].get("per_span_ms")
        if hop_ms and span_ms:
            out["per_hop_overhead"] = [round(h - s, 3) for h, s in zip(hop_ms, span_ms, strict=True)]
    if http is not None and grpc is not None:
        out["gateway_http_minus_grpc"] = round(http - grpc, 3)
    if http is not None:
        out["swarm_http_minus_reference"] = round(http - ref, 3)
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---- report ---------------------------------------------------------------------------------------
def markdown_table(results: dict) -> str:
    rows = [
        "| model | params | swarm ms/token (HTTP) | `generate()` ms/token | **ratio** | swarm TTFT ms | `generate()` TTFT ms "
        "| swarm, `--no-decode-loop` ms/token | swarm without gateway (gRPC) ms/token | spans in one process ms/token "
        "| CPU ms/token swarm / `generate()` | load avg |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for r in results["models"]:
        m = r["modes"]
        cell = lambda mode, m=m: f"{m[mode]['decode_ms_per_token']:.2f}" if mode in m else "n/a"  # noqa: E731
        cpu = (
            f"{m['http']['cpu_ms_per_token']:.1f} / {m['reference']['cpu_ms_per_token']:.1f}"
            if "http" in m
            else "n/a"
        )
        load = f"{r['loadavg_before'][0]:.1f} → {r['loadavg_after'][0]:.1f}"
        rows.append(
            f"| {r['model']} ({r['config']['hidden_size']}×{r['config']['num_hidden_layers']}, vocab "
            f"{r['config']['vocab_size']}) | {r['params_millions']} M | {r.get('swarm_ms_per_token', float('nan')):.2f} "
            f"| {r.get('reference_ms_per_token', float('nan')):.2f} | **{r.get('ratio', float('nan')):.2f}** "
            f"| {r.get('swarm_ttft_ms', float('nan')):.1f} | {r.get('reference_ttft_ms', float('nan')):.1f} "
            f"| {cell('http_stepwise')} | {cell('grpc')} | {cell('spans')} | {cpu} | {load} |"
        )
    machine = results["machine"]
    settings = results["models"][0]["settings"] if results["models"] else {}
    rows.append("")
    rows.append(
        f"{machine['cpu_count']} cores ({machine['cpu_model']}), torch {machine['torch']}, transformers "
        f"{machine['transformers']}; `--threads {settings.get('threads')}` in each peer and "
        f"`torch.set_num_threads({settings.get('threads')})` for the reference; batch 1, greedy, fp32, "
        f"{settings.get('prompt_tokens')}-token prompt, {settings.get('new_tokens')} new tokens, median of "
        f"{settings.get('repeats')} interleaved repeats. Ratio = swarm / `generate()` decode ms/token (goal: <= 1.05). "
        f"Run {results['finished_at']}."
    )
    return "\n".join(rows)


def update_docs(path: Path, table: str, command: str) -> None:
    """Replace the table between the markers in the write-up (or append a section with them)."""
    write_marked_section(
        path, "bench_decode:table", f"Reproduce: `{command}`\n\n{table}", "## Decode ms/token"
    )


def machine_info(threads: int) -> dict:
    import torch
    import transformers

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": threads,
        "torch_parallel_backend": "OpenMP" if "OpenMP" in torch.__config__.parallel_info() else "other",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from swarm.launcher import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,bench", help="comma-separated demo-model presets")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=120.0,
                        help="seconds a peer may take to load and calibrate (more on a loaded machine)")  # fmt: skip
    parser.add_argument("--warmup-tokens", type=int, default=32, help="one untimed run of each mode first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in each peer (--threads) and in the reference (set_num_threads). Default 1, not "
        "the core count: batch-1 Linear layers run on one thread anyway, peers run their forward passes on "
        "one thread, and 2 OpenMP threads per process on a 2-core box spin against each other and the other "
        "processes, which slowed generate() 3-4x here (see docs/benchmarks.md)",
    )
    parser.add_argument("--modes", default="http,http_stepwise,reference,grpc,spans",
                        help="what to time, in this order inside each repeat; http and reference are the headline")  # fmt: skip
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the model folders are made"
    )
    parser.add_argument("--secure", action="store_true",
                        help="also time http_secure (after http in each repeat): a second swarm with a swarm key "
                             "and mutual TLS; reports security_ratio = http_secure / http")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "decode.json")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"),
                        help="write-up whose table is replaced ('' to leave it alone)")  # fmt: skip
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - {"http", "http_stepwise", "reference", "grpc", "spans"}
    if unknown or "reference" not in args.modes:
        parser.error(
            "--modes must include reference and only name http, http_stepwise, reference, grpc, spans "
            f"(got {args.modes})"
        )
    if args.secure:
        if "http" not in args.modes:
            parser.error("--secure compares against http: keep http in --modes")
        args.modes.insert(args.modes.index("http") + 1, "http_secure")
    if args.new_tokens < 2 or args.repeats < 1 or args.threads < 1:
        parser.error("need --new-tokens >= 2, --repeats >= 1, --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"benchmark": "decode", "machine": machine_info(args.threads), "models": []}
    for preset in args.models:
        results["models"].append(bench_model(preset, args))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = command_line(
        "loadtests.bench_decode",
        (argv if argv is not None else sys.argv[1:]) or ["--models", ",".join(args.models)],
    )
    results["command"] = command
    write_results(args.out, results, indent=2)
    table = markdown_table(results)
    print("\n" + table + "\n")
    print(json.dumps({r["model"]: r.get("breakdown_ms_per_token") for r in results["models"]}, indent=1))
    for r in results["models"]:
        if "security_ratio" in r:
            print(f"{r['model']}: security_ratio {r['security_ratio']} (paired {r['security_paired_ratios']}, "
                  f"cpu {r['security_cpu_ratio']})")  # fmt: skip
    if args.docs:
        update_docs(Path(args.docs), table, command)
    print(f"\ndone in {results['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batching benchmark (issue 5): aggregate throughput at 1..32 streams, cache reuse across turns,
and peer memory under load, on the ~150M "bench" model over a 2-peer local swarm.

In one run, against one machine's noise:

* **swarm**: `loadtests.loadgen` at concurrency C (C in --levels), 2*C requests of --input-len
  prompt tokens in (chat template included; see `loadtests.loadgen`) and exactly --output-len
  tokens out (`ignore_eos`), through the gateway's streaming
  API. Aggregate output tokens/s, and each level as a multiple of the 1-stream figure.
* **reference**: `transformers` `generate()` in this process on a batch of C prompts of the same
  length, greedy (or sampled at --temperature, like the swarm's requests), exactly --output-len new tokens: batch*tokens / wall time, and the same multiple.
  Measured right after the swarm's level C, the swarm idle meanwhile (its peers' start-up profile
  rounds over by then): the two figures of a level are seconds apart, so the machine's drift
  over the run (on these shared machines the reference moved 105 -> 154 tok/s between two runs
  minutes apart) weighs on both alike.
* **second turn**: a conversation whose first user message is ~--history tokens; TTFT of its
  second turn (which resumes the peers' caches and sends only the new tokens) against the first
  turn's; median over --conversations conversations, plain OpenAI requests (no session header).
* **memory**: peak RSS of each peer process (sampled every 50 ms from /proc) during the
  highest-concurrency run, beside the KV budget the peer was given (`--cache-tokens`).

    python -m loadtests.bench_batching [--levels 1,4,8,16,32] [--output-len 32] [--input-len 32]
        [--history 1000] [--threads 1] [--ref-threads 2]
        [--out loadtests/results/batching.json] [--docs docs/benchmarks-batching.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from loadtests.swarm_bench import command_line, write_marked_section

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "bench-bench"


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """Samples the RSS of some processes in a thread; `peaks` holds the maximum of each."""

    def __init__(self, pids: list[int], interval: float = 0.05):
        self.pids = pids
        self.interval = interval
        self.peaks = [0] * len(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, pid in enumerate(self.pids):
                self.peaks[i] = max(self.peaks[i], rss_bytes(pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def reference_throughput(
    model,  # noqa: ANN001
    vocab: int,
    batch: int,
    input_len: int,
    output_len: int,
    temperature: float = 0.0,
) -> float:
    import torch

    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(10, vocab, (batch, input_len), generator=generator)
    mask = torch.ones_like(ids)
    # sampled as the swarm's requests are: the temperature alone (HF's top-k 50 default off)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": None}
        if temperature > 0
        else {"do_sample": False}
    )
    begin = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                             min_new_tokens=output_len, pad_token_id=0, **sampling)  # fmt: skip
    elapsed = time.perf_counter() - begin
    return batch * (out.shape[1] - input_len) / elapsed


def history_text(tokenizer, tokens: int) -> str:  # noqa: ANN001
    """A user message of about `tokens` tokens with this tokenizer."""
    import random

    from loadtests.loadgen import make_text

    rng = random.Random(0)
    words = tokens
    for _ in range(6):
        text = make_text(rng, words)
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if abs(count - tokens) <= tokens // 50:
            break
        words = max(1, round(words * tokens / max(1, count)))
    return text


async def second_turn(base_url: str, tokenizer, args) -> dict:  # noqa: ANN001
    import httpx

    from loadtests.loadgen import LoadConfig, stream_chat

    cfg = LoadConfig(base_url=base_url, model=MODEL_ID, output_len=args.output_len)
    firsts, seconds, prompts = [], [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        for i in range(args.conversations):
            messages = [{"role": "user", "content": f"[{i}] " + history_text(tokenizer, args.history)}]
            one, reply = await stream_chat(client, cfg, messages, {})
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "Say more about that."},
            ]
            two, _ = await stream_chat(client, cfg, messages, {})
            if not (one.ok and two.ok):
                raise RuntimeError(f"second-turn run failed: {one.error or two.error}")
            firsts.append(one.ttft)
            seconds.append(two.ttft)
            prompts.append((one.prompt_tokens, two.prompt_tokens))
    first, second = statistics.median(firsts), statistics.median(seconds)
    return {
        "history_tokens": prompts[0][0],
        "second_prompt_tokens": prompts[0][1],
        "conversations": args.conversations,
        "ttft_first_turn_ms": first * 1000,
        "ttft_second_turn_ms": second * 1000,
        "ratio": second / first,
        "goal_ratio_at_most": 0.25,
        "raw_ms": [[a * 1000, b * 1000] for a, b in zip(firsts, seconds, strict=True)],
    }


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.peer_client import ChannelPool
    from loadtests.loadgen import LoadConfig, run_load
    from peer.demo_model import ensure_demo_model
    from peer.server import REFINE_INTERVAL_S, REFINE_ROUNDS
    from swarm.launcher import LocalSwarm, balanced_split, num_blocks_of, split_blocks

    model_dir = ensure_demo_model(args.cache_dir, preset="bench")
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # as `swarm up` splits (its LM head counted), or in equal numbers of blocks
    split = (
        balanced_split(model_dir, 2)
        if args.split == "balanced"
        else split_blocks(num_blocks_of(model_dir), 2)
    )
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    results: dict = {
        "benchmark": "batching",
        "model": {
            "preset": "bench",
            "hidden": config["hidden_size"],
            "layers": config["num_hidden_layers"],
            "dtype": "float32",
            "spans": split,
        },  # fmt: skip
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    swarm = LocalSwarm(model_dir, log_level="WARNING", model_name=MODEL_ID)
    try:
        swarm.start_dht()
        flags = ["--threads", str(args.threads), "--cache-tokens", str(args.cache_tokens)]
        if args.prepack is not None:  # else each peer chooses (peer.batching_config)
            flags.append("--prepack" if args.prepack else "--no-prepack")
        if args.pipeline_groups != "auto":
            flags += ["--pipeline-groups", args.pipeline_groups]
        os.environ["SWARM_FEW_ROWS_KERNEL"] = args.few_rows_kernel  # the peers inherit it
        peers = swarm.start_peers(split, *flags)
        peers_ready = time.monotonic()
        # Under a burst of 32 prefills a step queues behind several full passes on these shared
        # cores; the default 10 s step deadline would call that a dead peer (and ban it).
        gateway = swarm.start_gateway(
            None, "--step-timeout", str(args.step_timeout), *(["--relay"] if args.relay else []),
            *([] if args.decode_loop else ["--no-decode-loop"]),
        )  # fmt: skip
        base = gateway.address
        for _ in range(120):  # the gateway lists the model once the DHT shows both peers
            import httpx

            if httpx.get(f"{base}/v1/models").json()["data"]:
                break
            time.sleep(0.5)

        def load(concurrency: int, requests: int) -> dict:
            cfg = LoadConfig(base_url=base, model=MODEL_ID, concurrency=concurrency, num_requests=requests,
                             input_len=args.input_len, output_len=args.output_len, progress=False,
                             temperature=args.temperature)  # fmt: skip
            return asyncio.run(run_load(cfg))

        torch.set_num_threads(args.ref_threads)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        reference_throughput(model, config["vocab_size"], 1, args.input_len, 4)  # warm-up
        load(1, 1)  # warm-up
        # idle peers take profile rounds for their first minute (peer.server), which would cost
        # the reference a few percent of the cores: start once they are over
        settle = REFINE_INTERVAL_S * REFINE_ROUNDS + 2 - (time.monotonic() - peers_ready)
        time.sleep(max(0.0, settle))
        swarm_rows = []
        ref_rows = []
        peaks: list[int] = []
        addresses = [peer.address for peer in peers]
        for level in args.levels:
            before = asyncio.run(_infos(ChannelPool(), addresses))
            if level == max(args.levels):
                with PeakRSS([peer.process.pid for peer in peers]) as sampler:
                    report = load(level, 2 * level)
                peaks = sampler.peaks
            else:
                report = load(level, 2 * level)
            swarm_rows.append({"concurrency": level, "output_tok_s": report["output_throughput"],
                               "failed": report["failed"], "errors": report["errors"], "ttft_p50_ms": report["ttft_ms"]["p50"],
                               "tpot_p50_ms": report["tpot_ms"]["p50"], "e2e_p50_ms": report["e2e_ms"]["p50"]})  # fmt: skip
            after = asyncio.run(_infos(ChannelPool(), addresses))
            # session steps per forward pass on each peer: how well the steps were packed
            swarm_rows[-1]["steps_per_pass"] = [
                round((a.steps - b.steps) / max(1, a.forward_passes - b.forward_passes), 2)
                for b, a in zip(before, after, strict=True)
            ]
            print(
                f"swarm  C={level:>3}: {report['output_throughput']:8.1f} tok/s  failed {report['failed']}  "
                f"steps/pass {swarm_rows[-1]['steps_per_pass']}",
                flush=True,
            )
            rate = reference_throughput(
                model, config["vocab_size"], level, args.input_len, args.output_len, args.temperature
            )
            ref_rows.append({"batch": level, "output_tok_s": rate})
            print(f"ref    B={level:>3}: {rate:8.1f} tok/s", flush=True)
        base_rate = swarm_rows[0]["output_tok_s"]
        for row in swarm_rows:
            row["x_vs_1"] = row["output_tok_s"] / base_rate if base_rate else 0.0
        results["swarm"] = swarm_rows

        pool = ChannelPool()
        infos = asyncio.run(_infos(pool, [peer.address for peer in peers]))
        results["memory"] = [
            {
                "peer": f"blocks [{start}, {end})",
                "peak_rss_mib": peak / 2**20,
                "budget_tokens": info.cache_budget_tokens,
                "budget_mib": info.cache_budget_tokens
                * 2 * (end - start) * config["num_key_value_heads"] * head_dim * 4 / 2**20,
                "evictions": info.evictions,
                "batching": info.batching,  # what the peer chose (peer.batching_config)
            }
            for (start, end), peak, info in zip(split, peaks, infos, strict=True)
        ]  # fmt: skip
        results["second_turn"] = asyncio.run(second_turn(base, tokenizer, args))
        print(f"second turn TTFT ratio {results['second_turn']['ratio']:.3f}", flush=True)
    finally:
        swarm.stop()

    for row in ref_rows:
        row["x_vs_1"] = row["output_tok_s"] / ref_rows[0]["output_tok_s"]
    results["reference"] = ref_rows
    return results


async def _infos(pool, addresses: list[str]):  # noqa: ANN001
    from common.peer_client import peer_info

    try:
        return [await peer_info(pool, address) for address in addresses]
    finally:
        await pool.close()


def peer_batching_flags(settings: dict) -> str:
    """The peers' batching flags as the write-up states them (none: the peers' own choice)."""
    flags = []
    if settings.get("prepack") is not None:
        flags.append("`--prepack`" if settings["prepack"] else "`--no-prepack`")
    if str(settings.get("pipeline_groups", "auto")) != "auto":
        flags.append(f"`--pipeline-groups {settings['pipeline_groups']}`")
    if settings.get("few_rows_kernel") == "off":
        flags.append("`SWARM_FEW_ROWS_KERNEL=off`")
    return " ".join(flags) or "their own batching choice (no `--prepack` / `--pipeline-groups` flag)"


def sampling_words(temperature: float) -> str:
    return f"sampled at temperature {temperature:g} on both sides" if temperature > 0 else "greedy"


def markdown(results: dict, command: str) -> str:
    s = results["settings"]
    lines = [
        "# Batching benchmark",
        "",
        f"Reproduce: `{command}`",
        "",
        f'Model: random Llama "bench" preset (hidden {results["model"]["hidden"]}, {results["model"]["layers"]} layers, '
        f"~156M params, fp32) over 2 local peers {results['model']['spans']}, each with `--threads {s['threads']}`, "
        f"`--cache-tokens {s['cache_tokens']}` and {peer_batching_flags(s)}, gateway `--step-timeout {s['step_timeout']}`; reference `transformers` `generate()` with "
        f"{s['ref_threads']} torch threads in one process, measured right after the swarm's level of the same size. Machine: {results['machine']['cpu_count']} CPU cores "
        f"(shared with other work, so figures are noisy). Requests: {s['input_len']} prompt tokens in, exactly "
        f"{s['output_len']} tokens out, {sampling_words(s.get('temperature', 0.0))}; 2×C requests per level. Finished {results.get('finished_at', '')}.",
        "",
        "## Aggregate output tokens/s",
        "",
        "| streams | swarm tok/s | swarm × 1-stream | failed | swarm TTFT p50 ms | swarm TPOT p50 ms "
        "| session steps per pass (each peer) | transformers tok/s | transformers × batch 1 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for sw, ref in zip(results["swarm"], results["reference"], strict=True):
        lines.append(
            f"| {sw['concurrency']} | {sw['output_tok_s']:.1f} | {sw['x_vs_1']:.2f}× | {sw['failed']} | {sw['ttft_p50_ms']:.0f} | "
            f"{sw['tpot_p50_ms']:.0f} | {' / '.join(str(x) for x in sw.get('steps_per_pass', []))} | "
            f"{ref['output_tok_s']:.1f} | {ref['x_vs_1']:.2f}× |"
        )
    st = results["second_turn"]
    lines += [
        "",
        "Goal: ≥4× at 8 streams, ≥6× at 16.",
        "",
        "## Second turn of a conversation (cache reuse)",
        "",
        f"First turn: {st['history_tokens']} prompt tokens; second turn: {st['second_prompt_tokens']} prompt tokens, "
        f"of which the peers already hold the first turn. Median of {st['conversations']} conversations, "
        "plain OpenAI requests (the conversation hash keys the session).",
        "",
        "| TTFT first turn ms | TTFT second turn ms | ratio (goal ≤ 0.25) |",
        "| ---: | ---: | ---: |",
        f"| {st['ttft_first_turn_ms']:.0f} | {st['ttft_second_turn_ms']:.0f} | {st['ratio']:.3f} |",
        "",
        f"## Peer memory during the {max(s['levels'])}-stream run",
        "",
        "| peer | peak RSS MiB | KV budget tokens | KV budget MiB | batching (the peer's `Info`) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for m in results["memory"]:
        lines.append(
            f"| {m['peer']} | {m['peak_rss_mib']:.0f} | {m['budget_tokens']} | {m['budget_mib']:.0f} "
            f"| {m.get('batching', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from swarm.launcher import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levels", default="1,4,8,16,32", help="concurrent streams (and reference batch sizes)"
    )
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy on both sides; above: both sample at it, nothing else set "
                        "(what an OpenAI client without sampling parameters gets at 1)")  # fmt: skip
    parser.add_argument(
        "--history", type=int, default=1000, help="tokens of the first turn in the reuse test"
    )
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    parser.add_argument(
        "--ref-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the reference"
    )
    parser.add_argument("--cache-tokens", type=int, default=16384, help="each peer's KV budget")
    parser.add_argument(
        "--prepack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="peers keep oneDNN-packed weights too, or not (swarm peer --prepack; default: the peers choose)",
    )
    parser.add_argument(
        "--pipeline-groups",
        default="auto",
        help="groups the first peer keeps, N or auto (swarm peer --pipeline-groups; default: the peer chooses)",
    )
    parser.add_argument("--few-rows-kernel", choices=["on", "off"], default="on",
                        help="off: the peers run without peer.skinny_gemm (SWARM_FEW_ROWS_KERNEL=off), "
                        "for a comparison")  # fmt: skip
    parser.add_argument("--split", choices=["balanced", "even"], default="balanced",
                        help="blocks per peer: balanced as `swarm up` does (the LM head counted), or even")  # fmt: skip
    parser.add_argument(
        "--relay",
        action="store_true",
        help="hidden states go through the gateway between hops (the default is push)",
    )
    parser.add_argument(
        "--decode-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="push's decode loop: the last peer sends each next step to the first (swarm gateway --decode-loop)",
    )
    parser.add_argument("--step-timeout", type=float, default=300.0, help="the gateway's per-step deadline")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "batching.json")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks-batching.md"),
                        help="write-up to (over)write ('' to leave every write-up alone)")  # fmt: skip
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.levels.split(",") if level]
    if not args.levels or min(args.levels) < 1:
        parser.error("--levels needs positive integers")
    started, load_before = time.perf_counter(), os.getloadavg()
    results = run(args)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["loadavg_before"], results["loadavg_after"] = load_before, os.getloadavg()
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["command"] = command_line("loadtests.bench_batching", argv)
    written = write_outputs(results, args.out, args.docs)
    print(f"wrote {' and '.join(written)} in {results['wall_s']} s", flush=True)
    return 0


def write_outputs(results: dict, out: Path, docs: str) -> list[str]:
    """The JSON results, and the write-up unless `docs` is '' (as `bench_decode --docs ''`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    written = [str(out)]
    if docs:
        path = Path(docs)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the latest run's figures, between markers: the write-up around them is kept
        body = markdown(results, results["command"]).split("\n", 1)[1]  # without its title
        write_marked_section(path, "bench_batching:latest", body, "## Latest run")
        written.append(str(path))
    return written


if __name__ == "__main__":
    sys.exit(main())

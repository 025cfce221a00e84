"""Where one token's time goes through gateway + 2 peers: a timeline of hand-offs across processes.

    python -m loadtests.bench_timeline [--new-tokens 300] [--relay] [--streams 1]

Starts a local swarm on the bench model (DHT, peers [0, 5) and [5, 8) with one thread each, as
`swarm up` splits it; a gateway) with `SWARM_TRACE_DIR` set, so every process stamps its
hand-offs (`common.trace`): the gateway sending a step and having the result, a peer reading a
step or a push, accepting a push, starting and ending its forward pass, writing a result. One
greedy stream of `--new-tokens` tokens goes through the gateway's HTTP API; then the stamps of all
processes are sorted into one timeline and every gap between consecutive stamps is named by its
two ends (`peer0.forward_end -> peer1.push_in`: the push on the wire and in gRPC). Medians of
each gap and of the token's whole cycle go to `loadtests/results/timeline.json`, the same spans'
passes back to back in this process beside them (what `generate()`'s pace is made of).

With `--streams N` (N > 1), N streams decode at once and the gaps interleave; what is reported
then is the pipeline (`pipeline` in the JSON): each peer's passes (median ms) and the share of
the traced time it spent in them, its idle time between passes, and the hand-offs that decide
how soon a peer can start its next pass: peer0's pass end -> peer1 has the pushed steps, and
peer1's pass end -> peer0 has the next steps (the decode loop; `--no-decode-loop`: through the
gateway) -> peer0 starts its next pass. Every run also records the tokens/s of the traced streams
and each process's CPU time per token (`cpu_ms_per_token`: in all, and its two busiest threads,
for a peer its forward thread and its event loop), read from /proc before and after them.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadtests.swarm_bench import command_line, write_results

REPO = Path(__file__).resolve().parent.parent
SPLIT = [(0, 5), (5, 8)]


def gaps(stamps: list[tuple[float, str]]) -> dict[str, list[float]]:
    """ms between consecutive stamps of the merged timeline, by `a -> b`."""
    out: dict[str, list[float]] = collections.defaultdict(list)
    for (t0, a), (t1, b) in zip(stamps, stamps[1:], strict=False):
        out[f"{a} -> {b}"].append((t1 - t0) * 1000)
    return out


def pipeline(stamps: list[tuple[float, str]]) -> dict:
    """The passes and hand-offs of a many-stream timeline (module doc, `--streams`)."""

    def passes(peer: str) -> list[tuple[float, float]]:
        out, begin = [], None
        for at, label in stamps:
            if label == f"{peer}.forward_start":
                begin = at
            elif label == f"{peer}.forward_end" and begin is not None:
                out.append((begin, at))
                begin = None
        return out

    times: dict[str, list[float]] = collections.defaultdict(list)
    for at, label in stamps:  # sorted, so each label's list is too
        times[label].append(at)

    def wait(label: str, at: float) -> float | None:
        """Seconds from `at` to the next `label` stamp (None: none came)."""
        later = times[label]
        i = bisect.bisect_left(later, at)
        return later[i] - at if i < len(later) else None

    def median_ms(values) -> float | None:  # noqa: ANN001
        values = [v for v in values if v is not None]
        return round(statistics.median(values) * 1000, 2) if values else None

    first, last = passes("peer0"), passes("peer1")
    if not first or not last:
        return {}
    window = stamps[-1][0] - stamps[0][0]
    report: dict = {}
    for name, runs in (("peer0", first), ("peer1", last)):
        report[f"{name}_passes"] = len(runs)
        report[f"{name}_pass_ms"] = median_ms(end - begin for begin, end in runs)
        report[f"{name}_busy_share"] = round(sum(end - begin for begin, end in runs) / window, 3)
        report[f"{name}_idle_between_passes_ms"] = median_ms(
            b[0] - a[1] for a, b in zip(runs, runs[1:], strict=False)
        )
    report["peer0_end_to_peer1_push_in_ms"] = median_ms(wait("peer1.push_in", end) for _, end in first)
    report["peer1_end_to_gateway_result_ms"] = median_ms(wait("gateway.result", end) for _, end in last)
    # the decode loop: peer1 pushes the next steps straight back to peer0
    report["peer1_end_to_peer0_push_in_ms"] = median_ms(wait("peer0.push_in", end) for _, end in last)
    report["peer1_end_to_peer0_start_ms"] = median_ms(wait("peer0.forward_start", end) for _, end in last)
    return report


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) each thread of a process has used, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            out[task.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def cpu_per_token(
    before: dict[int, dict], after: dict[int, dict], names: dict[int, str], tokens: int
) -> dict:
    """Each process's CPU ms per token between two `thread_cpu_seconds` readings, in all and for its
    busiest threads (a peer's forward thread, then its event loop)."""
    out = {}
    for pid, name in names.items():
        used = sorted((after[pid][t] - before[pid].get(t, 0.0) for t in after[pid]), reverse=True)
        out[name] = {
            "total": round(sum(used) / tokens * 1000, 3),
            "busiest_threads": [round(u / tokens * 1000, 3) for u in used[:2]],
        }
    return out


def read_stamps(trace_dir: Path, names: dict[int, str]) -> list[tuple[float, str]]:
    stamps = []
    for path in trace_dir.glob("*.txt"):
        who = names.get(int(path.stem))
        if who is None:
            continue  # the DHT node
        for line in path.read_text().splitlines():
            at, label = line.split()
            stamps.append((float(at), f"{who}.{label.split('.', 1)[1]}"))
    return sorted(stamps)


def spans_back_to_back(model_dir: Path, new_tokens: int) -> list[float]:
    """ms per token of each span, the spans decoding one after the other in this process, as
    `bench_decode`'s `spans` mode times them (its figure for generate()'s pace without the swarm)."""
    from loadtests.bench_decode import run_spans
    from peer.model import BlockSpan

    spans = [BlockSpan.load(model_dir, start, end) for start, end in SPLIT]
    return [round(ms, 3) for ms in run_spans(spans, [5, 6, 7, 8], new_tokens).hops_ms]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=300)
    parser.add_argument("--relay", action="store_true", help="the gateway carries hidden states between hops")
    parser.add_argument("--decode-loop", action=argparse.BooleanOptionalAction, default=True,
                        help="push's decode loop (swarm gateway --decode-loop)")  # fmt: skip
    parser.add_argument("--streams", type=int, default=1, help="concurrent streams (see the module doc)")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "timeline.json")
    args = parser.parse_args(argv)
    if args.new_tokens < 20:
        parser.error("need --new-tokens >= 20")
    import httpx
    import torch

    from peer.demo_model import ensure_demo_model
    from swarm.launcher import DEFAULT_CACHE, LocalSwarm

    torch.set_num_threads(1)
    model_dir = ensure_demo_model(DEFAULT_CACHE, preset="bench")
    trace_dir = Path(tempfile.mkdtemp(prefix="swarm-trace-"))
    os.environ["SWARM_TRACE_DIR"] = str(trace_dir)  # the children inherit it
    load_before = os.getloadavg()
    swarm = LocalSwarm(model_dir, log_level="WARNING", model_name="bench")
    try:
        swarm.start_dht()
        peers = [swarm.start_peer(start, end, "--threads", "1") for start, end in SPLIT]
        gateway = swarm.start_gateway(
            None, *(["--relay"] if args.relay else []), *([] if args.decode_loop else ["--no-decode-loop"])
        )
        names = {peer.process.pid: f"peer{i}" for i, peer in enumerate(peers)}
        names[gateway.process.pid] = "gateway"
        body = {"model": "bench", "prompt": "The swarm", "max_tokens": args.new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip

        def stream(tokens: int) -> None:
            with (
                httpx.Client(timeout=300) as client,
                client.stream(
                    "POST", f"{gateway.address}/v1/completions", json={**body, "max_tokens": tokens}
                ) as r,
            ):
                r.raise_for_status()
                for _ in r.iter_lines():
                    pass

        stream(16)  # a warm-up stream, then the traced ones
        time.sleep(0.5)
        started = time.monotonic()
        cpu_before = {pid: thread_cpu_seconds(pid) for pid in names}
        with ThreadPoolExecutor(args.streams) as pool:
            list(pool.map(stream, [args.new_tokens] * args.streams))
        traced_s = time.monotonic() - started
        cpu = cpu_per_token(
            cpu_before, {pid: thread_cpu_seconds(pid) for pid in names}, names, args.streams * args.new_tokens
        )
    finally:
        swarm.stop()  # SIGTERM: each process writes its last stamps at exit
    del os.environ["SWARM_TRACE_DIR"]
    stamps = [(at, label) for at, label in read_stamps(trace_dir, names) if at >= started]
    sends = [at for at, label in stamps if label == "gateway.send"]
    cycle = [(b - a) * 1000 for a, b in zip(sends, sends[1:], strict=False)]
    table = {
        name: {"n": len(values), "median_ms": round(statistics.median(values), 3)}
        for name, values in gaps(stamps).items()
        if len(values) >= args.new_tokens // 2  # the token's path; rarer pairs are interleavings
    }
    result = {
        "benchmark": "timeline",
        "streams": args.streams,
        "command": command_line("loadtests.bench_timeline", argv),
        "mode": "relay" if args.relay else "push with the decode loop" if args.decode_loop else "push",
        "spans": SPLIT,
        "new_tokens": args.new_tokens,
        # one stream's send-to-send time; with many streams the sends interleave
        "token_cycle_ms": round(statistics.median(cycle), 3) if cycle and args.streams == 1 else None,
        "gaps": dict(sorted(table.items(), key=lambda item: -item[1]["n"])),
        "pipeline": pipeline(stamps) if args.streams > 1 else None,
        # what each process spent per token while the streams ran (peers: forward thread, event loop)
        "tokens_per_s": round(args.streams * args.new_tokens / traced_s, 1),
        "cpu_ms_per_token": cpu,
        "spans_back_to_back_ms": spans_back_to_back(model_dir, args.new_tokens),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    write_results(args.out, result)
    print(
        f"token cycle {result['token_cycle_ms']} ms; spans back to back {result['spans_back_to_back_ms']} ms"
    )
    if result["pipeline"]:
        for name, value in result["pipeline"].items():
            print(f"  {name}: {value}")
        return 0
    for name, entry in result["gaps"].items():
        print(f"  {entry['median_ms']:8.3f} ms  {name}  (n={entry['n']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

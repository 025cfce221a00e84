"""A span's decode pass back to back, and with a pause after each pass as a peer of a pipeline has.

    python -m loadtests.bench_idle_span [--sleep-ms 15] [--passes 150] [--rounds 2]

Every peer of a route waits while the others compute: with two peers, each sleeps about as long
as the other's pass between its own. `transformers` `generate()` in one process never sleeps. This
times the same one-token pass of the bench model's first span ([0, 5), what `swarm up` gives the
first of two peers) in one process, alternating rounds of passes run back to back with rounds that
sleep `--sleep-ms` after each pass, and reports the medians and their ratio
(`loadtests/results/idle_span.json`). The difference is the machine's (caches and clocks after an
idle spell), not the serving code's: no gRPC, no scheduler, only `BlockSpan.forward`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from loadtests.swarm_bench import write_results

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sleep-ms", type=float, default=15.0, help="pause after each pass (the other peer's pass)"
    )
    parser.add_argument(
        "--passes", type=int, default=150, help="passes per round (the first 10 are not timed)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each kind, interleaved")
    parser.add_argument("--blocks", default="0:5", help="the span, START:END of the bench model")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "idle_span.json")
    args = parser.parse_args(argv)
    if args.passes <= 10 or args.rounds < 1 or args.sleep_ms < 0:
        parser.error("need --passes > 10, --rounds >= 1, --sleep-ms >= 0")
    import torch

    from peer.demo_model import ensure_demo_model
    from peer.model import BlockSpan
    from swarm.launcher import DEFAULT_CACHE

    torch.set_num_threads(1)  # as a peer started by `swarm up` on 2 cores
    model_dir = ensure_demo_model(DEFAULT_CACHE, preset="bench")  # the bench_decode / bench_batching model
    start, end = (int(part) for part in args.blocks.split(":"))
    span = BlockSpan.load(model_dir, start, end)
    cache = span.new_cache()
    prompt = torch.tensor([5, 6, 7, 8])

    def round_ms(sleep_s: float) -> float:
        times = []
        for _ in range(args.passes):
            began = time.perf_counter()
            span(torch.tensor([7]), [cache], [1])
            times.append(time.perf_counter() - began)
            if sleep_s:
                time.sleep(sleep_s)
        cache.truncate(len(prompt))
        return statistics.median(times[10:]) * 1000

    rounds: dict[str, list[float]] = {"back_to_back_ms": [], "with_sleep_ms": []}
    load_before = os.getloadavg()
    with torch.inference_mode():
        span(prompt, [cache], [len(prompt)])
        for _ in range(args.rounds):
            rounds["back_to_back_ms"].append(round(round_ms(0.0), 3))
            rounds["with_sleep_ms"].append(round(round_ms(args.sleep_ms / 1000), 3))
    busy, idle = statistics.median(rounds["back_to_back_ms"]), statistics.median(rounds["with_sleep_ms"])
    result = {
        "benchmark": "idle_span",
        "command": "python -m loadtests.bench_idle_span " + " ".join(argv if argv is not None else []),
        "span": [start, end],
        "model": str(model_dir),
        "sleep_ms": args.sleep_ms,
        "passes_per_round": args.passes,
        "rounds": rounds,
        "back_to_back_ms": busy,
        "with_sleep_ms": idle,
        "ratio": round(idle / busy, 3),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    write_results(args.out, result)
    print(f"span {start}:{end}: {busy:.2f} ms back to back, {idle:.2f} ms with {args.sleep_ms:g} ms sleeps "
          f"({idle / busy:.3f}x); rounds {rounds}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a decode pass costs against the rows in it: the figure that decides how a pipeline should
batch its sessions on a CPU.

Loads the bench model's spans as `swarm up` splits them over two peers, each calibrated as a peer
calibrates at load (`peer.gemm`: weight layouts, and the packed copy a default peer keeps when it
has the memory), and times one decode pass of R sessions (one new token each, on a cache of
--context tokens) for R in --rows, with one thread and then with two. Per span and row count:
the median ms of a pass, ms per row, and what splitting that pass in two costs
(``2 * pass(R / 2) / pass(R)``): the price of the first span's pipeline groups
(`peer.batching_config`), which keep both peers busy by running half the sessions at a time.

    python -m loadtests.bench_pass_rows [--rows 1,2,4,8,16,32] [--passes 30] [--threads 1,2]
        [--copies auto,packed,skinny] [--model-dir DIR] [--out loadtests/results/pass_rows.json]

Each span is also measured with only one kind of weight copy for the passes
of 2-64 rows (`peer.gemm`: ``packed``, oneDNN's; ``skinny``, the project's few-rows kernel), so
the kernels compare on the same spans in one run; ``auto`` is what a default peer keeps.

A pass of few rows reads every weight once and uses little of the arithmetic the core has, so
its cost grows much slower than its rows (bandwidth-bound at 1 row, the small-batch kernels
after that); when that growth is slow, two passes of half the rows cost close to two passes of
the whole, and splitting the rows between peers (pipeline) loses against splitting each
weight's columns between threads (what `transformers` does with 2 threads on one batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from loadtests.swarm_bench import run_header, write_results

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 5  # turns each --copies option takes per row count


def pass_ms(span, rows: int, context: int, passes: int) -> float:  # noqa: ANN001
    """Median ms of one decode pass of `rows` sessions, each holding `context` tokens."""
    import torch

    config = span.config
    caches = [span.new_cache(capacity=context + passes + 8) for _ in range(rows)]
    with torch.inference_mode():
        if span.is_first:
            prompt = torch.randint(0, config.vocab_size, (rows * context,))
        else:
            prompt = torch.randn(rows * context, config.hidden_size)
        span(prompt, caches, [context] * rows)
        times = []
        for _ in range(passes + 3):
            x = (
                torch.randint(0, config.vocab_size, (rows,))
                if span.is_first
                else torch.randn(rows, config.hidden_size)
            )
            begin = time.perf_counter()
            hidden = span(x, caches, [1] * rows)
            if span.is_last:
                span.logits(hidden)  # one LM-head row per session, as the scheduler samples
            times.append(time.perf_counter() - begin)
    return statistics.median(times[3:]) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument(
        "--copies",
        default="auto,packed,skinny",
        help="comma-separated: auto (what a peer keeps), packed (oneDNN's copy only), skinny "
        "(the few-rows kernel's only); each is measured on the same spans, one after the other",
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="another model (default: the bench model)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "pass_rows.json")
    args = parser.parse_args(argv)
    import torch

    from peer import gemm
    from peer.batching_config import available_memory_bytes, choose_prepack
    from peer.demo_model import ensure_demo_model
    from peer.model import BlockSpan
    from swarm.launcher import DEFAULT_CACHE, balanced_split

    rows = [int(r) for r in args.rows.split(",")]
    model_dir = args.model_dir or ensure_demo_model(args.cache_dir or DEFAULT_CACHE, preset="bench")
    result: dict = {
        **run_header("pass_rows", "loadtests.bench_pass_rows", argv),
        "context": args.context,
        "spans": [],
    }
    copies = args.copies.split(",")
    unknown = set(copies) - {"auto", *gemm.COPY_WAYS}
    if unknown:
        parser.error(f"--copies: unknown {sorted(unknown)}")
    for start, end in balanced_split(model_dir, 2):
        entry: dict = {"blocks": [start, end], "copies": {}}
        for threads in (int(t) for t in args.threads.split(",")):
            # loaded and calibrated anew for each thread count, as a peer started with that many
            # calibrates with them (the fastest way for a row count depends on the threads)
            torch.set_num_threads(threads)
            spans = {}
            for copy in copies:
                if copy != "auto" and copy not in gemm.copy_formats():
                    entry["copies"][copy] = {"available": False}
                    continue
                span = BlockSpan.load(model_dir, start, end, calibrate=False)
                prepack = copy != "auto"  # one kind of copy alone is always made
                if not prepack:
                    prepack, _ = choose_prepack(  # as a peer with no --prepack flag chooses
                        None,
                        packable=bool(gemm.copy_formats()) and gemm.packable_bytes(span.modules()) > 0,
                        packed_bytes=gemm.packable_bytes(span.modules()),
                        available_bytes=available_memory_bytes(),
                    )
                plans = gemm.calibrate(
                    span.modules(), prepack=prepack, formats=None if copy == "auto" else [copy]
                )
                spans[copy] = span
                run = entry["copies"].setdefault(copy, {"prepack": prepack, "threads": {}, "plans": {}})
                run["plans"][str(threads)] = {f"{out}x{inp}": plan for (out, inp), plan in plans.items()}
            # the copies take turns, ROUNDS times per row count, so a drift of the machine
            # weighs on each alike: the figure is the median of each one's round medians
            costs: dict[str, dict[int, float]] = {copy: {} for copy in spans}
            for r in rows:
                rounds: dict[str, list[float]] = {copy: [] for copy in spans}
                for _ in range(ROUNDS):
                    for copy, span in spans.items():
                        rounds[copy].append(pass_ms(span, r, args.context, max(1, args.passes // ROUNDS)))
                for copy in spans:
                    costs[copy][r] = statistics.median(rounds[copy])
            for copy in spans:
                table = []
                for r in rows:
                    cost = costs[copy][r]
                    row = {"rows": r, "pass_ms": round(cost, 2), "ms_per_row": round(cost / r, 3)}
                    if r // 2 in costs[copy] and r % 2 == 0:
                        row["two_halves_over_one"] = round(2 * costs[copy][r // 2] / cost, 2)
                    table.append(row)
                    print(f"blocks [{start}, {end}) copies {copy} threads {threads} rows {r:3d}: {cost:7.2f} ms"
                          + (f"  two passes of {r // 2}: {row['two_halves_over_one']:.2f}x" if "two_halves_over_one" in row else ""),
                          flush=True)  # fmt: skip
                entry["copies"][copy]["threads"][str(threads)] = table
            del spans
        result["spans"].append(entry)
    result["loadavg_after"] = os.getloadavg()
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

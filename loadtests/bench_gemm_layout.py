"""A Linear layer's weight layout in memory, side by side: ``[out, in]`` (``nn.Linear``'s) against
``[in, out]`` seen as ``[out, in]`` (what ``peer.gemm.calibrate`` keeps where one row multiplies
faster), for the bench model's and the family benchmark's weight shapes and 1 to 128 rows.

Each timing cycles through distinct copies of the weight (at least 64 MB in all), so every call
reads its weight from memory as a layer does in a pass, not from a warm cache; the two layouts are
timed in alternating rounds, best round kept. One thread, as the peers in the benchmarks run.

    python -m loadtests.bench_gemm_layout [--out loadtests/results/gemm_layout.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from loadtests.swarm_bench import run_header, write_results

REPO = Path(__file__).resolve().parent.parent
SHAPES = [  # (out, in): bench model (hidden 1024) and the family bench (hidden 768), heads included
    (1024, 1024), (256, 1024), (2816, 1024), (1024, 2816), (32000, 1024),
    (768, 768), (256, 768), (2048, 768), (768, 2048), (32000, 768),
]  # fmt: skip
ROWS = (1, 4, 16, 128)
COLD_BYTES = 64 << 20


def time_layouts(out_features: int, in_features: int, rows: int, rounds: int = 5) -> tuple[float, float]:
    """Best µs per call of F.linear with each layout: (plain, transposed in memory)."""
    import torch
    import torch.nn.functional as F

    from peer.gemm import transposed_layout

    copies = max(2, COLD_BYTES // (out_features * in_features * 4))
    plain = [torch.randn(out_features, in_features) for _ in range(copies)]
    relaid = [transposed_layout(weight) for weight in plain]  # what calibrate keeps
    bias = torch.randn(out_features)
    x = torch.randn(rows, in_features)
    calls = max(copies, 8)
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for which, weights in enumerate((plain, relaid)):
            begin = time.perf_counter()
            for i in range(calls):
                F.linear(x, weights[i % copies], bias)
            best[which] = min(best[which], (time.perf_counter() - begin) / calls * 1e6)
    return best[0], best[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "gemm_layout.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    result: dict = {**run_header("gemm_layout", "loadtests.bench_gemm_layout", argv), "shapes": []}
    for out_features, in_features in SHAPES:
        for rows in ROWS:
            plain, relaid = time_layouts(out_features, in_features, rows)
            entry = {
                "shape": [out_features, in_features],
                "rows": rows,
                "plain_us": round(plain, 1),
                "transposed_in_memory_us": round(relaid, 1),
                "ratio": round(relaid / plain, 3),
            }
            result["shapes"].append(entry)
            print(f"{out_features:6d} x {in_features:5d}  rows {rows:4d}: {plain:9.1f} us  ->  {relaid:9.1f} us"
                  f"  ({entry['ratio']:.2f}x)", flush=True)  # fmt: skip
    result["loadavg_after"] = os.getloadavg()
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode speed and weight memory per block of each precision, side by side in one run.

CPU: float32, bfloat16 and int8 (torch.ao dynamic) of the ~156M-parameter bench model, the whole
model as one span in this process (no network: this isolates the compute). CUDA, when available:
float16, bfloat16, int8 and nf4 (bitsandbytes; skipped with a note when not installed).

    python -m loadtests.bench_quant --threads 1 --steps 64
    # -> loadtests/results/quant.json; the table in docs/benchmarks-quant.md is made from it

ms/token is the median of `--steps` batch-1 decode steps after a 16-token prefill, including the
LM head (a 32000 x 1024 matrix, the biggest single weight of this model).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from loadtests.swarm_bench import write_results
from peer.demo_model import ensure_demo_model
from peer.model import BlockSpan

RESULTS = Path(__file__).parent / "results" / "quant.json"
CPU_MODES = [("float32", "none"), ("bfloat16", "none"), ("float32", "int8")]
CUDA_MODES = [("float16", "none"), ("bfloat16", "none"), ("float16", "int8"), ("bfloat16", "nf4")]


@torch.inference_mode()
def measure(model_dir: Path, dtype: str, quant: str, device: str, steps: int) -> dict:
    began = time.perf_counter()
    span = BlockSpan.load(model_dir, 0, BlockSpan.load(model_dir, 0, 1).config.num_hidden_layers,
                          dtype=dtype, device=device, quant=quant)  # fmt: skip
    load_s = time.perf_counter() - began
    cache = span.new_cache()
    inputs = torch.arange(1, 17)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    hidden = span(inputs, [cache], [len(inputs)])
    token = int(span.logits(hidden[-1:])[0].argmax())
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        hidden = span(torch.tensor([token]), [cache], [1])
        token = int(span.logits(hidden[-1:])[0].argmax())
        sync()
        times.append(time.perf_counter() - start)
    memory = span.weight_bytes()
    del span, cache
    gc.collect()
    return {
        "device": device,
        "dtype": dtype,
        "quant": quant,
        "ms_per_token_median": round(1e3 * statistics.median(times), 2),
        "ms_per_token_mean": round(1e3 * statistics.fmean(times), 2),
        "weight_mb_per_block": round(memory["per_block"] / 1e6, 2),
        "weight_mb_total": round(memory["total"] / 1e6, 1),
        "load_s": round(load_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps measured per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bench preset)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or ensure_demo_model(Path.home() / ".cache" / "swarm-serve", preset="bench")
    rows, notes = [], []
    modes = [("cpu", *mode) for mode in CPU_MODES]
    if torch.cuda.is_available():
        modes += [("cuda", *mode) for mode in CUDA_MODES]
    for device, dtype, quant in modes:
        try:
            row = measure(model_dir, dtype, quant, device, args.steps)
        except ValueError as exc:  # e.g. bitsandbytes missing: say so instead of failing the run
            notes.append(f"{device} {dtype}/{quant}: {exc}")
            continue
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "model": str(model_dir.name),
        "steps": args.steps,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": rows,
        "notes": notes,
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()

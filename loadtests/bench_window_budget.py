"""Peer memory per session at 4096 tokens for sliding-window models, and what the budget reserves.

For each layer pattern (Mistral-7B's KV geometry: 32 layers, 8 KV heads of 128, bf16), one
session's ``KVCache`` is filled to ``--tokens`` in chunks of ``--chunk`` (the scheduler's pass
size) through ``prepare``/``append``/``commit``, the span's calls, and measured:

* ``held``: bytes the cache allocates at the end, with windows and for the same geometry without;
* ``reserved``: what the peer's budget sets aside for such a session when it opens
  (``KVCache.budget_tokens`` x ``bytes_per_token``); before window-aware accounting it reserved
  the full length on every layer, the ``without`` figure;
* ``sessions``: how many such sessions a ``SessionTable`` admits at once in a budget of
  ``--budget-gib`` (real ``admit`` calls until it refuses).

    python -m loadtests.bench_window_budget [--tokens 4096] [--chunk 256] [--budget-gib 8]
                                            [--out loadtests/results/window_budget.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from loadtests.swarm_bench import command_line, write_results

REPO = Path(__file__).resolve().parent.parent
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128
PATTERNS = (
    ("every layer windowed, window 4096 (Mistral 7B v0.1)", (4096,) * LAYERS),
    ("every layer windowed, window 512", (512,) * LAYERS),
    ("every other layer windowed, window 512 (Gemma 2 style)", (512, 0) * (LAYERS // 2)),
    ("5 of 6 layers windowed, window 1024 (Gemma 3 style)", ((1024,) * 5 + (0,)) * 5 + (1024, 1024)),
    ("every other layer windowed, window 128 (gpt-oss style)", (128, 0) * (LAYERS // 2)),
)


@dataclass
class _Session:
    session_id: str
    cache: object
    reserved: int = 0
    idle_since: float = 0.0
    in_forward: bool = False


def filled(windows: tuple[int, ...], tokens: int, chunk: int):  # noqa: ANN201 - a KVCache
    import torch

    from peer.kv_cache import KVCache

    cache = KVCache(len(windows), KV_HEADS, HEAD_DIM, torch.bfloat16, max_capacity=tokens, windows=windows)
    k = torch.zeros(KV_HEADS, chunk, HEAD_DIM, dtype=torch.bfloat16)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        cache.prepare(n)
        for layer in range(len(windows)):
            cache.append(layer, k[:, :n], k[:, :n])
        cache.commit(n)
    return cache


async def admitted(budget_tokens: int, reserve: int) -> int:
    """Sessions a `SessionTable` of `budget_tokens` admits at once when each reserves `reserve`."""
    from peer.memory import BudgetExhausted, SessionTable

    table = SessionTable(budget_tokens, open_wait=0.0)
    count = 0
    while True:
        try:
            session_id = f"s{count}"
            await table.admit(reserve, session_id, False, lambda: _Session(session_id, None))  # noqa: B023
        except BudgetExhausted:
            return count
        count += 1


def measure(tokens: int, chunk: int, budget_gib: float) -> list[dict]:
    rows = []
    for name, windows in PATTERNS:
        windowed, full = filled(windows, tokens, chunk), filled((0,) * len(windows), tokens, chunk)
        per_token = full.bytes_per_token
        budget = int(budget_gib * 2**30) // per_token
        reserve_windowed = windowed.budget_tokens(tokens, chunk)
        reserve_full = full.budget_tokens(tokens, chunk)
        rows.append({
            "model": name,
            "tokens": tokens,
            "held_mib_with_windows": round(windowed.nbytes / 2**20, 1),
            "held_mib_without_windows": round(full.nbytes / 2**20, 1),
            "held_ratio": round(windowed.nbytes / full.nbytes, 3),
            "reserved_mib_with_windows": round(reserve_windowed * per_token / 2**20, 1),
            "reserved_mib_without_windows": round(reserve_full * per_token / 2**20, 1),
            "within_reservation": windowed.nbytes <= reserve_windowed * per_token,
            "sessions_with_windows": asyncio.run(admitted(budget, reserve_windowed)),
            "sessions_without_windows": asyncio.run(admitted(budget, reserve_full)),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument(
        "--chunk", type=int, default=256, help="the scheduler's pass size (--max-batch-tokens)"
    )
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "window_budget.json")
    args = parser.parse_args(argv)
    started = time.time()
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
        },
        "command": command_line("loadtests.bench_window_budget", argv),
        "geometry": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
        "budget_gib": args.budget_gib,
        "rows": measure(args.tokens, args.chunk, args.budget_gib),
    }
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.time() - started, 1)
    write_results(args.out, result)
    for row in result["rows"]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

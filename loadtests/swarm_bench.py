"""What the swarm benchmarks share: waiting for a route, and small summary helpers."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import httpx


async def wait_models(client: httpx.AsyncClient, timeout: float = 60.0) -> None:
    """Until the gateway lists a model (every block covered by a live peer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await client.get("/v1/models")).json().get("data"):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the gateway never saw a complete route")


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank `q` quantile (0..1) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def round1(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def write_marked_section(path: Path, name: str, block: str, heading: str) -> None:
    """Put `block` between the `name` markers of the write-up at `path`, or append it under
    `heading` when the markers are not there yet: a benchmark updates its figures and keeps the
    analysis written around them."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    marked = f"{start}\n{block.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + marked + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{marked}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_results(path: Path, result: dict, *, indent: int = 1) -> None:
    """Write a benchmark's figures as JSON at `path` (its folder created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n")
    print(f"wrote {path}", flush=True)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces a run: `python -m module` and its arguments (`argv`, or this
    process's own when None), quoted as a shell needs them (`--docs ''` stays two words)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def run_header(benchmark: str, module: str, argv: list[str] | None) -> dict:
    """The first fields of a single-process benchmark's results: its name, the command that
    reproduces them, the machine and its load before the run (torch's threads set by then)."""
    import torch

    return {
        "benchmark": benchmark,
        "command": command_line(module, argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "loadavg_before": os.getloadavg(),
    }

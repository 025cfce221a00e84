"""Hand-off stamps for a timeline of one token's path across processes (`loadtests/bench_timeline.py`).

Off unless `SWARM_TRACE_DIR` is set when the process starts; `mark` then costs one branch. When
on, `mark(label)` keeps `time.monotonic()` and the label, and writes them to `DIR/<pid>.txt`
every `FLUSH_EVERY` marks and at exit. CLOCK_MONOTONIC is one clock for all processes of a
machine, so the stamps of a gateway and its peers sort into one timeline: the gap between two
consecutive stamps is the time a token spent between those two hand-offs. Measuring this way, not
with a profiler, is what separates the messages and the step handling from the forward passes
(docs/benchmarks.md, "Where it stands").
"""

from __future__ import annotations

import atexit
import os
import threading
import time

FLUSH_EVERY = 256
_DIR = os.environ.get("SWARM_TRACE_DIR") or None
_marks: list[str] = []
_lock = threading.Lock()  # a peer marks from its event loop and from its forward thread


def mark(label: str) -> None:
    if _DIR is None:
        return
    with _lock:
        _marks.append(f"{time.monotonic():.6f} {label}\n")
        if len(_marks) >= FLUSH_EVERY:
            _write()


def _flush() -> None:
    with _lock:
        _write()


def _write() -> None:
    if not _marks:
        return
    with open(os.path.join(_DIR, f"{os.getpid()}.txt"), "a") as out:
        out.writelines(_marks)
    _marks.clear()


if _DIR is not None:
    atexit.register(_flush)

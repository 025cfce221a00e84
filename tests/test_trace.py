"""`common.trace`: off unless SWARM_TRACE_DIR is set when the process starts; on, every mark of the
process lands in DIR/<pid>.txt, in order, with one monotonic clock (flushed as it goes and at
exit)."""

from __future__ import annotations

import os
import subprocess
import sys

from common.trace import FLUSH_EVERY

SCRIPT = """
from common import trace
for i in range(trace.FLUSH_EVERY + 3):
    trace.mark(f"test.m{i}")
print(len(trace._marks))  # held, not yet written
"""


def _run(env: dict) -> int:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**os.environ, **env}, check=True, timeout=60,
        capture_output=True, text=True,
    )  # fmt: skip
    return int(done.stdout)


def test_marks_are_written_only_when_asked(tmp_path):
    assert _run({"SWARM_TRACE_DIR": ""}) == 0  # off: nothing kept

    on = tmp_path / "on"
    on.mkdir()
    assert _run({"SWARM_TRACE_DIR": str(on)}) == 3  # one flush of FLUSH_EVERY; the rest at exit
    (written,) = on.iterdir()
    lines = [line.split() for line in written.read_text().splitlines()]
    count = FLUSH_EVERY + 3  # one full flush, and the rest at exit
    assert [label for _, label in lines] == [f"test.m{i}" for i in range(count)]
    stamps = [float(at) for at, _ in lines]
    assert stamps == sorted(stamps)

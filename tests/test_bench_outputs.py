"""The benchmarks' output options: `--docs ''` writes the JSON results and leaves every write-up alone."""

from __future__ import annotations

import json

from loadtests import bench_batching, bench_decode


def test_bench_batching_empty_docs_writes_json_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Path('') is the current directory: writing to it was the crash
    out = tmp_path / "results" / "batching.json"
    written = bench_batching.write_outputs({"command": "x", "wall_s": 1.0}, out, "")
    assert written == [str(out)]
    assert json.loads(out.read_text())["command"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_bench_decode_accepts_empty_docs():
    assert bench_decode.parse_args(["--docs", "", "--models", "bench"]).docs == ""


def test_a_benchmark_run_keeps_the_write_up_around_its_figures(tmp_path):
    from loadtests.swarm_bench import write_marked_section

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Write-up\n\nAnalysis that a run must keep.\n")
    write_marked_section(doc, "bench:latest", "| run | 1 |", "## Latest run")
    write_marked_section(doc, "bench:latest", "| run | 2 |", "## Latest run")
    text = doc.read_text()
    assert text.startswith("# Write-up\n\nAnalysis that a run must keep.\n")
    assert "| run | 2 |" in text and "| run | 1 |" not in text and text.count("## Latest run") == 1

"""The benchmarks' output options: `--docs ''` writes the JSON results and leaves every write-up alone."""

from __future__ import annotations

import json

import pytest

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


def test_the_many_stream_timeline_reports_passes_and_hand_offs():
    from loadtests.bench_timeline import pipeline

    ms = 0.001
    stamps = []
    for k in range(3):  # peer0 passes of 30 ms every 70 ms; peer1's follow 2 ms after the push
        t = k * 70 * ms
        stamps += [
            (t, "peer0.forward_start"),
            (t + 30 * ms, "peer0.forward_end"),
            (t + 31 * ms, "peer1.push_in"),
            (t + 32 * ms, "peer1.forward_start"),
            (t + 62 * ms, "peer1.forward_end"),
            (t + 63 * ms, "gateway.result"),
            (t + 65 * ms, "peer0.push_in"),  # the decode loop's steps, straight from peer1
        ]
    stamps.append((3 * 70 * ms, "peer0.forward_start"))
    report = pipeline(sorted(stamps))
    assert report["peer0_passes"] == 3 and report["peer1_passes"] == 3
    assert report["peer0_pass_ms"] == 30.0 and report["peer1_pass_ms"] == 30.0
    assert report["peer0_idle_between_passes_ms"] == 40.0
    assert report["peer0_end_to_peer1_push_in_ms"] == 1.0
    assert report["peer1_end_to_gateway_result_ms"] == 1.0
    assert report["peer1_end_to_peer0_push_in_ms"] == 3.0
    assert report["peer1_end_to_peer0_start_ms"] == 8.0
    assert report["peer0_busy_share"] == round(90 / 210, 3)


def test_the_timeline_counts_cpu_per_token_by_process_and_busiest_thread():
    from loadtests.bench_timeline import cpu_per_token, thread_cpu_seconds

    before = {1: {"10": 1.0, "11": 0.5}, 2: {"20": 0.0}}
    after = {1: {"10": 3.0, "11": 0.75, "12": 0.25}, 2: {"20": 0.5}}  # thread 12 started meanwhile
    report = cpu_per_token(before, after, {1: "peer0", 2: "gateway"}, tokens=1000)
    assert report == {
        "peer0": {"total": 2.5, "busiest_threads": [2.0, 0.25]},
        "gateway": {"total": 0.5, "busiest_threads": [0.5]},
    }
    import os

    mine = thread_cpu_seconds(os.getpid())  # this process's own threads, read from /proc
    assert str(os.getpid()) in mine and all(seconds >= 0 for seconds in mine.values())


def test_the_many_stream_timeline_needs_both_peers_passes():
    from loadtests.bench_timeline import pipeline

    assert pipeline([(0.0, "peer0.forward_start"), (0.01, "peer0.forward_end")]) == {}


def test_pass_rows_times_every_span_at_every_row_count(tiny_model, tmp_path):
    from loadtests import bench_pass_rows
    from peer import gemm

    out = tmp_path / "pass_rows.json"
    args = ["--model-dir", str(tiny_model), "--rows", "1,2,4", "--passes", "2", "--threads", "1"]
    args += ["--copies", "auto,packed,skinny"]
    assert bench_pass_rows.main([*args, "--context", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    spans = result["spans"]
    assert (
        spans[0]["blocks"][0] == 0
        and spans[-1]["blocks"][1]
        == json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    )
    for span in spans:
        assert set(span["copies"]) == {"auto", "packed", "skinny"}
        for copy, run in span["copies"].items():
            if not run.get("available", True):
                assert copy not in gemm.copy_formats()
                continue
            assert copy == "auto" or run["prepack"], "a copy measured alone is always made"
            table = run["threads"]["1"]
            assert [row["rows"] for row in table] == [1, 2, 4]
            assert all(row["pass_ms"] > 0 for row in table)
            assert "two_halves_over_one" not in table[0] and table[2]["two_halves_over_one"] > 0
            planned = {way for plan in run["plans"]["1"].values() for way in plan.values()}
            assert copy == "auto" or planned <= {"transposed", copy}


def test_sampling_bench_times_both_samplers_for_every_setting(tmp_path):
    from loadtests import bench_sampling

    out = tmp_path / "sampling.json"
    assert bench_sampling.main(["--vocab", "500", "--calls", "3", "--rounds", "2", "--out", str(out)]) == 0
    timings = json.loads(out.read_text())["ms_per_sample"]
    assert set(timings) == {f"{name}@500" for name in bench_sampling.SETTINGS}
    for entry in timings.values():
        assert (
            entry["sampler_ms"] > 0 and entry["textbook_ms"] > 0 and len(entry["rounds_ms"]["sampler"]) == 2
        )
        assert entry["ratio"] == pytest.approx(entry["sampler_ms"] / entry["textbook_ms"], rel=0.02)


def test_the_textbook_sampler_draws_what_the_sampler_keeps():
    """The benchmark's baseline is the same sampler: greedy agrees, and a top-k draw stays in the top k."""
    import torch

    from loadtests.bench_sampling import textbook_sample
    from peer.sampling import Sampler, SamplingParams

    logits = torch.randn(300, generator=torch.Generator().manual_seed(3)) * 2
    greedy = SamplingParams(temperature=0.0)
    assert textbook_sample(logits, greedy, torch.Generator(), 0) == Sampler(greedy).sample(logits).token_id
    best = set(torch.topk(logits, 5).indices.tolist())
    params = SamplingParams(temperature=2.0, top_k=5)
    assert {textbook_sample(logits, params, torch.Generator(), seed) for seed in range(40)} <= best


@pytest.mark.slow
def test_idle_links_reports_requests_goaways_and_failed_pushes(tmp_path):
    """`loadtests.idle_links` with short gaps (the real check idles for minutes): every request is
    answered, and a link idle for a second breaks nowhere."""
    from loadtests import idle_links

    out = tmp_path / "idle_links.json"
    assert idle_links.main(["--gaps", "0,1", "--workdir", str(tmp_path / "swarm"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["status"] for r in result["requests"]] == [200, 200]
    assert set(result["goaway_too_many_pings"]) >= {"gateway", "dht"} and not any(
        result["goaway_too_many_pings"].values()
    )
    assert not any(result["failed_pushes"].values())


def test_a_benchmarks_command_line_quotes_its_arguments():
    from loadtests.swarm_bench import command_line

    assert command_line("loadtests.bench_x", ["--docs", "", "--levels", "1,16"]) == (
        "python -m loadtests.bench_x --docs '' --levels 1,16"
    )

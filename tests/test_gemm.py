"""How each Linear layer multiplies a pass of a few rows (peer.gemm): the plan per row count."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peer import gemm, skinny_gemm
from peer.quant import resident_bytes

needs_onednn = pytest.mark.skipif(
    not gemm.can_pack(), reason="this torch build has no oneDNN prepacked matmul"
)
needs_skinny = pytest.mark.skipif(
    not skinny_gemm.available(), reason="the few-rows kernel could not be built here (no C compiler)"
)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [(0, 0), (1, 0), (2, 2), (3, 4), (4, 4), (5, 8), (9, 16), (33, 64), (64, 64), (65, 0)],
)
def test_bucket_is_the_next_power_of_two_within_the_measured_range(rows, expected):
    assert gemm.bucket(rows) == expected


def _layer(bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 96, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
def test_the_transposed_way_puts_the_weight_first_with_the_same_result(bias, monkeypatch):
    layer = _layer(bias)
    layer.matmul_plan = {8: "transposed"}
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(a.shape) or real_mm(a, b))
    x = torch.randn(7, 64)  # bucket 8: planned
    out = gemm.linear(layer, x)
    assert calls == [torch.Size([96, 64])], "the weight must be the left operand"
    assert out.is_contiguous() and out.shape == (7, 96)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    calls.clear()
    gemm.linear(layer, torch.randn(2, 64))  # bucket 2: not planned, the layer's own forward
    assert calls == []


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_the_packed_way_gives_the_same_result_for_every_row_count(bias):
    layer = _layer(bias)
    layer.register_buffer(
        "packed_weight", torch.ops.mkldnn._reorder_linear_weight(layer.weight, 16), persistent=False
    )
    layer.matmul_plan = dict.fromkeys(gemm.BUCKETS, "packed")
    for rows in (2, 3, 8, 16, 17, 64):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(
            gemm.linear(layer, x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5
        )


@needs_skinny
@pytest.mark.parametrize("shape", [(96, 64), (45, 37), (2816, 1024)])  # whole blocks, a partial one
def test_the_skinny_way_gives_the_same_result_for_every_row_count(shape):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0])
    layer.register_buffer("packed_weight", skinny_gemm.pack(layer.weight), persistent=False)
    layer.matmul_plan = dict.fromkeys(gemm.BUCKETS, "skinny")
    assert layer.packed_weight.nbytes == skinny_gemm.packed_bytes(layer.weight)
    for rows in (2, 3, 8, 12, 13, 16, 25, 64):  # one chunk of rows, and even chunks of up to 12
        x = torch.randn(rows, shape[1])
        torch.testing.assert_close(
            gemm.linear(layer, x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4
        )
    relaid = gemm.transposed_layout(layer.weight)  # a weight held [in, out] packs the same
    assert torch.equal(skinny_gemm.pack(relaid), layer.packed_weight)


@pytest.fixture
def rebuilt_kernel():
    """`skinny_gemm`'s library looked up anew under the test's environment, and again after it."""
    skinny_gemm._library.cache_clear()
    yield
    skinny_gemm._library.cache_clear()


def test_the_skinny_kernel_is_not_used_where_it_cannot_be_built(monkeypatch, tmp_path, rebuilt_kernel):
    """No compiler, one that fails, or the kernel switched off: no kernel, no crash; oneDNN's copy
    (if any) serves alone."""
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))  # nothing built before is found
    for compiler in ("/nonexistent/cc", "false"):
        monkeypatch.setenv("CC", compiler)
        skinny_gemm._library.cache_clear()
        assert not skinny_gemm.available()
        assert "skinny" not in gemm.copy_formats()
        with pytest.raises(RuntimeError, match="not available"):
            skinny_gemm.pack(torch.ones(4, 4))
    assert not list(tmp_path.rglob("*.so"))
    monkeypatch.delenv("CC")
    monkeypatch.delenv("SWARM_HOME")
    monkeypatch.setenv("SWARM_FEW_ROWS_KERNEL", "off")  # switched off: not used even when built
    skinny_gemm._library.cache_clear()
    assert not skinny_gemm.available()


@needs_skinny
def test_a_compiler_without_openmp_builds_the_kernel_single_threaded(monkeypatch, tmp_path, rebuilt_kernel):
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec cc "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    assert skinny_gemm.available()
    assert len(list(tmp_path.rglob("*.so"))) == 1
    weight, x = torch.randn(70, 48), torch.randn(9, 48)
    torch.testing.assert_close(
        skinny_gemm.matmul(skinny_gemm.pack(weight), x, 70), F.linear(x, weight), rtol=1e-5, atol=1e-4
    )


def test_a_plan_uses_the_copy_format_that_saves_the_most_time():
    """At most one copy per layer: per bucket the fastest allowed way, of the format whose plan
    sums to the least time; buckets where nothing beats F.linear by MIN_GAIN stay unplanned."""
    times = {
        2: {"plain": 1.0, "transposed": 0.8, "packed": 0.9, "skinny": 0.7},
        8: {"plain": 2.0, "transposed": 1.9, "packed": 1.4, "skinny": 1.0},
        32: {"plain": 3.0, "transposed": 2.9, "packed": 2.0, "skinny": 2.2},
        64: {"plain": 4.0, "transposed": 3.9, "packed": 3.8, "skinny": 3.9},
    }
    assert gemm.choose_plan(times) == {2: "skinny", 8: "skinny", 32: "skinny"}
    times[32]["skinny"] = 2.9  # misses MIN_GAIN: skinny's plan sums 0.7 + 1.0 + 3.0 (plain) + 4.0,
    times[2]["packed"] = 0.75  # packed's 0.75 + 1.4 + 2.0 + 4.0
    assert gemm.choose_plan(times) == {2: "packed", 8: "packed", 32: "packed"}
    without_copies = {rows: {"plain": t["plain"], "transposed": t["transposed"]} for rows, t in times.items()}
    assert gemm.choose_plan(without_copies) == {2: "transposed"}


@needs_skinny
@needs_onednn
def test_prepack_measures_both_copies_and_keeps_the_planned_one(monkeypatch):
    seen = []

    def plan(weight, copies=None):
        seen.append(sorted(copies or {}))
        return {8: "skinny", 16: "transposed"}

    monkeypatch.setattr(gemm, "measure_plan", plan)
    a, b = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False)
    gemm.calibrate([a, b], prepack=True)
    assert seen == [["packed", "skinny"]], "both formats measured, once per shape"
    for layer in (a, b):
        assert not layer.packed_weight.is_mkldnn
        assert torch.equal(layer.packed_weight, skinny_gemm.pack(layer.weight))
        assert resident_bytes(layer) == 2 * layer.weight.nbytes


def test_calibrate_plans_only_plain_float32_cpu_linears_and_measures_a_shape_once(monkeypatch):
    measured = []
    monkeypatch.setattr(
        gemm, "measure_plan", lambda w, packed=None: measured.append(tuple(w.shape)) or {16: "transposed"}
    )
    a, b = nn.Linear(32, 48), nn.Linear(32, 48)
    half = nn.Linear(32, 48).to(torch.bfloat16)
    quantized = torch.ao.nn.quantized.dynamic.Linear(32, 48)
    found = gemm.calibrate([a, b, half, quantized, nn.ReLU()])
    assert found == {(48, 32): {16: "transposed"}}
    assert measured == [(48, 32)], "one measurement per distinct shape"
    assert a.matmul_plan == b.matmul_plan == {16: "transposed"}
    assert not hasattr(half, "matmul_plan") and not hasattr(quantized, "matmul_plan")
    assert not hasattr(a, "packed_weight"), "no packed copy without --prepack"


@needs_onednn
def test_prepack_keeps_a_packed_copy_only_where_the_plan_uses_it_and_counts_its_bytes(monkeypatch):
    plans = iter([{8: "packed", 16: "transposed"}, {16: "transposed"}])
    monkeypatch.setattr(gemm, "measure_plan", lambda w, packed=None: next(plans))
    used, unused = nn.Linear(32, 48, bias=False), nn.Linear(48, 32, bias=False)
    plain_bytes = resident_bytes(used)
    gemm.calibrate([used, unused], prepack=True)
    assert used.packed_weight.is_mkldnn and not hasattr(unused, "packed_weight")
    assert resident_bytes(used) == 2 * plain_bytes
    assert "packed_weight" not in used.state_dict(), "the copy is never saved"


def test_measured_plans_only_name_measured_buckets_and_known_ways():
    plan = gemm.measure_plan(torch.randn(128, 64))
    assert set(plan) <= set(gemm.BUCKETS) and set(plan.values()) <= {"transposed"}


def test_calibrate_relays_a_preferring_shape_once_and_keeps_shared_weights(monkeypatch):
    """A shape whose single row multiplies faster [in, out] in memory gets that layout: the same
    values seen as [out, in], the same products; a weight another module shares (a tied
    embedding) keeps its layout; calibrating again changes nothing."""
    asked = []
    monkeypatch.setattr(
        gemm, "prefers_transposed_layout", lambda w, flush=None: asked.append(tuple(w.shape)) or True
    )
    monkeypatch.setattr(gemm, "measure_plan", lambda w, packed=None: {})
    monkeypatch.setattr(gemm, "MIN_LAYOUT_BYTES", 0)
    a, b = nn.Linear(32, 48), nn.Linear(32, 48)
    embed = nn.Embedding(48, 32)
    tied = nn.Linear(32, 48, bias=False)
    tied.weight = embed.weight
    before = a.weight.detach().clone()
    x = torch.randn(3, 32)
    expected = F.linear(x, before, a.bias)
    gemm.calibrate([a, b, embed, tied])
    assert asked == [(48, 32)], "one measurement per distinct shape"
    assert not a.weight.is_contiguous() and a.weight.t().is_contiguous() and not b.weight.is_contiguous()
    assert torch.equal(a.weight, before) and a.weight.shape == (48, 32)
    torch.testing.assert_close(gemm.linear(a, x), expected, rtol=1e-6, atol=1e-6)
    assert tied.weight.is_contiguous() and tied.weight is embed.weight
    relaid = a.weight
    gemm.calibrate([a])
    assert a.weight is relaid and a.weight.data_ptr() == relaid.data_ptr()


def test_small_weights_keep_their_layout_unmeasured(monkeypatch):
    """Below MIN_LAYOUT_BYTES the timing is noise (module doc): no measurement, no re-lay."""
    asked = []
    monkeypatch.setattr(
        gemm, "prefers_transposed_layout", lambda w, flush=None: asked.append(tuple(w.shape)) or True
    )
    monkeypatch.setattr(gemm, "measure_plan", lambda w, packed=None: {})
    side = math.isqrt(gemm.MIN_LAYOUT_BYTES // 4 - 1) + 1  # the least square weight measured
    small, large = nn.Linear(side - 1, side - 1), nn.Linear(side, side)
    gemm.calibrate([small, large])
    assert asked == [(side, side)]
    assert small.weight.is_contiguous() and not large.weight.is_contiguous()


def test_measuring_the_layout_leaves_the_weight_alone():
    weight = torch.randn(256, 128)
    before = weight.clone()
    assert isinstance(gemm.prefers_transposed_layout(weight), bool)
    assert weight.is_contiguous() and torch.equal(weight, before), "measured on a copy"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux")
def test_released_pages_of_a_mapped_weight_leave_the_rss_and_its_values_intact(tmp_path):
    """A checkpoint tensor is a view of the mapped file: once re-laid, the pages it was read from
    leave the peer's RSS (a private file mapping reads them again if anything did), unless another
    tensor still uses its storage."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": torch.randn(4096, 4096)}, str(tmp_path / "w.safetensors"))  # 64 MiB
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as handle:
        weight = handle.get_tensor("w")
    total = float(weight.sum())  # every page read
    before = rss_file_kib()
    view = weight[:8]
    gemm.release_pages(weight)
    assert before - rss_file_kib() < 8 * 1024, "another tensor on the storage: nothing released"
    del view
    gemm.release_pages(weight)
    assert before - rss_file_kib() > 48 * 1024
    assert float(weight.sum()) == total


def rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")

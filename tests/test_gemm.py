"""The CPU matmul orientation chosen per Linear layer and row count (peer.gemm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peer import gemm


@pytest.mark.parametrize(
    ("rows", "expected"),
    [(0, 0), (1, 0), (2, 2), (3, 4), (4, 4), (5, 8), (9, 16), (33, 64), (64, 64), (65, 0)],
)
def test_bucket_is_the_next_power_of_two_within_the_measured_range(rows, expected):
    assert gemm.bucket(rows) == expected


@pytest.mark.parametrize("bias", [False, True])
def test_a_marked_layer_multiplies_the_other_way_round_with_the_same_result(bias, monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=bias)
    layer.transposed_rows = frozenset({8})
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(a.shape) or real_mm(a, b))
    x = torch.randn(7, 64)  # bucket 8: marked
    out = gemm.linear(layer, x)
    assert calls == [torch.Size([96, 64])], "the weight must be the left operand"
    assert out.is_contiguous() and out.shape == (7, 96)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    calls.clear()
    gemm.linear(layer, torch.randn(2, 64))  # bucket 2: not marked, the layer's own forward
    assert calls == []


def test_calibrate_marks_only_plain_float32_cpu_linears_and_shares_a_shape_once(monkeypatch):
    measured = []
    monkeypatch.setattr(gemm, "faster_buckets", lambda w: measured.append(tuple(w.shape)) or frozenset({16}))
    a, b = nn.Linear(32, 48), nn.Linear(32, 48)
    half = nn.Linear(32, 48).to(torch.bfloat16)
    quantized = torch.ao.nn.quantized.dynamic.Linear(32, 48)
    found = gemm.calibrate([a, b, half, quantized, nn.ReLU()])
    assert found == {(48, 32): frozenset({16})}
    assert measured == [(48, 32)], "one measurement per distinct shape"
    assert a.transposed_rows == b.transposed_rows == frozenset({16})
    assert not hasattr(half, "transposed_rows") and not hasattr(quantized, "transposed_rows")


def test_faster_buckets_only_names_measured_buckets():
    buckets = gemm.faster_buckets(torch.randn(128, 64))
    assert buckets <= set(gemm.BUCKETS)

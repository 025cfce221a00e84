"""Which way round to multiply a Linear layer's weight for a batch of a few rows (CPU).

A decode pass multiplies each weight ``W`` ``[out, in]`` by a few rows ``x`` ``[B, in]`` (one per
session). ``F.linear`` asks BLAS for ``x @ W.T``; for a small B, MKL's fp32 kernel for that shape
reads the weight once per pair of rows, so a pass of 8 sessions costs 3x a pass of 1 and 16 costs
about the same as 8. Asking for the same product the other way round, ``(W @ x.T).T``, gets a
kernel that reads the weight once: measured on the 2-core machine, 1 thread, weight 2816 x 1024,
B = 8: 1.22 ms -> 0.90 ms; B = 16: 1.32 -> 0.86 ms; the 32000 x 1024 LM head at B = 8:
29 -> 17 ms. At B = 1-2 and for long prefill chunks ``F.linear`` is as fast or faster.

Which form wins depends on the BLAS library, the CPU and the thread count, so it is measured
rather than assumed: `calibrate` times both forms on each distinct weight shape of a span for
row counts 2, 4, ..., 64 when the span is loaded (about a second for the bench model), and marks
the buckets where the transposed form is clearly faster on the layer (`transposed_rows`).
`linear` then dispatches on the row count. Layers that are not plain fp32 CPU ``nn.Linear``
(quantized, CUDA, bf16) are never marked and keep their own forward.

The two forms compute the same dot products; only the kernel's blocking differs, so results
agree to float32 rounding (~1e-6 relative), as any change of batch size already does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

BUCKETS = (2, 4, 8, 16, 32, 64)  # row counts measured; n rows use the bucket of the next power of 2
MIN_GAIN = 0.85  # the transposed form must take at most this share of F.linear's time
_REPS = 2


def bucket(rows: int) -> int:
    """The calibration bucket of a pass with `rows` rows (0 when outside every bucket)."""
    if rows < 2 or rows > BUCKETS[-1]:
        return 0
    return 1 << (rows - 1).bit_length()


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, multiplied the way round that `calibrate` found faster for this many rows."""
    marked = getattr(layer, "transposed_rows", None)
    if marked and x.dim() == 2 and bucket(x.shape[0]) in marked:
        out = torch.mm(layer.weight, x.t()).t().contiguous()
        return out if layer.bias is None else out + layer.bias
    return layer(x)


def _eligible(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
    )


def _time(fn) -> float:  # noqa: ANN001
    fn()  # warm-up: first touch of the weight and of the kernel
    best = float("inf")
    for _ in range(_REPS):
        begin = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - begin)
    return best


@torch.inference_mode()
def faster_buckets(weight: torch.Tensor) -> frozenset[int]:
    """The row buckets where ``(W @ x.T).T`` beats ``F.linear(x, W)`` by the margin MIN_GAIN."""
    won = set()
    for rows in BUCKETS:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        plain = _time(lambda x=x: F.linear(x, weight))
        transposed = _time(lambda x=x: torch.mm(weight, x.t()).t().contiguous())
        if transposed <= MIN_GAIN * plain:
            won.add(rows)
    return frozenset(won)


def calibrate(modules: Iterable[nn.Module]) -> dict[tuple[int, int], frozenset[int]]:
    """Measure each distinct fp32 CPU Linear weight shape once and mark every layer of that shape
    with the buckets where the transposed form wins. Returns ``{(out, in): buckets}``."""
    found: dict[tuple[int, int], frozenset[int]] = {}
    for module in modules:
        if not _eligible(module):
            continue
        shape = tuple(module.weight.shape)
        if shape not in found:
            found[shape] = faster_buckets(module.weight)
        module.transposed_rows = found[shape]
    return found

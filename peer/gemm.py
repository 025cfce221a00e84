"""How each Linear layer multiplies a pass of a few rows on the CPU (calibrated at load).

A decode pass multiplies each weight ``W`` ``[out, in]`` by a few rows ``x`` ``[B, in]`` (one per
session). ``F.linear`` asks BLAS for ``x @ W.T``; for a small B, MKL's fp32 kernel for that shape
reads the weight once per pair of rows, so a pass of 8 sessions costs 3x a pass of 1 and 16 costs
about the same as 8. Other ways compute the same product:

* ``transposed``: ``(W @ x.T).T``, the same weight, another kernel that reads it once (2-core
  machine, 1 thread, a 2816 x 1024 weight at B = 8: 0.90 ms where ``F.linear`` takes 1.22; the
  32000 x 1024 LM head: 17 ms against 29). No extra memory, so always considered.
* ``packed``: a second copy of the weight in oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, what inductor uses on CPU) and oneDNN's matmul:
  B = 4 costs what B = 1 does and B = 8 ~1.3x.
* ``skinny``: a second copy packed for the project's own few-rows kernel (`peer.skinny_gemm`,
  built on the machine with its C compiler), which streams the weight once for up to 12 rows: on
  the 2-core Xeon, 1 thread, a pass of the bench model's spans takes 0.71-0.75x the time it takes
  with oneDNN's copy at B = 8 and 0.82-0.91x at B = 16.

A copy doubles that weight's memory, and the plain weight stays for single rows and long prefill
chunks, where the copies' kernels are slower (oneDNN at B = 1: +28% in a span pass); so a copy is
made where the peer's memory budget allows (`peer.batching_config`, ``--prepack`` to force), and a
layer keeps at most one, of the format its measured plan uses.

Which way wins depends on the BLAS library, the CPU and the thread count, so it is measured rather
than assumed: `calibrate` times every way on each distinct weight shape of a span for row counts
2, 4, ..., 64 when the span is loaded (about a second for the bench model) and gives each layer a
plan (bucket -> way) holding only the ways that beat ``F.linear`` clearly. `linear` dispatches on
the row count. Layers that are not plain fp32 CPU ``nn.Linear`` (quantized, CUDA, bf16) get no
plan and keep their own forward.

**The weight's layout, for the single row of a lone stream's decode step.** ``nn.Linear`` keeps
``W`` as ``[out, in]`` rows; BLAS then computes one row as ``out`` dot products. Stored the other
way round (``[in, out]`` memory, the Parameter a transposed view of it, so every caller still sees
``[out, in]``), the same product is an accumulation over contiguous rows of ``W.T``, which MKL's
fp32 kernel streams faster (AMD EPYC, 1 thread, weights cold in cache: 768 x 768 0.69x the time,
1024 x 1024 0.90x, 2816 x 1024 0.69x, the 32000 x 1024 LM head 0.77x; 2 to 128 rows 0.83-1.11x,
mostly within a few percent; ``python -m loadtests.bench_gemm_layout``, best runs; as the median
of paired rounds, which is what `calibrate` goes by, 1024 x 1024 0.88-1.04, 2816 x 1024 0.89-0.98,
the LM head 0.79-0.86 over six loads). `calibrate` times both layouts for one row on each
distinct shape of at least MIN_LAYOUT_BYTES and re-lays the weights of that shape where the
transposed one wins by LAYOUT_GAIN; then it measures the ways above on the layout kept. A shape
whose median sits near LAYOUT_GAIN may go either way from one load to the next, at a cost of a
few percent of its own products either way. Same memory
(the old copy's pages are given back, `release_pages`), and a weight shared with another module (a
tied embedding, which gathers rows) keeps its layout.

All ways and layouts compute the same dot products with different blocking, so results agree to
float32 rounding (~1e-6 relative), as any change of batch size already does.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from peer import skinny_gemm

log = logging.getLogger("peer.gemm")

BUCKETS = (2, 4, 8, 16, 32, 64)  # row counts measured; n rows use the bucket of the next power of 2
MIN_GAIN = 0.85  # another way must take at most this share of F.linear's time to be used
LAYOUT_GAIN = 0.95  # the transposed layout must take at most this share of the plain one's time
FLUSH_BYTES = 64 << 20  # written between timings of a layout, so the weight is read from memory
LAYOUT_ROUNDS = 11  # paired timings per shape: ~0.13 s a shape
# Smaller weights keep their layout unmeasured: one row through a 256 x 256 weight takes ~10 us,
# where the call's own jitter is as large as any difference, so the choice flipped between loads
# (0.81-1.10 the time over eight of them), and such weights are a small share of any pass.
MIN_LAYOUT_BYTES = 512 << 10
PACK_HINT = 16  # the batch size oneDNN's blocked layout is tuned for (it serves every size)
# Turns each way takes per bucket when a plan is measured: the ways run one after the other in
# each turn and each gets the median of its turns. The best of 2 runs each, measured one way after
# the other, left the 16-row bucket of the bench model's 2816 x 1024 weight to F.linear on some
# loads (the few-rows kernel takes ~0.65x its time there): a pass of 16 rows then cost 1.4x.
PLAN_ROUNDS = 5


def bucket(rows: int) -> int:
    """The calibration bucket of a pass with `rows` rows (0 when outside every bucket)."""
    if rows < 2 or rows > BUCKETS[-1]:
        return 0
    return 1 << (rows - 1).bit_length()


def _transposed(weight: torch.Tensor, packed: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.mm(weight, x.t()).t().contiguous()


def _packed(weight: torch.Tensor, packed: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _skinny(weight: torch.Tensor, packed: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return skinny_gemm.matmul(packed, x, weight.shape[0])


WAYS: dict[str, Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]] = {
    "transposed": _transposed,
    "packed": _packed,
    "skinny": _skinny,
}
# The ways that multiply by a second copy of the weight, each in its own format; a layer keeps at
# most one such copy (one extra weight's worth of memory, what --prepack budgets).
COPY_WAYS = ("packed", "skinny")


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, multiplied the way `calibrate` found fastest for this many rows."""
    plan = getattr(layer, "matmul_plan", None)
    if plan and x.dim() == 2:
        way = plan.get(bucket(x.shape[0]))
        if way is not None:
            out = WAYS[way](layer.weight, getattr(layer, "packed_weight", None), x.contiguous())
            return out if layer.bias is None else out + layer.bias
    return layer(x)


def copies_in(plans: dict[tuple[int, int], dict[int, str]]) -> tuple[str, ...]:
    """The ways of COPY_WAYS that `plans` (what `calibrate` returns) use, in COPY_WAYS order."""
    used = {way for plan in plans.values() for way in plan.values()}
    return tuple(way for way in COPY_WAYS if way in used)


def copy_formats() -> list[str]:
    """The ways of COPY_WAYS this machine has: oneDNN in this torch build, the few-rows kernel
    where it could be built here."""
    return [way for way, present in (("packed", can_pack()), ("skinny", skinny_gemm.available())) if present]


def _copy(way: str, weight: torch.Tensor) -> torch.Tensor:
    if way == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_HINT)
    return skinny_gemm.pack(weight)


@functools.cache  # a property of the torch build: asked at start, by every calibrate and benchmark
def can_pack() -> bool:
    """Whether this torch build has oneDNN's prepacked fp32 matmul."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(4, 8)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_HINT)
        out = _packed(weight, packed, torch.ones(2, 8))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(out, torch.full((2, 4), 8.0)))


def packable_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes a packed copy of every layer that `calibrate` could pack would take (an upper bound:
    it keeps the copy only where the plan uses it; the few-rows kernel's pads to whole blocks)."""
    return sum(
        max(module.weight.nbytes, skinny_gemm.packed_bytes(module.weight))
        for module in modules
        if _eligible(module)
    )


def _eligible(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
    )


def _median_times(fns: dict[str, Callable[[], object]], rounds: int = PLAN_ROUNDS) -> dict[str, float]:
    """Each of `fns`'s median time over `rounds` turns, the functions timed one after the other in
    each turn (a drift of the machine weighs on all alike), after a warm-up run of each."""
    for fn in fns.values():
        fn()  # warm-up: first touch of the weight, its copies and the kernels
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(runs) for name, runs in times.items()}


def _paired_ratio(plain, other, flush: torch.Tensor, rounds: int = LAYOUT_ROUNDS) -> float:  # noqa: ANN001
    """The median over `rounds` rounds of `other`'s time ÷ `plain`'s, timed back to back in each
    round, each run after `flush` is rewritten: a layer's weight is read from memory in a pass
    (the other layers' weights evict it), not from a warm cache. The median of paired ratios, not
    the ratio of each one's best run: a drift of the machine hits both runs of a round alike, and
    one lucky run decides nothing, so twin peers on one machine choose alike (with the best of 5
    runs each, one shape's choice flipped between loads; twins then served at different speeds)."""
    plain(), other()  # warm-up: first touch of the kernels
    ratios = []
    for _ in range(rounds):
        times = []
        for fn in (plain, other):
            flush.add_(1.0)
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
        ratios.append(times[1] / times[0])
    return statistics.median(ratios)


def transposed_layout(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ``[out, in]`` as a view of ``[in, out]`` memory (module doc: the layout)."""
    return weight.t().contiguous().t()


_MADV_DONTNEED = 4  # Linux


def _last_on_its_storage(tensor: torch.Tensor) -> bool:
    """Whether no other tensor uses `tensor`'s storage (False when torch cannot say). Besides the
    tensor, the storage object made to ask holds a reference, and so does the tensor's own base
    when it is a view (``safe_open`` hands out views of a flat tensor)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    own = 2 + (tensor._base is not None)
    return use_count(tensor.untyped_storage()._cdata) <= own


def release_pages(tensor: torch.Tensor) -> None:
    """Give back the resident pages lying wholly inside `tensor`'s bytes, which is about to be
    dropped; nothing happens while another tensor shares its storage. A span's weights are views of
    the checkpoint file as mapped by ``safe_open``, and the mapping lives while any of its tensors
    does: without this, the pages a re-laid weight was read from stayed in the peer's RSS beside
    its new copy (clean file pages the kernel could drop, but counted, and a peer's RSS is what
    operators watch). Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    if not _last_on_its_storage(tensor):
        return
    begin = tensor.data_ptr()
    first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (begin + tensor.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


@torch.inference_mode()
def prefers_transposed_layout(weight: torch.Tensor, flush: torch.Tensor | None = None) -> bool:
    """Whether one row multiplies faster by `weight` laid out ``[in, out]`` in memory (timed on a
    copy, weights cold; `flush` is the buffer rewritten between runs, FLUSH_BYTES by default)."""
    relaid = transposed_layout(weight)
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    flush = torch.zeros(FLUSH_BYTES // 4) if flush is None else flush
    return _paired_ratio(lambda: F.linear(x, weight), lambda: F.linear(x, relaid), flush) <= LAYOUT_GAIN


@torch.inference_mode()
def measure_plan(weight: torch.Tensor, copies: dict[str, torch.Tensor] | None = None) -> dict[int, str]:
    """bucket -> the fastest way for that many rows, for the buckets where one beats ``F.linear``
    by the margin MIN_GAIN. A way of COPY_WAYS is tried only when `copies` holds its copy, and the
    plan names at most one of them: the one that makes the buckets' times the smallest in sum."""
    copies = copies or {}
    ways = {name: way for name, way in WAYS.items() if name not in COPY_WAYS or name in copies}
    times: dict[int, dict[str, float]] = {}
    for rows in BUCKETS:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        fns = {"plain": functools.partial(F.linear, x, weight)}
        fns.update({name: functools.partial(way, weight, copies.get(name), x) for name, way in ways.items()})
        times[rows] = _median_times(fns)
    return choose_plan(times)


def choose_plan(times: dict[int, dict[str, float]]) -> dict[int, str]:
    """The plan `measure_plan` gives for `times` (bucket -> way -> seconds, ``plain`` being
    ``F.linear``): per bucket the fastest way that beats ``plain`` by MIN_GAIN, with the ways of
    at most one copy format, the one whose plan takes the least time summed over the buckets."""
    measured_copies = {way for ways in times.values() for way in ways if way in COPY_WAYS}
    plans = []
    for kept in (None, *sorted(measured_copies)):
        plan = {}
        for rows, measured in times.items():
            allowed = [way for way in measured if way != "plain" and (way not in COPY_WAYS or way == kept)]
            best = min(allowed, key=measured.get, default=None)
            if best is not None and measured[best] <= MIN_GAIN * measured["plain"]:
                plan[rows] = best
        plans.append(plan)
    return min(plans, key=lambda plan: sum(times[rows][plan.get(rows, "plain")] for rows in times))


def calibrate(
    modules: Iterable[nn.Module], prepack: bool = False, formats: Iterable[str] | None = None
) -> dict[tuple[int, int], dict[int, str]]:
    """Give each fp32 CPU Linear layer its weight layout and a `matmul_plan`, both measured once per
    distinct weight shape; with `prepack`, also a packed copy of its weight (oneDNN's or the
    few-rows kernel's) where the plan uses one; `formats` limits the copies tried to those ways of
    COPY_WAYS (a benchmark's comparison). Returns ``{(out, in): plan}``."""
    formats = [way for way in copy_formats() if formats is None or way in formats] if prepack else []
    if prepack and not formats:
        log.warning(
            "--prepack: no packed matmul on this machine (oneDNN, a C compiler); using the plain weights"
        )
    modules = list(modules)
    holders: dict[int, int] = {}  # storage -> tensors on it: a shared weight keeps its layout
    for module in modules:
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            key = tensor.untyped_storage().data_ptr()
            holders[key] = holders.get(key, 0) + 1
    layouts: dict[tuple[int, int], bool] = {}
    flush = None  # made for the first eligible layer: one buffer serves every shape
    found: dict[tuple[int, int], dict[int, str]] = {}
    for module in modules:
        if not _eligible(module):
            continue
        shape = tuple(module.weight.shape)
        if shape not in layouts:
            if module.weight.nbytes < MIN_LAYOUT_BYTES:
                layouts[shape] = False
            else:
                flush = torch.zeros(FLUSH_BYTES // 4) if flush is None else flush
                layouts[shape] = prefers_transposed_layout(module.weight, flush)
        alone = holders[module.weight.untyped_storage().data_ptr()] == 1
        if layouts[shape] and alone and module.weight.is_contiguous():  # not already re-laid
            old = module.weight.data
            module.weight.data = transposed_layout(old)
            release_pages(old)
            del old
        # every format's copy is made to measure a new shape (for a moment, one more copy of that
        # weight than the budget counts); later layers make only the one used
        wanted = formats if shape not in found else [w for w in formats if w in found[shape].values()]
        copies = {way: _copy(way, module.weight) for way in wanted}
        if shape not in found:
            found[shape] = measure_plan(module.weight, copies)
        module.matmul_plan = found[shape]
        for way, copy in copies.items():
            if way in found[shape].values():
                # only kept where used: a second copy of the weight (a buffer, so weight_bytes counts it)
                module.register_buffer("packed_weight", copy, persistent=False)
        del copies
    if layouts:
        log.info(
            "weight layouts: [in, out] for %s; [out, in] for %s",
            sorted(shape for shape, relaid in layouts.items() if relaid) or "none",
            sorted(shape for shape, relaid in layouts.items() if not relaid) or "none",
        )
    if found:
        log.info("matmul plans (rows -> way, the rest F.linear): %s", found)
    return found

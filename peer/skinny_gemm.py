"""The few-rows fp32 matmul kernel of ``peer/kernels/skinny_gemm.c``, built on the peer's machine.

Why a kernel of our own: a decode pass multiplies each weight by one row per session, and at 8 or 16
rows the product should cost little more than reading the weight once. oneDNN's packed kernel (the
best of torch's) takes ~1.8x that at 8 rows. With this one a decode pass of 8 rows through the
bench model's spans takes 0.71-0.75x the time it takes with oneDNN's copy, 16 rows 0.82-0.91x (the
2-core Xeon, 1 thread; ``python -m loadtests.bench_pass_rows``). `peer.gemm`
measures it beside the other ways at load and uses it only for the row counts where it wins.

Built, not shipped: the source is compiled at first use with the machine's C compiler (``$CC``, else
``cc``) and ``-march=native``, so the vector width is the CPU's own, then cached under
``$SWARM_HOME/kernels`` (``~/.cache/swarm-serve/kernels`` by default), keyed by the source, the flags
and the CPU's feature flags: a cache shared between machines never hands one CPU another's code.
The build writes a temporary file and renames it, so peers starting together on one machine race
harmlessly. Where no compiler works (a slim container) or the built kernel disagrees with
``F.linear`` on a self-check, `available` is False and the peer keeps oneDNN's packed copy; so it
does with ``SWARM_FEW_ROWS_KERNEL=off`` in its environment (to compare the two, or to rule the
kernel out).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("peer.skinny_gemm")

SOURCE = Path(__file__).with_name("kernels") / "skinny_gemm.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")
# With OpenMP the blocks of a product go to the peer's threads; a compiler without it (clang with no
# libomp) builds the kernel single-threaded, and at load the plans weigh it against oneDNN's
# threaded kernel like any other way.
THREAD_FLAGS = (("-fopenmp",), ())
BUILD_TIMEOUT_S = 120
BLOCK_COLUMNS = 32  # NB in the source; the built library is checked to agree


def _cache_dir() -> Path:
    return Path(os.environ.get("SWARM_HOME", Path.home() / ".cache" / "swarm-serve")) / "kernels"


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), _cpu_features().encode()]))
    target = _cache_dir() / f"skinny_gemm-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(built)],
            check=True,
            capture_output=True,
            timeout=BUILD_TIMEOUT_S,
        )
        os.replace(built, target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SWARM_FEW_ROWS_KERNEL", "on").lower() in ("off", "0", "false", "no"):
        log.info("SWARM_FEW_ROWS_KERNEL=off: the few-rows kernel is not used; oneDNN's packed one serves")
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        log.info("no C compiler (%s): the few-rows kernel is not built; oneDNN's packed one serves", compiler)
        return None
    for threads in THREAD_FLAGS:
        try:
            library = ctypes.CDLL(str(_build(compiler, (*FLAGS, *threads))))
            break
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            failure = f"{exc} {detail[-500:]!r}"
    else:
        log.warning("the few-rows kernel did not build (%s); oneDNN's packed one serves", failure)
        return None
    library.skinny_gemm.restype = None
    library.skinny_gemm.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int,
    ]  # fmt: skip
    library.skinny_block_columns.restype = ctypes.c_int
    if library.skinny_block_columns() != BLOCK_COLUMNS or not _agrees(library):
        log.warning("the few-rows kernel disagrees with F.linear on its self-check; not used")
        return None
    return library


def _agrees(library: ctypes.CDLL) -> bool:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(45, 37, generator=generator)  # a partial block and an odd K
    packed = _pack(weight)
    for rows in (1, 5, 13, 30):
        x = torch.randn(rows, 37, generator=generator)
        if not torch.allclose(_matmul(library, packed, x, 45), F.linear(x, weight), rtol=1e-4, atol=1e-4):
            return False
    return True


def available() -> bool:
    """Whether the kernel is built and checked on this machine (the first call builds it)."""
    return _library() is not None


def _padded(out_features: int) -> int:
    """Output columns rounded up to whole blocks of BLOCK_COLUMNS."""
    return -(-out_features // BLOCK_COLUMNS) * BLOCK_COLUMNS


def _pack(weight: torch.Tensor) -> torch.Tensor:
    out_features, in_features = weight.shape
    padded = _padded(out_features)
    if padded != out_features:
        weight = F.pad(weight, (0, 0, 0, padded - out_features))
    blocks = weight.reshape(padded // BLOCK_COLUMNS, BLOCK_COLUMNS, in_features)
    return blocks.transpose(1, 2).contiguous()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ``[out, in]`` fp32 as the kernel reads it: ``[blocks, in, columns]``, zero padded
    to whole blocks (a copy of about the weight's size). Requires `available`."""
    if not available():
        raise RuntimeError("the few-rows kernel is not available on this machine")
    return _pack(weight.detach())


def packed_bytes(weight: torch.Tensor) -> int:
    """Bytes `pack` makes of `weight`, its padding included."""
    out_features, in_features = weight.shape
    return _padded(out_features) * in_features * weight.element_size()


def _matmul(library: ctypes.CDLL, packed: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    rows, in_features = x.shape
    out = torch.empty(rows, out_features, dtype=torch.float32)
    library.skinny_gemm(
        packed.data_ptr(),
        x.data_ptr(),
        out.data_ptr(),
        rows,
        in_features,
        out_features,
        torch.get_num_threads(),
    )  # ctypes lets the GIL go for the call, as torch's own kernels do
    return out


def matmul(packed: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W.T`` for `packed` = ``pack(W)``; `x` is ``[rows, in]`` fp32 and contiguous."""
    return _matmul(_library(), packed, x, out_features)

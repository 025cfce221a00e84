"""torch.Tensor <-> `swarm.Tensor` (raw bytes + dtype + shape), and the peer's dtype names.

Raw little-endian bytes keep a 1024-wide hidden state at 4 KB in fp32 and avoid pickle, which a
peer must never unpickle from the network. bfloat16 has no numpy dtype, so tensors are viewed as
int16 for the byte copy and viewed back on arrival.

`DTYPES` is the peer's only table between torch dtypes and their names: the names are
`discovery.records.DTYPE_NAMES`, the same for compute dtypes (flags, DHT records, `Info`,
`/metrics`) and wire dtypes.
"""

from __future__ import annotations

import math

import torch

from discovery import records
from protos import swarm_pb2

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in records.DTYPE_NAMES}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_ELEMENTS = 1 << 28  # far above any real step; guards against a hostile shape


class CodecError(ValueError):
    """A tensor from the network that cannot be decoded (bad dtype, shape or size)."""


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``; ValueError for a dtype peers neither compute nor send in."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {list(DTYPES)}")
    return DTYPE_NAMES[dtype]


def encode(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> swarm_pb2.Tensor:
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if tensor.dtype not in DTYPE_NAMES:
        raise CodecError(f"unsupported tensor dtype {tensor.dtype}")
    cpu = tensor.detach().contiguous().cpu()
    raw = cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu
    return swarm_pb2.Tensor(data=raw.numpy().tobytes(), dtype=DTYPE_NAMES[cpu.dtype], shape=list(cpu.shape))


def decode(message: swarm_pb2.Tensor) -> torch.Tensor:
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise CodecError(f"unsupported tensor dtype {message.dtype!r}; use one of {sorted(DTYPES)}")
    shape = list(message.shape)
    if any(dim < 0 for dim in shape):
        raise CodecError(f"negative dimension in shape {shape}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise CodecError(f"tensor of {count} elements is too large")
    itemsize = dtype.itemsize
    if len(message.data) != count * itemsize:
        raise CodecError(f"{len(message.data)} bytes do not hold a {message.dtype} tensor of shape {shape}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    storage_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    flat = torch.frombuffer(bytearray(message.data), dtype=storage_dtype)
    return flat.view(dtype).reshape(shape)

"""Weight quantization of a span's Linear layers: int8 on CPU and CUDA, NF4 on CUDA.

Modes and the kernels behind them (measured on the development machine, see DESIGN.md and
docs/benchmarks-quant.md):

* ``int8`` on CPU: ``torch.ao.quantization.quantize_dynamic`` (fbgemm/onednn int8 GEMM, weights
  int8 per output channel, activations quantized on the fly). Several times faster than fp32 at
  batch 1 because decode is memory bound and the weights are 4x smaller. ``torch.ao`` is
  deprecated in favour of torchao, but torchao's int8 weight-only path was ~2x *slower* than
  fp32 here, so we keep the fast kernel and silence the deprecation warning.
* ``int8`` on CUDA: bitsandbytes ``Linear8bitLt`` (LLM.int8 with outlier threshold 6.0).
* ``nf4`` on CUDA: bitsandbytes ``Linear4bit(quant_type="nf4")`` computing in the span's dtype.
* ``nf4`` on CPU: refused. bitsandbytes' CPU 4-bit path was ~10x slower than fp32 here.

bitsandbytes is imported only when a CUDA quant mode is asked for, so CPU-only machines never
need it. Norms, the embedding and rotary tables stay in the compute dtype; the LM head is
quantized with the blocks (it is the biggest single matrix of a small model, and measured
top-1 agreement stays high, see tests/test_quant.py).

Quantization is applied module by module as each block is loaded (``BlockSpan.load``), so peak
memory holds one block in full precision, never the whole span.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from discovery.records import QUANT_MODES
from peer.tensor_codec import dtype_name

log = logging.getLogger(__name__)


class QuantUnavailable(ValueError):
    """The asked-for quantization cannot run here (device, dtype or missing package)."""


def validate(quant: str, device: str | torch.device, dtype: torch.dtype) -> None:
    """Raise ``QuantUnavailable`` (a ValueError) with a fix-it message for unsupported combos.

    Called before any weight is read, so a bad flag costs nothing.
    """
    if quant not in QUANT_MODES:
        raise QuantUnavailable(f"unknown quantization {quant!r}; use one of {list(QUANT_MODES)}")
    if quant == "none":
        return
    device_type = torch.device(device).type
    if device_type == "cpu":
        if quant == "nf4":
            raise QuantUnavailable(
                "--quant nf4 needs a CUDA GPU (bitsandbytes 4-bit kernels); on CPU use --quant int8"
            )
        if dtype != torch.float32:
            raise QuantUnavailable(
                f"--quant int8 on CPU computes in float32 (dynamic int8 kernels); got --dtype {dtype_name(dtype)}, "
                "use --dtype float32 or auto"
            )
        if not set(torch.backends.quantized.supported_engines) - {"none"}:
            raise QuantUnavailable("this torch build has no quantized CPU engine for --quant int8")
        return
    if device_type == "cuda":
        if dtype == torch.float32:
            raise QuantUnavailable(
                f"--quant {quant} on CUDA computes in float16 or bfloat16; use --dtype auto, bfloat16 or float16"
            )
        _bitsandbytes()  # fail now, with the install hint, rather than at the first block
        return
    raise QuantUnavailable(f"--quant {quant} is not supported on device {device_type!r}")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantUnavailable(
            "CUDA quantization needs bitsandbytes: pip install bitsandbytes (or run with --quant none)"
        ) from exc
    return bitsandbytes


# ---- conversion -------------------------------------------------------------------------------
def quantize_linears(module: nn.Module, quant: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (and ``module`` itself if it is one) in place.

    The Linear layers come in with full-precision weights on CPU or ``device``; what comes out
    lives on ``device``. Returns the (possibly new) module.
    """
    if quant == "none":
        return module
    if isinstance(module, nn.Linear):
        return _convert(module, quant, device, dtype)
    for name, child in list(module.named_children()):
        setattr(module, name, quantize_linears(child, quant, device, dtype))
    return module


def _convert(linear: nn.Linear, quant: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if device.type == "cpu":
        return _cpu_int8(linear)
    if quant == "int8":
        return _cuda_int8(linear, device)
    return _cuda_nf4(linear, device, dtype)


def _cpu_int8(linear: nn.Linear) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice; see the module docstring
        wrapped = quantize_dynamic(
            nn.Sequential(linear.float()), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )
    return wrapped[0]


def _cuda_int8(linear: nn.Linear, device: torch.device) -> nn.Module:  # pragma: no cover - needs CUDA
    bnb = _bitsandbytes()
    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=6.0,
        device="meta",
    )
    # Int8Params quantizes when moved to a CUDA device: the full-precision copy never lands there.
    layer.weight = bnb.nn.Int8Params(
        linear.weight.data.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(torch.float16), requires_grad=False)
    return layer.to(device)


def _cuda_nf4(linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Module:  # pragma: no cover
    bnb = _bitsandbytes()
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.to("cpu", dtype), requires_grad=False, quant_type="nf4"
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return layer.to(device)


# ---- memory accounting ------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    if tensor.is_quantized:
        scales = 0
        if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales = (
                tensor.q_per_channel_scales().numel() * 8 + tensor.q_per_channel_zero_points().numel() * 8
            )
        return tensor.numel() * tensor.element_size() + scales
    return tensor.numel() * tensor.element_size()


def resident_bytes(module: nn.Module) -> int:
    """Bytes of weights resident for ``module``: parameters + buffers, quantized weights included.

    torch.ao's dynamic Linear keeps its int8 weight in a packed C++ object that is neither a
    parameter nor a buffer, so it is counted through ``weight()``/``bias()``; bitsandbytes keeps
    the scales of 8-bit and 4-bit weights beside the parameter (``SCB``, ``quant_state``).
    Shared tensors (a tied embedding) are counted once.
    """
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        packed = getattr(sub, "_packed_params", None)
        if packed is not None and callable(getattr(sub, "weight", None)):
            total += _tensor_bytes(sub.weight()) + _tensor_bytes(sub.bias())
        for tensor in list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False)):
            # meta tensors and oneDNN-packed copies (peer.gemm) have no data pointer
            key = id(tensor) if tensor.device.type == "meta" or tensor.is_mkldnn else tensor.data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += _tensor_bytes(tensor)
            state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit
            if state is not None:
                total += _tensor_bytes(getattr(state, "absmax", None))
            total += _tensor_bytes(getattr(tensor, "SCB", None))  # bitsandbytes 8-bit row scales
    return total

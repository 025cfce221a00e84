"""Block-wise FP8 checkpoints (DeepSeek-V3 / R1, Kimi K2 as shipped): dequantized on the CPU at load.

Those folders store most Linear weights as ``weight`` in ``float8_e4m3fn`` plus a float32
``weight_scale_inv`` per ``weight_block_size`` tile (128 x 128; the last row and column of tiles
may be partial), and say so in ``config.json``'s ``quantization_config`` (``quant_method: "fp8"``).
The real value of a weight is ``weight * weight_scale_inv`` of its tile (the name says "inverse"
because the quantizer divided by it), which is what transformers' ``Fp8Dequantize`` computes.

A peer reads only its own blocks' tensors (``peer.weights``), in float32 on the CPU, multiplies
each FP8 weight by its tiles' scales there, drops the scales, and only then casts to the compute
dtype: the block is the dequantized model, and ``--quant int8/nf4`` applies on top like on any
checkpoint. Keeping FP8 on the GPU (an FP8 matmul) is not done.

Which ``quant_method`` a family reads is ``Family.shipped_quant`` (``fp8`` for DeepSeek-V3); any
other is refused at start with one line naming the field (``peer.families.check_supported``).
"""

from __future__ import annotations

from typing import Any

import torch

SCALE_SUFFIX = ".weight_scale_inv"
_FP8_FORMATS = ("e4m3", None)


def block_size(hf_config: Any) -> tuple[int, int] | None:
    """The FP8 tile of a block-wise FP8 checkpoint, or None when its weights are plain."""
    config = _quantization_config(hf_config)
    if not config or _method(config) != "fp8":
        return None
    rows, cols = config.get("weight_block_size") or (128, 128)
    return int(rows), int(cols)


def check_quantization(hf_config: Any) -> None:
    """Raise ``ValueError`` (one line, naming the field) for an FP8 ``quantization_config`` whose
    layout we do not read. Which methods a family reads at all is ``Family.shipped_quant``'s."""
    config = _quantization_config(hf_config)
    if config is None or _method(config) != "fp8":
        return
    if config.get("fmt") not in _FP8_FORMATS:
        raise ValueError(
            f"config field quantization_config.fmt={config.get('fmt')!r} is not supported (e4m3 only)"
        )
    size = config.get("weight_block_size")
    if size is not None and (len(size) != 2 or min(int(s) for s in size) < 1):
        raise ValueError(f"config field quantization_config.weight_block_size={size!r} is not supported")


def _method(config: dict[str, Any]) -> Any:
    method = config.get("quant_method")
    return getattr(method, "value", method)  # transformers' QuantizationMethod enum or a string


def _quantization_config(hf_config: Any) -> dict[str, Any] | None:
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    return config if isinstance(config, dict) else config.to_dict()


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight`` (FP8 ``[out, in]``) times the scale of its tile, in float32."""
    rows, cols = weight.shape
    if scale_inv.shape != (-(-rows // block[0]), -(-cols // block[1])):
        raise ValueError(
            f"weight_scale_inv of shape {tuple(scale_inv.shape)} does not tile a {rows}x{cols} weight "
            f"in {block[0]}x{block[1]} blocks"
        )
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def dequantize_state(state: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Fold every ``X.weight_scale_inv`` into ``X.weight``; the scales leave the state."""
    out = {name: tensor for name, tensor in state.items() if not name.endswith(SCALE_SUFFIX)}
    for name, scale_inv in state.items():
        if name.endswith(SCALE_SUFFIX):
            weight_name = name.removesuffix(SCALE_SUFFIX) + ".weight"
            if weight_name not in state:
                raise ValueError(f"checkpoint has {name} but no {weight_name}")
            out[weight_name] = dequantize(state[weight_name], scale_inv, block)
    return out

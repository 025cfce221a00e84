"""MXFP4, the format gpt-oss ships its expert weights in, dequantized at load.

A tensor ``W`` ``[E, in, out]`` (transformers' stacked-expert layout) is stored transposed and
in groups of 32 along ``in``: ``{name}_blocks`` uint8 ``[E, out, in / 32, 16]`` holds two 4-bit
E2M1 codes per byte (low nibble first), ``{name}_scales`` uint8 ``[E, out, in / 32]`` one
power-of-two exponent per group, biased by 127 (OCP Microscaling spec; transformers'
``integrations/mxfp4.py``). A value is ``FP4_VALUES[code] * 2 ** (scale - 127)``.

Every such value is exact in fp32 and bf16, so dequantizing first and then serving in the span's
dtype loses nothing over the checkpoint; the peer does it per block as it reads that block's
tensors (``peer.gpt_oss.convert_block``), one expert at a time so the int64 code indices of a
large layer are never all alive at once. Keeping MXFP4 packed on the GPU (transformers' triton
kernels) is not done: the peer's ``--quant`` then applies to the dequantized experts.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # values sharing one scale
BIAS = 127


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``blocks`` ``[..., out, G, 16]`` + ``scales`` ``[..., out, G]`` -> ``[..., G * 32, out]``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[-1] != GROUP // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} (need [..., G, 16] and [..., G])"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    lead = blocks.shape[:-3]
    flat_blocks = blocks.reshape(-1, *blocks.shape[-3:])
    flat_scales = scales.reshape(-1, *scales.shape[-2:])
    out_rows, groups = blocks.shape[-3], blocks.shape[-2]
    out = torch.empty(flat_blocks.shape[0], groups * GROUP, out_rows, dtype=dtype, device=blocks.device)
    for i in range(flat_blocks.shape[0]):  # one expert at a time: bounded temporaries
        packed = flat_blocks[i]
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(out_rows, groups, GROUP)
        values = torch.ldexp(lut[codes.long()], (flat_scales[i].to(torch.int32) - BIAS).unsqueeze(-1))
        out[i] = values.reshape(out_rows, groups * GROUP).t().to(dtype)
    return out.reshape(*lead, groups * GROUP, out_rows)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[..., in, out]`` -> (blocks, scales), rounding each value to the nearest E2M1
    code under its group's exponent (the largest magnitude of a group lands in [4, 8) before
    rounding, clamped to 6). Writes test folders in the shipped layout; values that are already
    representable (``dequantize_mxfp4`` of anything) come back exactly."""
    if weight.shape[-2] % GROUP:
        raise ValueError(
            f"MXFP4 groups {GROUP} values along the input axis; {weight.shape[-2]} is not a multiple"
        )
    w = weight.float().transpose(-1, -2)  # [..., out, in]
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.zeros_like(amax))
    exponent = exponent.clamp(-BIAS, BIAS)
    scaled = groups / torch.ldexp(torch.ones_like(amax), exponent.to(torch.int32)).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    nearest = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # code 0..7
    codes = (nearest + 8 * (scaled < 0)).to(torch.uint8)
    pairs = codes.reshape(*codes.shape[:-1], GROUP // 2, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exponent.to(torch.int32) + BIAS).to(torch.uint8).contiguous()

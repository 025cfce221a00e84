"""Building blocks shared by ``peer.model``'s block and the attention kinds built beside it
(``peer.mla``): they live below both so that neither imports the other's module."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Llama RMSNorm: statistics in fp32, then cast back BEFORE the weight multiply (as HF does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def normalized_fp32(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalized_fp32(x).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's (non-interleaved) rotary layout: the two halves of each head are the pair."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, dim]``; with partial RoPE (Phi) only the first ``cos``-width dims."""
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, rest = x[..., :width], x[..., width:]
    return torch.cat((head * cos + rotate_half(head) * sin, rest), dim=-1)

"""What gpt-oss (``model_type: gpt_oss``) adds to the one block, written after transformers'
``GptOssForCausalLM`` step for step.

* **Attention sinks**: each head has a learned logit that joins the softmax as one more column and
  is then dropped, so a head can attend to "nothing" (``sink_attention``). Eager, like
  transformers (which has no SDPA path for gpt-oss): the sink column is not something SDPA's mask
  can add without an extra key.
* **Clamped SwiGLU experts** (``ClampedSwiGLU``): ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha *
  g)`` with ``g = clamp(gate, max=l)``, and biases on both projections.
* **Top-k, then softmax** routing with a router bias (``route_topk_softmax``): the softmax runs
  over the k chosen logits only, in the compute dtype, as transformers does.
* **RMSNorm with the weight product in fp32** (``RMSNormFp32Product``), then the cast.
* **Stacked expert tensors**: the checkpoint keeps every expert of a layer in one 3-D tensor,
  ``mlp.experts.gate_up_proj`` ``[E, hidden, 2 * inner]`` with gate and up INTERLEAVED along the
  last axis (gate at even columns), and ``down_proj`` ``[E, inner, hidden]``, possibly in MXFP4
  (``*_blocks`` / ``*_scales``, ``peer.mxfp4``). ``convert_block`` turns them, once at load, into
  one ``nn.Linear`` pair per expert with ``[gate | up]`` rows, so the MoE batches per expert and
  ``--quant int8`` quantizes experts like any Linear (a 3-D parameter would be skipped by both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peer.gemm import linear
from peer.mxfp4 import dequantize_mxfp4
from peer.primitives import RMSNorm


class RMSNormFp32Product(RMSNorm):
    """gpt-oss's RMSNorm: the weight multiplies the fp32 statistics, the cast comes last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * self.normalized_fp32(x)).to(x.dtype)


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """``q`` ``[heads, n, dim]``, ``k``/``v`` ``[kv_heads, keys, dim]``, bool ``mask`` ``[n, keys]``
    (True = may attend) or None;
    ``sinks`` ``[heads]``. transformers' eager gpt-oss attention: additive mask, the sink column
    appended, the row max subtracted, softmax in the compute dtype, the sink column dropped."""
    heads, n, dim = q.shape
    kv_heads, keys = k.shape[0], k.shape[1]
    # The query heads of one KV group attend as one [group * n, dim] matrix: the same products
    # as transformers' repeat_kv, without copying the group's keys and values per head.
    grouped = q.reshape(kv_heads, heads // kv_heads * n, dim)
    scores = (torch.matmul(grouped, k.transpose(1, 2)) * scale).view(heads, n, keys)
    if mask is not None:  # None: every key is visible (one decode token, nothing out of window)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    sink = sinks.to(scores.dtype).reshape(-1, 1, 1).expand(-1, n, 1)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    out = torch.matmul(probs.to(v.dtype).reshape(kv_heads, heads // kv_heads * n, keys), v)
    return out.view(heads, n, dim)


def route_topk_softmax(
    logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss routing: the top-k router logits (bias included), softmaxed among themselves."""
    del normalize  # the softmax over the chosen k already sums to one
    values, chosen = torch.topk(logits, top_k, dim=-1)
    return F.softmax(values, dim=-1, dtype=values.dtype), chosen


class ClampedSwiGLU(nn.Module):
    """One gpt-oss expert: ``gate_up_proj`` rows are ``[gate | up]`` (de-interleaved at load)."""

    def __init__(self, hidden: int, inner: int, alpha: float, limit: float) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=True)
        self.down_proj = nn.Linear(inner, hidden, bias=True)
        self.alpha, self.limit = alpha, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(self.gate_up_proj, x).chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return linear(self.down_proj, (up + 1) * glu)


_EXPERTS = "mlp.experts."


def convert_block(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One block's checkpoint tensors -> the block's module layout (module doc): MXFP4 pairs are
    dequantized, stacked experts are split into per-expert ``nn.Linear`` weights ``[out, in]``
    with the interleaved gate/up columns reordered to ``[gate | up]`` rows."""
    state = dict(state)
    for proj in ("gate_up_proj", "down_proj"):
        blocks, scales = (
            state.pop(f"{_EXPERTS}{proj}_blocks", None),
            state.pop(f"{_EXPERTS}{proj}_scales", None),
        )
        if (blocks is None) != (scales is None):
            raise ValueError(f"checkpoint has only one of {proj}_blocks / {proj}_scales")
        if blocks is not None:
            state[f"{_EXPERTS}{proj}"] = dequantize_mxfp4(blocks, scales, dtype=dtype)
    if f"{_EXPERTS}gate_up_proj" not in state:
        return state
    gate_up = state.pop(f"{_EXPERTS}gate_up_proj")  # [E, hidden, 2 * inner], gate at even columns
    gate_up_bias = state.pop(f"{_EXPERTS}gate_up_proj_bias")  # [E, 2 * inner]
    down = state.pop(f"{_EXPERTS}down_proj")  # [E, inner, hidden]
    down_bias = state.pop(f"{_EXPERTS}down_proj_bias")  # [E, hidden]
    inner = gate_up.shape[-1] // 2
    order = torch.cat([torch.arange(0, 2 * inner, 2), torch.arange(1, 2 * inner, 2)]).to(gate_up.device)
    for e in range(gate_up.shape[0]):
        state[f"{_EXPERTS}{e}.gate_up_proj.weight"] = gate_up[e].t()[order].contiguous()
        state[f"{_EXPERTS}{e}.gate_up_proj.bias"] = gate_up_bias[e][order].contiguous()
        state[f"{_EXPERTS}{e}.down_proj.weight"] = down[e].t().contiguous()
        state[f"{_EXPERTS}{e}.down_proj.bias"] = down_bias[e].contiguous()
    return state

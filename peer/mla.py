"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2), caching what it compresses.

transformers' ``DeepseekV3Attention``, per token:

* query: ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` (or ``q_proj(x)`` without ``q_lora_rank``),
  per head ``[q_nope (qk_nope_head_dim) | q_rope (qk_rope_head_dim)]``;
* latent: ``kv_a_proj_with_mqa(x)`` = ``[c (kv_lora_rank) | k_rope (qk_rope_head_dim)]``, ``c``
  through ``kv_a_layernorm``, ``k_rope`` rotated once and shared by every head;
* keys and values per head come from the latent: ``kv_b_proj(c)`` = ``[k_nope | v]`` per head,
  with ``W_UK`` the ``k_nope`` rows and ``W_UV`` the ``v`` rows of ``kv_b_proj``.

**The cache keeps the latent** ``[c | k_rope]`` (``kv_lora_rank + qk_rope_head_dim`` numbers per
token and layer, one "head" in a ``parts=1`` ``KVCache``), not the expanded keys and values:
for DeepSeek-V3 that is 576 numbers instead of 128 heads x (192 + 128), 71x less, which is the
point of the design. Rewind, reuse across turns and failover replay work on it like on any cache.

Two exact ways to attend from it, picked per session and step by their cost (``absorbs``):

* **absorbed** (decode): ``q_nope . k_nope = (q_nope W_UK) . c``, and ``probs @ v = (probs @ c)
  W_UV^T``. So each query is folded into latent space once (``W_UK``), attends over the cached
  latents directly (one key "head" shared by all query heads: two plain matmuls with the heads
  stacked as rows), with ``c`` as the values, and the result leaves latent space through
  ``W_UV``. Nothing is expanded per step, not even per head.
* **expanded** (prefill): ``kv_b_proj`` on every latent, then ordinary attention, as transformers
  computes it; cheaper when the chunk has many queries for its keys.

``kv_b_proj`` is a plain parameter (like the router), not an ``nn.Linear``: the absorbed form
needs its rows, so ``--quant`` leaves it in the compute dtype; it is small (``kv_lora_rank x
heads x (qk_nope + v)``).

DeepSeek's RoPE: interleaved pairs when ``rope_interleave`` (transformers' rotation on the even
and odd lanes, whose output is the de-interleaved halves: queries and keys get the same layout,
so their dot product is the model's), YaRN frequencies and cos/sin factor from transformers'
init, and the softmax scale times ``mscale ** 2`` (``peer.families._deepseek_v3``).
The small norms on the low-rank paths use transformers' default epsilon (1e-6), not
``rms_norm_eps``, as transformers builds them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peer.gemm import linear
from peer.primitives import RMSNorm, apply_rotary

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with its default eps


class LatentUp(nn.Module):
    """``kv_b_proj``: latent -> ``[k_nope | v]`` per head. A plain weight (see the module doc)."""

    def __init__(self, rank: int, rows: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, rank))


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb_interleave`` for one tensor: pairs ``(x0, x1), ...``."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def absorbs(queries: int, keys: int, rank: int, nope: int, rope: int, v: int) -> bool:
    """Whether the absorbed form costs fewer multiply-adds per head than expanding the keys.

    Expanded: ``kv_b_proj`` on every key (``keys * rank * (nope + v)``) plus attention at the
    expanded widths (``queries * keys * (nope + rope + v)``). Absorbed: fold and unfold each query
    (``queries * rank * (nope + v)``) plus attention at latent width (``queries * keys * (2 *
    rank + rope)``). One decoding query always absorbs; a long prefill expands.
    """
    expanded = keys * rank * (nope + v) + queries * keys * (nope + rope + v)
    absorbed = queries * rank * (nope + v) + queries * keys * (2 * rank + rope)
    return absorbed < expanded


class LatentAttention(nn.Module):
    """MLA for one layer, with ``peer.model.Attention``'s interface (packed rows, a plan)."""

    alibi = False  # BlockSpan.load asks every attention

    def __init__(self, config: Any, layer_idx: int) -> None:  # a peer.model.SpanConfig (which imports us)
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        self.scaling = config.attn_scale or (self.nope + self.rope) ** -0.5
        self.interleave = config.rope_interleave
        hidden, q_dim = config.hidden_size, self.heads * (self.nope + self.rope)
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_dim, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.rope, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = LatentUp(self.rank, self.heads * (self.nope + self.v_dim))
        self.o_proj = nn.Linear(self.heads * self.v_dim, hidden, bias=config.o_bias)

    def _absorbed(
        self, query: torch.Tensor, cached: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """Attention in latent space: ``query`` ``[heads, n, rank + rope]`` against the cached
        latents ``[keys, rank + rope]``, which are also the values (their first ``rank`` lanes).

        Written as two plain matmuls with every head's queries stacked as rows, because the one
        key "head" is shared: SDPA's GQA path on the CPU would repeat the cache once per head,
        the very expansion the latent cache exists to avoid. Softmax in fp32, as transformers'.
        """
        heads, n, _ = query.shape
        keys = cached.shape[0]
        scores = torch.matmul(query.reshape(heads * n, -1), cached.t()).view(heads, n, keys) * self.scaling
        if causal:  # a chunk into an empty cache: its keys are its own tokens
            mask = torch.ones(n, keys, dtype=torch.bool, device=query.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(probs.view(heads * n, keys), cached[:, : self.rank]).view(heads, n, self.rank)

    def _expanded(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, cached: torch.Tensor, mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:  # fmt: skip
        """Attention as transformers computes it: every cached latent expanded through ``kv_b_proj``."""
        keys = cached.shape[0]
        c, k_rot = cached.split([self.rank, self.rope], dim=-1)
        k_nope, v = (
            F.linear(c, self.kv_b_proj.weight).view(keys, self.heads, -1).split([self.nope, self.v_dim], -1)
        )
        k = torch.cat([k_nope, k_rot.unsqueeze(1).expand(keys, self.heads, self.rope)], dim=-1)
        query = torch.cat([q_nope, q_rope], dim=-1)
        attn = F.scaled_dot_product_attention(
            query.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=self.scaling,
        )  # fmt: skip
        return attn[0].transpose(0, 1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate_interleaved(x, cos, sin) if self.interleave else apply_rotary(x, cos, sin)

    def forward(
        self, x: torch.Tensor, rope: list[tuple[torch.Tensor, torch.Tensor]], plan: list[Any]
    ) -> torch.Tensor:
        """``plan``: ``peer.model._plan_attention``'s per-session slices of the pack."""
        tokens = x.shape[0]
        if hasattr(self, "q_a_proj"):
            q = linear(self.q_b_proj, self.q_a_layernorm(linear(self.q_a_proj, x)))
        else:
            q = linear(self.q_proj, x)
        q_nope, q_rope = q.view(tokens, self.heads, self.nope + self.rope).split([self.nope, self.rope], -1)
        latent, k_rope = linear(self.kv_a_proj_with_mqa, x).split([self.rank, self.rope], dim=-1)
        cos, sin = rope[0]
        q_rope = self._rotate(q_rope, cos.unsqueeze(1), sin.unsqueeze(1))  # [T, heads, rope]
        new = torch.cat(
            [self.kv_a_layernorm(latent), self._rotate(k_rope, cos, sin)], dim=-1
        )  # [T, rank + rope]

        up = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = up[:, : self.nope], up[:, self.nope :]  # [heads, nope, rank], [heads, v, rank]
        dims = (self.rank, self.nope, self.rope, self.v_dim)
        absorbed = [s.length > 0 and absorbs(s.length, s.cache.length + s.length, *dims) for s in plan]
        out = torch.empty(tokens, self.heads, self.v_dim, dtype=x.dtype, device=x.device)
        if any(absorbed):  # fold every query of the pack at once: one einsum, not one per session
            folded = torch.einsum("nhd,hdr->nhr", q_nope, w_uk)  # q_nope W_UK
            latent_query = torch.cat([folded, q_rope], dim=-1).transpose(0, 1)  # [heads, T, rank + rope]
            latent_out = torch.empty(tokens, self.heads, self.rank, dtype=x.dtype, device=x.device)
        for s, absorb in zip(plan, absorbed, strict=True):
            if s.length == 0:
                continue
            rows = slice(s.offset, s.offset + s.length)
            # [1, 1, keys, rank + rope]; a sub-span's cache starts at its own first layer
            cached, _ = s.cache.append(self.layer_idx - s.first_layer, new[rows].unsqueeze(0))
            _, mask, causal = s.views[0]
            if absorb:
                latent_out[rows] = self._absorbed(
                    latent_query[:, rows], cached[0, 0], mask, causal
                ).transpose(0, 1)
            else:
                out[rows] = self._expanded(q_nope[rows], q_rope[rows], cached[0, 0], mask, causal)
        if all(absorbed):  # leave latent space through W_UV, for every absorbed row at once
            out = torch.einsum("nhr,hvr->nhv", latent_out, w_uv)
        elif any(absorbed):
            rows = torch.cat([
                torch.arange(s.offset, s.offset + s.length) for s, a in zip(plan, absorbed, strict=True) if a
            ]).to(x.device)  # fmt: skip
            out[rows] = torch.einsum("nhr,hvr->nhv", latent_out[rows], w_uv)
        return linear(self.o_proj, out.reshape(tokens, -1))

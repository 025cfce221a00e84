"""``BlockSpan``: blocks ``[start, end)`` of a Llama-family model, gpt-fast style.

The whole span is a handful of small modules whose names mirror the Hugging Face checkpoint
(``layers.N.self_attn.q_proj`` ...), so weights load with a plain ``load_state_dict`` and the
numerics follow ``transformers``' Llama step for step (fp32 logits agree to ~1e-6).

Packed variable-length batches: ``forward`` takes the new tokens of several sessions
concatenated into one ``[T, ...]`` pack. Everything that is per token (norms, projections, MLP,
rotary) runs on the pack at once, which is where the FLOPs are; only attention is done per
session, against that session's own ``KVCache``. Sessions of different lengths and positions
share a step without padding, which is what continuous batching needs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common.model_dir import resolve_model_dir
from peer import fp8, gemm, gpt_oss, grouped_moe, mla
from peer import quant as quantization
from peer.families import (  # noqa: F401 - SUPPORTED_MODEL_TYPES is re-exported
    SUPPORTED_MODEL_TYPES,
    Family,
    alibi_slopes,
    check_supported,
    family_of,
    fused_qkv_order,
)
from peer.gemm import linear
from peer.kv_cache import KVCache
from peer.primitives import RMSNorm, apply_rotary, rotate_half  # noqa: F401 - re-exported
from peer.tensor_codec import DTYPES
from peer.weights import read_tensors, span_tensor_names, tensor_index

# RoPE variants whose frequencies depend only on the config. "dynamic" and "longrope" rescale with
# the CURRENT sequence length in transformers, which changes the rotation of keys already in a
# cache; a span cannot reproduce that consistently, so we refuse them instead of drifting silently.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def _bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh GELU, with its own rounded constants (not quite ``gelu(approximate="tanh")``)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "bloom_gelu": _bloom_gelu,
}
_LAYER_TYPES = ("full_attention", "sliding_attention")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept ``torch.bfloat16`` or ``"bfloat16"`` (CLI flags and wire names, ``peer.tensor_codec.DTYPES``)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported compute dtype {dtype}; use one of {sorted(DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported compute dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class SpanConfig:
    """The part of a model's ``config.json`` a span needs: shapes, RoPE frequencies resolved, and
    the family switches of ``peer.families`` flattened (so the block reads plain fields).

    ``inv_freq`` and ``attention_scaling`` come from ``transformers``' own RoPE init functions
    (so linear / llama3 / yarn scaling match it exactly); keeping them as plain numbers makes the
    config self-contained and cheap to log or compare. ``local_inv_freq`` is the second table of
    models whose sliding layers rotate with another base (Gemma 3); ``layer_rope[i]`` picks one.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    rope_type: str
    inv_freq: tuple[float, ...]
    attention_scaling: float
    # ---- family switches (peer.families); the defaults are Llama ----
    norm: str = "rms"
    sandwich_norms: bool = False
    parallel: str = ""  # "" sequential | one_norm | two_norms (Falcon)
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qkv_layout: str = "separate"
    mlp: str = "gated"
    position: str = "rope"
    layer_windows: tuple[int, ...] = ()  # per model layer, 0 = full attention
    layer_rope: tuple[int, ...] = ()  # per model layer: 0 = inv_freq, 1 = local_inv_freq
    local_inv_freq: tuple[float, ...] = ()
    local_attention_scaling: float = 1.0
    attn_scale: float = 0.0  # 0: head_dim ** -0.5
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    embed_scale: float = 0.0
    embed_norm: bool = False
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_routing: str = "softmax"  # ROUTINGS, or grouped_sigmoid (DeepSeek-V3, peer.grouped_moe)
    moe_layers: tuple[bool, ...] = ()  # per model layer: MoE or dense MLP
    router_bias: bool = False  # gpt-oss
    expert_mlp: str = "gated"  # gated | clamped_swiglu (gpt-oss)
    swiglu_alpha: float = 0.0
    swiglu_limit: float = 0.0
    attn_sinks: bool = False  # gpt-oss: a learned per-head logit joins the softmax (peer.gpt_oss)
    # ---- DeepSeek-V3 / Kimi K2 (peer.grouped_moe, peer.mla) ----
    moe_groups: int = 1  # n_group: experts are chosen from the best topk_group groups
    moe_topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    shared_experts: int = 0  # n_shared_experts: one gated MLP of that many times the expert size
    attention: str = "mha"  # mha | mla (multi-head latent attention)
    q_lora_rank: int = 0  # 0: q_proj straight from the hidden state
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # DeepSeek's rotary pairs (x0, x1), (x2, x3), ...
    fp8_block: tuple[int, ...] = ()  # block-wise FP8 checkpoint's tile, dequantized at load (peer.fp8)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> SpanConfig:
        """Parse ``config.json`` through ``transformers.AutoConfig`` (legacy ``rope_scaling`` etc.)."""
        from transformers import AutoConfig

        config_path = Path(model_dir) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        model_type = json.loads(config_path.read_text()).get("model_type")
        family = family_of(model_type)  # refuse before parsing
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING and family.config_class:
            # Kimi K2: DeepSeek-V3's config under a model_type only its custom code knows
            import transformers

            return cls.from_hf(getattr(transformers, family.config_class).from_pretrained(str(model_dir)))
        return cls.from_hf(AutoConfig.from_pretrained(str(model_dir)))

    @classmethod
    def from_hf(cls, hf_config) -> SpanConfig:  # noqa: ANN001 - a transformers PreTrainedConfig
        """Map a ``transformers`` config of any family in ``peer.families`` onto the switches."""
        family = family_of(hf_config.model_type)
        check_supported(family, hf_config)
        fp8.check_quantization(hf_config)
        derived = family.derive(hf_config) if family.derive else {}
        heads = hf_config.num_attention_heads
        kv_heads = (
            derived.get("num_key_value_heads") or getattr(hf_config, "num_key_value_heads", None) or heads
        )
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        act = family.act or getattr(hf_config, family.act_field)
        if act not in _ACTIVATIONS:
            raise ValueError(
                f"config field {family.act_field}={act!r} is not supported: {sorted(_ACTIVATIONS)}"
            )
        layers = hf_config.num_hidden_layers
        windows = _layer_windows(family, hf_config, layers)
        types = list(getattr(hf_config, "layer_types", None) or ["full_attention"] * layers)
        inv_freq, scaling, local_inv, local_scaling = (), 1.0, (), 1.0
        rope_type, layer_rope = "none", (0,) * layers
        if family.position == "rope":
            params = dict(getattr(hf_config, "rope_parameters", None) or {})
            if set(params) & set(_LAYER_TYPES):  # one RoPE per layer type (Gemma 3)
                rope_type, inv, scaling = _rope_frequencies(hf_config, head_dim, "full_attention")
                _, local, local_scaling = _rope_frequencies(hf_config, head_dim, "sliding_attention")
                inv_freq, local_inv = tuple(float(x) for x in inv), tuple(float(x) for x in local)
                layer_rope = tuple(int(t == "sliding_attention") for t in types)
            else:
                rope_type, inv, scaling = _rope_frequencies(hf_config, head_dim)
                inv_freq = tuple(float(x) for x in inv)
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        num_experts = int(
            getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", 0) or 0
        )
        moe_layers: tuple[bool, ...] = ()
        if family.mlp == "moe":
            only_dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
            step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
            moe_layers = tuple(i not in only_dense and (i + 1) % step == 0 for i in range(layers))
        query_scalar = getattr(hf_config, "query_pre_attn_scalar", None)
        fields = dict(
            model_type=hf_config.model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=getattr(hf_config, "intermediate_size", 0) or 0,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(getattr(hf_config, family.eps_field)),
            hidden_act=act,
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", None) or 2048,
            attention_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            rope_type=rope_type,
            inv_freq=inv_freq,
            attention_scaling=float(scaling),
            norm=family.norm,
            sandwich_norms=family.sandwich_norms,
            parallel="",
            qk_norm=family.qk_norm,
            qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
            o_bias=attention_bias if family.o_bias is None else family.o_bias,
            qkv_layout=family.qkv_layout,
            mlp=family.mlp,
            position=family.position,
            layer_windows=windows,
            layer_rope=layer_rope,
            local_inv_freq=local_inv,
            local_attention_scaling=float(local_scaling),
            attn_scale=float(query_scalar) ** -0.5 if query_scalar else 0.0,
            attn_softcap=float(getattr(hf_config, "attn_logit_softcapping", None) or 0.0),
            final_softcap=float(getattr(hf_config, "final_logit_softcapping", None) or 0.0),
            embed_scale=float(hf_config.hidden_size**0.5) if family.embed_scale else 0.0,
            embed_norm=family.embed_norm,
            num_experts=num_experts if family.mlp == "moe" else 0,
            experts_per_tok=int(getattr(hf_config, "num_experts_per_tok", 0) or 0),
            moe_intermediate_size=int(
                getattr(hf_config, "moe_intermediate_size", None)
                or getattr(hf_config, "intermediate_size", 0)
            ),
            norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", True)),
            moe_routing=family.moe_routing,
            moe_layers=moe_layers,
            attention=family.attention,
            fp8_block=fp8.block_size(hf_config) or (),
        )
        # a family's own switches (gpt-oss's sinks, routing...) come from derive, defaults elsewhere
        fields.update({k: v for k, v in derived.items() if k in cls.__dataclass_fields__})
        return cls(**fields)

    def window(self, layer: int) -> int:
        """Sliding window of model layer ``layer`` (0: full attention)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def cache_geometry(self) -> tuple[int, int, int]:
        """``(heads, dim, parts)`` of a session's cache per layer and token: keys and values of the
        KV heads, or (MLA) one latent of ``kv_lora_rank + qk_rope_head_dim`` (``peer.mla``)."""
        if self.attention == "mla":
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, 1
        return self.num_key_value_heads, self.head_dim, 2


def _layer_windows(family: Family, hf_config, layers: int) -> tuple[int, ...]:  # noqa: ANN001
    """Per-layer sliding window from ``layer_types`` (Gemma, Qwen2/3) or one for all (Mistral)."""
    window = int(getattr(hf_config, "sliding_window", None) or 0)
    types = getattr(hf_config, "layer_types", None)
    if types:
        unknown = sorted(set(types) - set(_LAYER_TYPES))
        if unknown:
            raise ValueError(f"config field layer_types holds {unknown}, not supported: {list(_LAYER_TYPES)}")
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    if window and not family.window_all_layers:
        raise ValueError(f"config field sliding_window={window} is not supported for {hf_config.model_type}")
    return (window,) * layers


def _rope_frequencies(
    hf_config, head_dim: int, layer_type: str | None = None
) -> tuple[str, torch.Tensor, float]:  # noqa: ANN001
    """RoPE inverse frequencies and cos/sin scaling, via transformers' init functions when scaled."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params[layer_type])
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported by spans; supported: {STATIC_ROPE_TYPES}")
    factor = float(
        params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0)
    )
    if rope_type == "default":
        # transformers' default formula, written out: it lives on the model class, not in the table.
        dim = int(head_dim * factor)
        base = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return rope_type, inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return rope_type, inv_freq.float(), float(scaling)


# ---- building blocks ----------------------------------------------------------------------------
class GemmaRMSNorm(RMSNorm):
    """Gemma's: the weight is an offset from 1, and the product is taken in fp32 before the cast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(config: SpanConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm == "layer":
        return nn.LayerNorm(dim, eps=config.rms_norm_eps)
    if config.norm == "rms_fp32":
        return gpt_oss.RMSNormFp32Product(dim, config.rms_norm_eps)
    return (GemmaRMSNorm if config.norm == "rms_gemma" else RMSNorm)(dim, config.rms_norm_eps)


@dataclass
class _SessionSlice:
    """Where one session's tokens sit in the pack, and how its queries may look at its keys.

    ``views[window]`` is ``(base, mask, is_causal)`` for the layers of that window size: keys
    start at position ``base``; ``mask`` is bool ``[length, keys]`` (True = may attend) or None.
    """

    cache: KVCache
    offset: int
    length: int
    views: dict[int, tuple[int, torch.Tensor | None, bool]]
    first_layer: int = 0  # the span's layer index of the cache's layer 0 (a sub-span's cache starts later)


def _band_mask(past: int, n: int, base: int, window: int, device: torch.device) -> torch.Tensor:
    """Query ``past + i`` may see key ``base + j`` when it is not in its future nor past its window."""
    queries = torch.arange(past, past + n, device=device)[:, None]
    keys = torch.arange(base, past + n, device=device)[None, :]
    allowed = keys <= queries
    if window:
        allowed &= keys > queries - window
    return allowed


def _plan_attention(
    caches: Sequence[KVCache], lengths: Sequence[int], device: torch.device, first_layer: int = 0
) -> list[_SessionSlice]:
    """Per-session attention masks, computed once per step and shared by all layers.

    A prefill into an empty cache is plain causal. One new token sees the whole cache: no mask.
    A chunk of ``n > 1`` tokens after ``past`` cached ones needs the causal mask shifted right by
    ``past`` (SDPA's ``is_causal`` aligns top-left, which would hide most of the cache). Window
    layers add a band (``_band_mask``) when their keys reach past the window. Each cache is made
    room for (and its window layers trimmed) here, before any layer appends.
    """
    plan, offset = [], 0
    for cache, n in zip(caches, lengths, strict=True):
        past, views = cache.length, {}
        if n:
            cache.prepare(n)
        for layer in range(cache.num_layers):
            window, base = cache.store_of(layer)
            if window in views:
                continue
            mask, causal = None, False
            if n > 1 and past == 0 and base == 0 and (not window or n <= window):
                causal = True
            elif n > 1 or (window and past + 1 - base > window):
                mask = _band_mask(past, n, base, window, device)
            views[window] = (base, mask, causal)
        plan.append(_SessionSlice(cache, offset, n, views, first_layer))
        offset += n
    return plan


def _eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    softcap: float, bias: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """Attention written out, for what SDPA cannot add: soft-capping (Gemma 2), ALiBi (BLOOM).

    ``q`` ``[heads, n, dim]``, ``k``/``v`` ``[kv_heads, keys, dim]``; fp32 softmax like HF's eager.
    """
    if k.shape[0] != q.shape[0]:
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        v = v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    def __init__(self, config: SpanConfig, layer_idx: int, model_layer: int) -> None:
        super().__init__()
        # index inside the loaded span; inside a session's KVCache it is this minus the session's
        # first layer (`_SessionSlice.first_layer`: a sub-span's cache holds only its own layers)
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = config.attn_scale or config.head_dim**-0.5
        self.window = config.window(model_layer)
        self.softcap = config.attn_softcap
        self.rope_table = config.layer_rope[model_layer] if config.position == "rope" else -1
        hidden, bias = config.hidden_size, config.qkv_bias
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        if config.qkv_layout == "separate":
            self.q_proj = nn.Linear(hidden, q_dim, bias=bias)
            self.k_proj = nn.Linear(hidden, kv_dim, bias=bias)
            self.v_proj = nn.Linear(hidden, kv_dim, bias=bias)
        else:  # one matmul; stored layouts are permuted to [q | k | v] rows at load (peer.families)
            self.qkv_proj = nn.Linear(hidden, q_dim + 2 * kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)
        self.alibi = config.position == "alibi"
        if self.alibi:
            self.register_buffer("slopes", alibi_slopes(self.num_heads), persistent=False)
        if config.attn_sinks:
            self.sinks = nn.Parameter(torch.empty(self.num_heads))

    def forward(
        self, x: torch.Tensor, rope: list[tuple[torch.Tensor, torch.Tensor]], plan: list[_SessionSlice]
    ) -> torch.Tensor:
        tokens = x.shape[0]
        if hasattr(self, "qkv_proj"):
            q, k, v = linear(self.qkv_proj, x).split(self.split, dim=-1)
        else:
            q, k, v = linear(self.q_proj, x), linear(self.k_proj, x), linear(self.v_proj, x)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_table >= 0:
            cos, sin = rope[self.rope_table]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        sinks = getattr(self, "sinks", None)
        eager = self.alibi or bool(self.softcap) or sinks is not None
        out = torch.empty(tokens, self.num_heads, self.head_dim, dtype=x.dtype, device=x.device)
        for s in plan:
            if s.length == 0:
                continue
            rows = slice(s.offset, s.offset + s.length)
            layer = self.layer_idx - s.first_layer
            k_all, v_all = s.cache.append(layer, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            # the cache's window, not the config's: a session shorter than the window has none
            window = s.cache.store_of(layer)[0]
            base, mask, causal = s.views[window]
            if eager:
                past = s.cache.length
                # built once per step, then shared by the later layers; a decode step that sees
                # every key needs none (sink attention skips it; the other eager kinds do not)
                if mask is None and (causal or sinks is None):
                    mask = _band_mask(past, s.length, base, window, x.device)
                    s.views[window] = (base, mask, causal)
                if sinks is not None:
                    attn = gpt_oss.sink_attention(
                        q[rows].transpose(0, 1), k_all[0], v_all[0], mask, self.scaling, sinks
                    )
                    out[rows] = attn.transpose(0, 1)
                    continue
                bias = None
                if self.alibi:
                    positions = torch.arange(base, past + s.length, device=x.device, dtype=torch.float32)
                    bias = (self.slopes[:, None, None] * positions[None, None, :]).to(x.dtype)
                attn = _eager_attention(
                    q[rows].transpose(0, 1), k_all[0], v_all[0], mask, self.scaling, self.softcap, bias
                ).unsqueeze(0)
            else:
                attn = F.scaled_dot_product_attention(
                    q[rows].transpose(0, 1).unsqueeze(0),  # [1, heads, n, head_dim]
                    k_all,
                    v_all,
                    attn_mask=mask,
                    is_causal=causal,
                    scale=self.scaling,
                    enable_gqa=self.num_heads != self.num_kv_heads,
                )
            out[rows] = attn[0].transpose(0, 1)
        return linear(self.o_proj, out.view(tokens, -1))


class MLP(nn.Module):
    """Gated (``act(gate) * up``, Llama and most), fused gated (Phi-3) or plain (BLOOM, Falcon)."""

    def __init__(self, config: SpanConfig, inner: int | None = None, kind: str | None = None) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, inner or config.intermediate_size, config.mlp_bias
        self.kind = kind or config.mlp
        if self.kind == "gated":
            self.gate_proj = nn.Linear(hidden, inner, bias=bias)
            self.up_proj = nn.Linear(hidden, inner, bias=bias)
        elif self.kind == "gated_fused":
            self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=bias)
        else:
            self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            inner = self.act(linear(self.gate_proj, x)) * linear(self.up_proj, x)
        elif self.kind == "gated_fused":
            gate, up = linear(self.gate_up_proj, x).chunk(2, dim=-1)
            inner = up * self.act(gate)
        else:
            inner = self.act(linear(self.up_proj, x))
        return linear(self.down_proj, inner)


class Router(nn.Module):
    """Expert scores; a plain parameter, not an ``nn.Linear``, so quantization leaves routing exact."""

    def __init__(self, hidden: int, experts: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.bias = nn.Parameter(torch.empty(experts)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def route_softmax(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen3-MoE: softmax over all experts in fp32, top-k, renormalised if asked."""
    weights, chosen = torch.topk(F.softmax(logits.float(), dim=-1), top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen


# SpanConfig.moe_routing -> (router logits [T, E], k, norm_topk_prob) -> (weights [T, k], experts [T, k])
ROUTINGS = {
    "softmax": route_softmax,
    "topk_softmax": gpt_oss.route_topk_softmax,
}


class MoE(nn.Module):
    """Top-k mixture of experts (Mixtral, Qwen3-MoE, DeepSeek-V3) that batches: the pack's rows are
    grouped by expert, so each expert chosen by any row multiplies all its rows in one matmul per
    pass.

    Routing is ``ROUTINGS[config.moe_routing]``, each following transformers for its family, or
    ``grouped_sigmoid`` (DeepSeek-V3, ``peer.grouped_moe``), whose router also holds the selection
    bias and groups. Shared experts (DeepSeek) see every row and are added after the routed ones.
    Experts are plain ``MLP``s (gpt-oss: ``peer.gpt_oss.ClampedSwiGLU``) of ``nn.Linear``, so
    they quantize like any Linear.
    """

    def __init__(self, config: SpanConfig) -> None:
        super().__init__()
        if config.moe_routing not in (*ROUTINGS, "grouped_sigmoid"):
            known = sorted((*ROUTINGS, "grouped_sigmoid"))
            raise ValueError(f"unknown MoE routing {config.moe_routing!r}; known: {known}")
        self.top_k = config.experts_per_tok
        self.normalize = config.norm_topk_prob
        if config.moe_routing == "grouped_sigmoid":  # the router holds the bias and the groups
            self.router: nn.Module = grouped_moe.GroupedRouter(
                config.hidden_size, config.num_experts, config.moe_groups, config.moe_topk_groups,
                config.routed_scaling_factor,
            )  # fmt: skip
            self.route = self.router.route
        else:
            self.route = ROUTINGS[config.moe_routing]
            self.router = Router(config.hidden_size, config.num_experts, bias=config.router_bias)
        inner = config.moe_intermediate_size
        if config.expert_mlp == "clamped_swiglu":
            alpha, limit = config.swiglu_alpha, config.swiglu_limit
            experts = (
                gpt_oss.ClampedSwiGLU(config.hidden_size, inner, alpha, limit)
                for _ in range(config.num_experts)
            )
        else:
            experts = (MLP(config, inner, "gated") for _ in range(config.num_experts))
        self.experts = nn.ModuleList(experts)
        self.shared_experts = (
            MLP(config, inner * config.shared_experts, "gated") if config.shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(self.router(x), self.top_k, self.normalize)  # [T, k]
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one sync per layer
        rows = order // self.top_k  # token of each (token, slot) pair, grouped by expert
        scale = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                picked = rows[start : start + count]
                y = expert(x[picked]) * scale[start : start + count, None]
                out.index_add_(0, picked, y.to(x.dtype))
                start += count
        if self.shared_experts is not None:  # DeepSeek: every row, after the routed experts
            out = out + self.shared_experts(x)
        return out


def _attention(config: SpanConfig, layer_idx: int, model_layer: int) -> nn.Module:
    """The family's attention kind: multi-head (GQA, MQA) or DeepSeek's latent one (``peer.mla``)."""
    if config.attention == "mla":
        return mla.LatentAttention(config, layer_idx)
    return Attention(config, layer_idx, model_layer)


class Block(nn.Module):
    """One decoder layer: pre-norm (Llama), sandwich norms (Gemma) or parallel (Falcon)."""

    def __init__(self, config: SpanConfig, layer_idx: int, model_layer: int | None = None) -> None:
        super().__init__()
        model_layer = layer_idx if model_layer is None else model_layer
        self.parallel, self.sandwich = config.parallel, config.sandwich_norms
        self.input_layernorm = make_norm(config)
        self.self_attn = _attention(config, layer_idx, model_layer)
        if self.parallel == "two_norms":
            self.mlp_layernorm = make_norm(config)
        elif not self.parallel:
            self.post_attention_layernorm = make_norm(config)
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)
        moe = config.mlp == "moe" and config.moe_layers[model_layer]
        self.mlp = MoE(config) if moe else MLP(config, kind="gated" if config.mlp == "moe" else None)

    def forward(
        self, x: torch.Tensor, rope: list[tuple[torch.Tensor, torch.Tensor]], plan: list[_SessionSlice]
    ) -> torch.Tensor:
        if self.parallel:
            normed = self.input_layernorm(x)
            mlp_in = self.mlp_layernorm(x) if self.parallel == "two_norms" else normed
            return x + (self.mlp(mlp_in) + self.self_attn(normed, rope, plan))
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, plan))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), rope, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


def block_bytes(config: SpanConfig, bytes_per_weight: float) -> int:
    """Weight bytes of the model's largest block at `bytes_per_weight` (4 fp32, 2 bf16/fp16, 1 int8,
    0.5 nf4): what a peer that picks its own blocks plans its memory with (`peer.block_selection`).

    The block is built from the family table on the meta device (no memory, no weights read) and
    its parameters counted, so every family's shape is in it: latent attention's low-rank
    projections, fused qkv, biases, sinks, and every expert (a token uses a few, but the peer holds
    them all; counting one would start a peer with more blocks than fit). Layers differ only in
    being dense or MoE (DeepSeek's first layers are dense), so one layer of each kind is built."""
    flags = config.moe_layers or (False,)
    largest = 0
    for moe in set(flags):
        with torch.device("meta"):
            block = Block(config, 0, flags.index(moe))
        largest = max(largest, sum(p.numel() for p in block.parameters()))
    return int(largest * bytes_per_weight)


# ---- the span -----------------------------------------------------------------------------------
def _read_part(
    model_dir: Path, index: dict[str, str], names: dict[str, str], dtype: torch.dtype, device: torch.device,
    fp8_block: tuple[int, int] | None, fp32_parts: tuple[str, ...],
) -> dict[str, torch.Tensor]:  # fmt: skip
    """One block's tensors in ``dtype`` on ``device``. Block-wise FP8 weights are dequantized on the
    CPU in float32 first (``peer.fp8``), and a family's ``fp32_parts`` (DeepSeek's router, kept in
    fp32 by transformers too) stay float32 whatever the compute dtype."""
    if fp8_block is None and not fp32_parts:
        return read_tensors(model_dir, index, names, dtype=dtype, device=device)
    state = read_tensors(model_dir, index, names, dtype=torch.float32, device="cpu")
    if fp8_block is not None:
        state = fp8.dequantize_state(state, fp8_block)
    return {
        name: tensor.to(device=device, dtype=torch.float32 if name.endswith(fp32_parts) else dtype)
        if tensor.is_floating_point()
        else tensor.to(device)
        for name, tensor in state.items()
    }


class BlockSpan(nn.Module):
    """Blocks ``[start, end)``; plus the embedding when first, the final norm and LM head when last.

    Concurrency: the span holds weights only, no per-session state, so it may serve any number of
    sessions; each ``KVCache`` must be in at most one ``forward`` at a time (the scheduler's job).
    """

    def __init__(self, config: SpanConfig, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(
                f"span [{start}, {end}) is not inside a model of {config.num_hidden_layers} blocks"
            )
        self.config, self.start, self.end = config, start, end
        self.is_first, self.is_last = start == 0, end == config.num_hidden_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            if config.embed_norm:
                self.embed_norm = make_norm(config)
        self.layers = nn.ModuleList(Block(config, i, start + i) for i in range(end - start))
        if self.is_last:
            self.norm = make_norm(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.tensor(config.inv_freq, dtype=torch.float32), persistent=False)
        self.register_buffer(
            "local_inv_freq", torch.tensor(config.local_inv_freq, dtype=torch.float32), persistent=False
        )
        self.quant = "none"  # set by load(); see peer.quant

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str],
        start: int,
        end: int,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        quant: str = "none",
        prepack: bool = False,
        calibrate: bool = True,
    ) -> BlockSpan:
        """Load only this span's tensors from ``model_dir`` (a folder, or a hub id when online).

        ``quant`` (``none``, ``int8``, ``nf4``; see ``peer.quant``) quantizes the Linear layers of
        each block right after that block is read, so peak memory holds one block in full
        precision, never the whole span. Unsupported combinations raise ``ValueError`` before any
        tensor is read. ``prepack`` keeps a oneDNN-packed second copy of fp32 CPU weights for
        batched passes where it is faster (see ``peer.gemm``). ``calibrate=False`` leaves the
        matmul plans to the caller (``gemm.calibrate``; the peer first decides whether to pack).
        """
        dtype, device = parse_dtype(dtype), torch.device(device)
        quantization.validate(quant, device, dtype)
        model_dir = resolve_model_dir(model_dir)
        config = SpanConfig.from_model_dir(model_dir)
        # Validate before reading any tensor, so a bad request costs nothing.
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(
                f"span [{start}, {end}) is not inside a model of {config.num_hidden_layers} blocks"
            )
        index = tensor_index(model_dir)
        names = family_of(config.model_type).names
        wanted = span_tensor_names(
            index, config.num_hidden_layers, start, end, tie_word_embeddings=config.tie_word_embeddings,
            names=names,
        )  # fmt: skip
        convert_block = family_of(config.model_type).convert_block
        qkv_order = fused_qkv_order(
            config.qkv_layout, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        # Build on the meta device so no throwaway random weights are allocated, then adopt the
        # loaded tensors as the parameters (assign=True) instead of copying into them.
        with torch.device("meta"):
            span = cls(config, start, end)
        # CUDA quantizers take CPU weights and quantize on the way to the GPU.
        read_device = torch.device("cpu") if quant != "none" else device
        groups: list[tuple[str | None, dict[str, str]]] = [
            (None, {k: v for k, v in wanted.items() if not k.startswith("layers.")})
        ]
        groups += [
            (f"layers.{i}", {k: v for k, v in wanted.items() if k.startswith(f"layers.{i}.")})
            for i in range(end - start)
        ]
        # A bar on a terminal only: logs and tests get no carriage-return noise.
        bar = tqdm(
            groups, desc=f"loading blocks [{start}, {end})", unit="part", disable=not sys.stderr.isatty()
        )
        family = family_of(config.model_type)
        fp8_block = tuple(config.fp8_block) or None  # type: ignore[assignment]
        for prefix, names in bar:
            state = _read_part(model_dir, index, names, dtype, read_device, fp8_block, family.fp32_parts)
            if prefix is None:  # embedding / final norm / head, read first while no block is quantized
                result = span.load_state_dict(state, strict=False, assign=True)
                if result.unexpected_keys:
                    raise ValueError(
                        f"unexpected tensors for span [{start}, {end}): {result.unexpected_keys[:5]}"
                    )
                continue
            block = span.layers[int(prefix.split(".")[1])]
            state = {name.removeprefix(prefix + "."): tensor for name, tensor in state.items()}
            if convert_block is not None:  # gpt-oss: MXFP4 and stacked experts -> per-expert Linears
                state = convert_block(state, dtype)
            if qkv_order is not None:  # BLOOM / Falcon per-head layouts -> [q | k | v] rows
                for part in ("weight", "bias"):
                    if f"self_attn.qkv_proj.{part}" in state:
                        state[f"self_attn.qkv_proj.{part}"] = state[f"self_attn.qkv_proj.{part}"][qkv_order]
            block.load_state_dict(
                state,
                strict=True,
                assign=True,
            )
            del state
            quantization.quantize_linears(block, quant, device, dtype)
            block.to(device)
        if span.is_last:
            span.lm_head = quantization.quantize_linears(span.lm_head, quant, device, dtype)
        span.inv_freq = torch.tensor(config.inv_freq, dtype=torch.float32, device=device)
        span.local_inv_freq = torch.tensor(config.local_inv_freq, dtype=torch.float32, device=device)
        for layer in span.layers:
            if layer.self_attn.alibi:
                layer.self_attn.slopes = alibi_slopes(config.num_attention_heads).to(device)
        missing = [name for name, tensor in span.state_dict().items() if getattr(tensor, "is_meta", False)]
        if missing:
            raise ValueError(f"checkpoint left tensors of span [{start}, {end}) unloaded: {missing[:5]}")
        span.to(device)
        span.quant = quant
        span = span.eval().requires_grad_(False)
        if calibrate:
            gemm.calibrate(span.modules(), prepack=prepack)  # how to multiply small batches (peer.gemm)
        return span

    def narrow(self, start: int, end: int) -> BlockSpan:
        """Blocks ``[start, end)`` of this span as a span of their own, sharing its modules (no
        weight is copied): what a session of a sub-span runs (docs/self-organizing.md, "Sub-spans").
        It owns the embedding only when it starts the model and the final norm and LM head only
        when it ends it, like a span loaded for those blocks. ValueError outside this span."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"[{start}, {end}) is not a non-empty part of span [{self.start}, {self.end})")
        if (start, end) == (self.start, self.end):
            return self
        view = BlockSpan.__new__(BlockSpan)
        nn.Module.__init__(view)
        view.config, view.start, view.end = self.config, start, end
        view.is_first, view.is_last = start == 0, end == self.config.num_hidden_layers
        if view.is_first:  # start == 0, so this span starts the model too
            view.embed_tokens = self.embed_tokens
            if self.config.embed_norm:
                view.embed_norm = self.embed_norm
        view.layers = nn.ModuleList(self.layers[start - self.start : end - self.start])
        if view.is_last:
            view.norm, view.lm_head = self.norm, self.lm_head
        view.register_buffer("inv_freq", self.inv_freq, persistent=False)
        view.register_buffer("local_inv_freq", self.local_inv_freq, persistent=False)
        view.quant = self.quant
        return view.eval()

    def weight_bytes(self) -> dict[str, int]:
        """Resident weight bytes: ``{"per_block": mean over blocks, "blocks": sum, "total": all}``.

        Counts parameters and buffers, including packed quantized weights and their scales (see
        ``peer.quant.resident_bytes``); the embedding / LM head show up in ``total`` only.
        """
        blocks = [quantization.resident_bytes(layer) for layer in self.layers]
        return {
            "per_block": sum(blocks) // len(blocks),
            "blocks": sum(blocks),
            "total": quantization.resident_bytes(self),
        }

    # ---- properties the server uses ----
    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    def new_cache(
        self, capacity: int = 16, max_capacity: int | None = None, unit_layers: int | None = None
    ) -> KVCache:
        """An empty cache for one session, in the span's dtype and device (`unit_layers`: see
        `KVCache`)."""
        heads, head_dim, parts = self.config.cache_geometry
        windows = tuple(self.config.window(layer) for layer in range(self.start, self.end))
        return KVCache(
            self.num_layers, heads, head_dim, self.dtype, self.device, capacity, max_capacity, windows,
            parts, unit_layers,
        )  # fmt: skip

    # ---- compute ----
    @torch.no_grad()
    def forward(
        self, inputs: torch.Tensor, caches: Sequence[KVCache], lengths: Sequence[int]
    ) -> torch.Tensor:
        """Run one packed step; see docs/ARCHITECTURE.md for the contract.

        ``inputs`` is ``[T]`` int64 token ids on the first span, else ``[T, hidden]`` states (any
        float dtype; cast to the span's). ``lengths[i]`` consecutive tokens belong to ``caches[i]``
        and sit at positions ``caches[i].length + arange(lengths[i])``. Caches are extended in
        place, and only after every layer succeeded. Returns ``[T, hidden]`` in the span's dtype,
        after the final norm when last.
        """
        self._check_step(inputs, caches, lengths)
        device = self.device
        if self.is_first:
            x = self.embed_tokens(inputs.to(device=device, dtype=torch.long))
            if self.config.embed_scale:  # Gemma: the scale is cast to the weights' dtype first
                x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype, device=device)
            if self.config.embed_norm:
                x = self.embed_norm(x)
        else:
            x = inputs.to(device=device, dtype=self.dtype)
        positions = torch.cat(
            [torch.arange(c.length, c.length + n) for c, n in zip(caches, lengths, strict=True)]
        ).to(device)
        rope = []
        if self.config.position == "rope":
            rope.append(self._rotary(positions, x.dtype, self.inv_freq, self.config.attention_scaling))
            if self.config.local_inv_freq:
                scale = self.config.local_attention_scaling
                rope.append(self._rotary(positions, x.dtype, self.local_inv_freq, scale))
        # a narrowed span's first block is not its cache's layer 0 in the loaded span (`narrow`)
        plan = _plan_attention(caches, lengths, device, self.layers[0].self_attn.layer_idx)
        for layer in self.layers:
            x = layer(x, rope, plan)
        for cache, n in zip(caches, lengths, strict=True):
            cache.commit(n)
        if self.is_last:
            x = self.norm(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on (already normed) hidden states; float32 like HF ``generate`` uses them."""
        if not self.is_last:
            raise ValueError(f"span [{self.start}, {self.end}) does not own the LM head")
        with torch.no_grad():
            logits = linear(self.lm_head, hidden.to(device=self.device, dtype=self.dtype))
            if self.config.final_softcap:  # Gemma 2, in the compute dtype as transformers does
                cap = self.config.final_softcap
                logits = torch.tanh(logits / cap) * cap
            return logits.float()

    @staticmethod
    def _rotary(
        positions: torch.Tensor, dtype: torch.dtype, inv_freq: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin per token, computed in fp32 exactly as HF does, then cast to the compute dtype."""
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def _check_step(self, inputs: torch.Tensor, caches: Sequence[KVCache], lengths: Sequence[int]) -> None:
        """Refuse a pack that would corrupt a cache or read out of bounds (ValueError).

        Steps from the network are validated once, by ``peer.servicer`` (token ids, positions,
        hidden shapes, max_length), which answers INVALID_ARGUMENT for that session alone. What is
        checked again here guards memory, so a caller's bug fails loudly instead of silently:
        the pack's layout decides which rows each cache commits, so lengths that do not add up to
        the rows, or a cache packed twice, would commit slots that were never written (and later
        attend to them as keys); a cache of another span is written with the wrong geometry; and
        a token id outside the vocabulary is an out-of-bounds gather in the embedding (a
        device-side assert on CUDA, which poisons the process for every session). These cost a
        few Python comparisons per session and one min/max over the step's token ids.
        """
        if len(caches) != len(lengths) or not caches:
            raise ValueError(
                f"need one length per cache, got {len(caches)} caches and {len(lengths)} lengths"
            )
        if any(int(n) < 0 for n in lengths):
            raise ValueError(f"lengths must be >= 0, got {list(lengths)}")
        total = sum(int(n) for n in lengths)
        if self.is_first:
            if inputs.dim() != 1 or inputs.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"first span takes [T] integer token ids, got {inputs.dtype} {tuple(inputs.shape)}"
                )
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.config.vocab_size):
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        elif (
            inputs.dim() != 2 or inputs.shape[1] != self.config.hidden_size or not inputs.is_floating_point()
        ):
            raise ValueError(
                f"span takes [T, {self.config.hidden_size}] float hidden states, got {inputs.dtype} {tuple(inputs.shape)}"
            )
        if inputs.shape[0] != total:
            raise ValueError(f"inputs hold {inputs.shape[0]} tokens but lengths sum to {total}")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one step")
        expected = (self.num_layers, *self.config.cache_geometry, self.dtype)
        for cache in caches:
            if (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.parts, cache.dtype) != expected:
                raise ValueError(f"{cache!r} does not belong to span [{self.start}, {self.end})")


def last_token_rows(lengths: Sequence[int]) -> torch.Tensor:
    """Row of each session's last token in a packed step (sessions with 0 tokens get -1)."""
    ends = torch.tensor([int(n) for n in lengths], dtype=torch.long).cumsum(0) - 1
    return torch.where(torch.tensor([int(n) > 0 for n in lengths]), ends, torch.full_like(ends, -1))

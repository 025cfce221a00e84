"""Model families as table entries: how each Hugging Face config maps onto the one block.

What differs between Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, Falcon, BLOOM, Mixtral and
Qwen3-MoE is a short list of switches (gpt-fast's ``ModelArgs`` and llama.cpp's architecture ->
tensor-name tables are the model): the norm (RMSNorm, Gemma's ``1 + weight``, LayerNorm) and where
it sits (pre-norm, Gemma's pre/post "sandwich", Falcon's parallel attention + MLP), q/k norms,
attention biases, fused ``qkv`` / ``gate_up`` projections, the MLP kind (gated, plain, mixture of
experts), the position encoding (RoPE, partial RoPE, per-layer-type RoPE, ALiBi), the attention
window per layer, soft-capping, embedding scaling, and the checkpoint's tensor names. A
``Family`` holds the switches that are fixed for a family; ``derive`` reads the ones that depend
on the config (Falcon's layouts); ``refuse`` names every config field whose value we do not
implement, so a peer stops at start with a one-line error instead of drifting silently.

``peer.model.SpanConfig.from_hf`` turns (family, HF config) into the flat switches the block
reads. Tensors are renamed at load time to the block's module names (Llama's), and fused
``query_key_value`` matrices stored per head (BLOOM, Falcon) are permuted into ``[q | k | v]``
rows once, so the block has one fused layout to split at run time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from peer import gpt_oss


@dataclass(frozen=True)
class CheckpointNames:
    """Where a family's tensors live: ``{prefix}{layers}.N.<part>``, renamed to the block's parts."""

    prefix: str = "model."
    layers: str = "layers"
    embed: str = "embed_tokens"
    norm: str = "norm"
    embed_norm: str | None = None  # a norm right after the embedding (BLOOM)
    renames: tuple[tuple[str, str], ...] = ()  # (regex on the part, replacement), applied in order

    def rename(self, part: str) -> str:
        for pattern, replacement in self.renames:
            part = re.sub(pattern, replacement, part)
        return part


LLAMA_NAMES = CheckpointNames()
_TRANSFORMER_NAMES = dict(
    prefix="transformer.",
    layers="h",
    embed="word_embeddings",
    norm="ln_f",
)
_FUSED_RENAMES = (
    (r"^self_attention\.query_key_value\.", "self_attn.qkv_proj."),
    (r"^self_attention\.dense\.", "self_attn.o_proj."),
    (r"^mlp\.dense_h_to_4h\.", "mlp.up_proj."),
    (r"^mlp\.dense_4h_to_h\.", "mlp.down_proj."),
)


@dataclass(frozen=True)
class Refusal:
    """A config field we do not implement: refused when ``ok(value)`` is false."""

    field: str
    ok: Callable[[Any], bool]
    why: str


@dataclass(frozen=True)
class Family:
    norm: str = "rms"  # rms | rms_gemma (1 + weight, product in fp32) | layer (LayerNorm + bias)
    eps_field: str = "rms_norm_eps"
    act_field: str = "hidden_act"
    act: str | None = None  # fixed activation when the config has no field for it
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and MLP too
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
    qkv_bias: bool | None = None  # None: config.attention_bias
    o_bias: bool | None = None  # None: config.attention_bias
    qkv_layout: str = "separate"  # separate | fused ([q | k | v] rows) | per_head | kv_groups
    mlp: str = "gated"  # gated | gated_fused | plain | moe
    moe_names: str = "qwen"  # qwen: mlp.gate / mlp.experts.E.*_proj ; mixtral: block_sparse_moe.*
    moe_routing: str = "softmax"  # softmax top-k | grouped_sigmoid (DeepSeek-V3, peer.grouped_moe)
    attention: str = "mha"  # mha (multi-head, GQA, MQA) | mla (DeepSeek's latent attention, peer.mla)
    fp32_parts: tuple[str, ...] = ()  # tensors kept in fp32 whatever the compute dtype (routers)
    position: str = "rope"  # rope | alibi
    window_all_layers: bool = False  # config.sliding_window applies to every layer (no layer_types)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    embed_norm: bool = False  # BLOOM: LayerNorm after the embedding
    names: CheckpointNames = LLAMA_NAMES
    refuse: tuple[Refusal, ...] = ()
    derive: Callable[[Any], dict[str, Any]] | None = None
    # quantization_config methods whose checkpoints we read (dequantized at load); any other is refused
    shipped_quant: tuple[str, ...] = ()
    # one block's renamed checkpoint tensors -> the block's layout (gpt-oss's stacked experts)
    convert_block: Callable[[dict[str, torch.Tensor], torch.dtype], dict[str, torch.Tensor]] | None = None
    hf_class: str = ""  # transformers' class, named in docs and tests
    # transformers' config class, for folders whose model_type transformers does not know (Kimi K2)
    config_class: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _is_false(value: Any) -> bool:
    return not value


def _is_none(value: Any) -> bool:
    return value is None


_NO_BIDIRECTIONAL = Refusal("use_bidirectional_attention", _is_false, "bidirectional attention")


def _falcon(hf: Any) -> dict[str, Any]:
    heads = hf.num_attention_heads
    if hf.new_decoder_architecture:
        kv_heads, layout = hf.num_kv_heads, "kv_groups"
        parallel = "two_norms" if (hf.num_ln_in_parallel_attn or 2) == 2 else "one_norm"
    else:
        kv_heads = 1 if hf.multi_query else heads
        layout = "fused" if hf.multi_query else "per_head"
        parallel = "one_norm" if hf.parallel_attn else ""
    return {
        "num_key_value_heads": kv_heads,
        "qkv_layout": layout,
        "parallel": parallel,
        "intermediate_size": hf.ffn_hidden_size or 4 * hf.hidden_size,
        "qkv_bias": bool(hf.bias),
        "o_bias": bool(hf.bias),
        "mlp_bias": bool(hf.bias),
    }


def _bloom(hf: Any) -> dict[str, Any]:
    return {"intermediate_size": 4 * hf.hidden_size, "qkv_bias": True, "o_bias": True, "mlp_bias": True}


def _deepseek_v3(hf: Any) -> dict[str, Any]:
    """DeepSeek-V3 / R1 / Kimi K2: latent attention, grouped sigmoid routing, shared experts.

    The softmax scale is ``qk_head_dim ** -0.5`` times DeepSeek's YaRN ``mscale(factor,
    mscale_all_dim) ** 2`` when RoPE is scaled (transformers' ``yarn_apply_mscale``); cos/sin carry
    the other YaRN factor (``attention_factor``), from transformers' own YaRN init.
    """
    heads = hf.num_attention_heads
    if (hf.num_key_value_heads or heads) != heads:
        raise ValueError(
            f"config field num_key_value_heads={hf.num_key_value_heads} is not supported for deepseek_v3 "
            f"(latent attention expands to num_attention_heads={heads})"
        )
    if hf.n_routed_experts and hf.n_routed_experts % (hf.n_group or 1):
        raise ValueError(
            f"config field n_group={hf.n_group} does not divide n_routed_experts={hf.n_routed_experts}"
        )
    qk_head_dim = hf.qk_nope_head_dim + hf.qk_rope_head_dim
    scale = qk_head_dim**-0.5
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = float(rope["factor"])
        mscale = 0.1 * float(rope["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale = scale * mscale * mscale
    dense = int(hf.first_k_dense_replace or 0)
    return {
        "num_key_value_heads": heads,
        "attn_scale": scale,
        "moe_layers": tuple(bool(hf.n_routed_experts) and i >= dense for i in range(hf.num_hidden_layers)),
        "moe_groups": int(hf.n_group or 1),
        "moe_topk_groups": int(hf.topk_group or 1),
        "routed_scaling_factor": float(hf.routed_scaling_factor),
        "shared_experts": int(hf.n_shared_experts or 0),
        "q_lora_rank": int(hf.q_lora_rank or 0),
        "kv_lora_rank": int(hf.kv_lora_rank),
        "qk_nope_head_dim": int(hf.qk_nope_head_dim),
        "qk_rope_head_dim": int(hf.qk_rope_head_dim),
        "v_head_dim": int(hf.v_head_dim),
        "rope_interleave": bool(hf.rope_interleave),
    }


_MIXTRAL_RENAMES = (
    (r"^block_sparse_moe\.gate\.", "mlp.router."),
    (r"^block_sparse_moe\.experts\.(\d+)\.w1\.", r"mlp.experts.\1.gate_proj."),
    (r"^block_sparse_moe\.experts\.(\d+)\.w3\.", r"mlp.experts.\1.up_proj."),
    (r"^block_sparse_moe\.experts\.(\d+)\.w2\.", r"mlp.experts.\1.down_proj."),
)
_QWEN_MOE_RENAMES = ((r"^mlp\.gate\.", "mlp.router."),)


def _gpt_oss(hf: Any) -> dict[str, Any]:
    return {
        "attn_sinks": True,
        "router_bias": True,
        "moe_routing": "topk_softmax",
        "expert_mlp": "clamped_swiglu",
        "swiglu_alpha": float(hf.swiglu_alpha),
        "swiglu_limit": float(hf.swiglu_limit),
    }


FAMILIES: dict[str, Family] = {
    "llama": Family(hf_class="LlamaForCausalLM"),
    "mistral": Family(window_all_layers=True, qkv_bias=False, o_bias=False, hf_class="MistralForCausalLM"),
    "qwen2": Family(qkv_bias=True, o_bias=False, hf_class="Qwen2ForCausalLM"),
    "qwen3": Family(qk_norm=True, hf_class="Qwen3ForCausalLM"),
    "gemma2": Family(
        norm="rms_gemma",
        act_field="hidden_activation",
        sandwich_norms=True,
        embed_scale=True,
        refuse=(_NO_BIDIRECTIONAL,),
        hf_class="Gemma2ForCausalLM",
    ),
    "gemma3_text": Family(
        norm="rms_gemma",
        act_field="hidden_activation",
        sandwich_norms=True,
        qk_norm=True,
        embed_scale=True,
        refuse=(_NO_BIDIRECTIONAL,),
        hf_class="Gemma3ForCausalLM",
    ),
    "phi3": Family(
        qkv_bias=False,
        o_bias=False,
        qkv_layout="fused",
        mlp="gated_fused",
        window_all_layers=True,
        hf_class="Phi3ForCausalLM",
    ),  # fmt: skip
    "falcon": Family(
        norm="layer",
        eps_field="layer_norm_epsilon",
        act_field="activation",
        mlp="plain",
        names=CheckpointNames(
            **_TRANSFORMER_NAMES,
            renames=(
                *_FUSED_RENAMES,
                (r"^ln_attn\.", "input_layernorm."),
                (r"^ln_mlp\.", "mlp_layernorm."),
            ),
        ),  # fmt: skip
        refuse=(Refusal("alibi", _is_false, "ALiBi on Falcon (falcon-rw)"),),
        derive=_falcon,
        hf_class="FalconForCausalLM",
    ),
    "bloom": Family(
        norm="layer",
        eps_field="layer_norm_epsilon",
        act_field="",
        act="bloom_gelu",
        qkv_layout="per_head",
        mlp="plain",
        position="alibi",
        embed_norm=True,
        names=CheckpointNames(
            **_TRANSFORMER_NAMES, embed_norm="word_embeddings_layernorm", renames=_FUSED_RENAMES
        ),
        refuse=(Refusal("apply_residual_connection_post_layernorm", _is_false, "residual after the norm"),),
        derive=_bloom,
        hf_class="BloomForCausalLM",
    ),
    "mixtral": Family(
        mlp="moe",
        window_all_layers=True,
        qkv_bias=False,
        o_bias=False,
        names=CheckpointNames(renames=_MIXTRAL_RENAMES),
        hf_class="MixtralForCausalLM",
    ),  # fmt: skip
    "qwen3_moe": Family(
        qk_norm=True,
        mlp="moe",
        window_all_layers=True,
        names=CheckpointNames(renames=_QWEN_MOE_RENAMES),
        hf_class="Qwen3MoeForCausalLM",
    ),  # fmt: skip
    "gpt_oss": Family(
        norm="rms_fp32",
        mlp="moe",
        shipped_quant=("mxfp4",),
        derive=_gpt_oss,
        convert_block=gpt_oss.convert_block,
        hf_class="GptOssForCausalLM",
    ),
    "deepseek_v3": Family(  # also Kimi K2
        mlp="moe",
        moe_routing="grouped_sigmoid",
        attention="mla",
        qkv_bias=None,  # attention_bias: q_a_proj, kv_a_proj_with_mqa
        o_bias=None,
        fp32_parts=("mlp.router.weight", "mlp.router.e_score_correction_bias"),
        names=CheckpointNames(renames=_QWEN_MOE_RENAMES),
        refuse=(
            Refusal("scoring_func", lambda v: v in (None, "sigmoid"), "expert scores other than sigmoid"),
            Refusal("topk_method", lambda v: v in (None, "noaux_tc"), "routing other than noaux_tc"),
            Refusal("moe_layer_freq", lambda v: v in (None, 1), "MoE on every k-th layer"),
        ),
        shipped_quant=("fp8",),  # block-wise FP8, dequantized at load (peer.fp8)
        derive=_deepseek_v3,
        hf_class="DeepseekV3ForCausalLM",
        config_class="DeepseekV3Config",
    ),
}
# Kimi K2 ships DeepSeek-V3's architecture under its own model_type (with custom code we do not run)
FAMILIES["kimi_k2"] = FAMILIES["deepseek_v3"]
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    return FAMILIES[model_type]


def check_supported(family: Family, hf: Any) -> None:
    """Raise ``ValueError`` naming the first config field whose value the block does not implement.

    A ``quantization_config`` is refused unless the family reads that method's shipped format
    (``Family.shipped_quant``, gpt-oss's MXFP4): read as plain weights, a GPTQ/AWQ/FP8/bitsandbytes
    checkpoint would load garbage or fail deep in the loader instead of saying why.
    """
    quant_config = getattr(hf, "quantization_config", None)
    if quant_config:
        method = (
            quant_config.get("quant_method")
            if isinstance(quant_config, dict)
            else getattr(quant_config, "quant_method", None)
        )
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
        if method not in family.shipped_quant:
            supported = ", ".join(family.shipped_quant) or "none"
            raise ValueError(
                f"config field quantization_config (quant_method={method!r}) is not supported for "
                f"{hf.model_type} (checkpoint formats read: {supported})"
            )
    for refusal in family.refuse:
        value = getattr(hf, refusal.field, None)
        if not refusal.ok(value):
            raise ValueError(
                f"config field {refusal.field}={value!r} is not supported for {hf.model_type} ({refusal.why})"
            )


def fused_qkv_order(layout: str, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """Row permutation taking a stored fused ``qkv`` matrix to ``[q heads | k heads | v heads]``.

    ``per_head``: rows are ``[head, (q, k, v), dim]`` (BLOOM, Falcon without multi-query).
    ``kv_groups``: rows are ``[kv group, (q of the group..., k, v), dim]`` (Falcon 40B/180B).
    """
    if layout in ("separate", "fused"):
        return None
    if layout == "per_head":
        rows = torch.arange(3 * heads * head_dim).view(heads, 3, head_dim)
        return torch.cat([rows[:, 0].reshape(-1), rows[:, 1].reshape(-1), rows[:, 2].reshape(-1)])
    if layout == "kv_groups":
        per = heads // kv_heads
        rows = torch.arange((heads + 2 * kv_heads) * head_dim).view(kv_heads, per + 2, head_dim)
        return torch.cat([rows[:, :per].reshape(-1), rows[:, per].reshape(-1), rows[:, per + 1].reshape(-1)])
    raise ValueError(f"unknown qkv layout {layout!r}")


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.), the geometric series BLOOM uses, in fp32 on the CPU."""
    closest = 2 ** math.floor(math.log2(heads))
    cpu = torch.device("cpu")  # explicit: spans are built under torch.device("meta")
    base = torch.full((), 2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32, device=cpu)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32, device=cpu))
    if closest != heads:
        extra_base = torch.full(
            (), 2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device=cpu
        )
        remaining = min(closest, heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32, device=cpu))
        slopes = torch.cat([slopes, extra])
    return slopes

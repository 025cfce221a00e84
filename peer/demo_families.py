"""Small random models of every family in ``peer.families``, with the demo tokenizer.

``swarm demo-model --arch FAMILY`` and the family tests use this: each model is built by
``transformers``' own config and model classes for that family, with the family's features
switched on (GQA, sliding windows shorter than a prompt, biases, q/k norms, soft-capping, partial
RoPE, ALiBi, fused projections, 4 experts top-2, attention sinks), then written as a normal Hugging Face folder.

Like ``peer.demo_model``, weights are transformers' init under a fixed seed (std 0.1 so greedy
text varies); then biases and norm weights, which transformers initialises to 0 and 1, get seeded
noise, so a bias or a norm applied in the wrong place changes the tokens instead of going unseen.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from peer.demo_model import BOS_ID, EOS_ID, IM_END_ID, PAD_ID, _write_tokenizer

WINDOW = 8  # shorter than the tests' long prompts, so window layers really drop keys
_SHAPE = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 4096}
_LLAMA_LIKE = {**_SHAPE, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
_ALTERNATING = ["sliding_attention", "full_attention"] * 2

# arch -> (transformers config class, keyword arguments)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**_LLAMA_LIKE, "attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralConfig", {**_LLAMA_LIKE, "sliding_window": WINDOW, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {
        **_LLAMA_LIKE, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2,
        "tie_word_embeddings": True,
    }),
    "qwen3": ("Qwen3Config", {**_LLAMA_LIKE, "head_dim": 16, "attention_bias": True, "tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {
        **_LLAMA_LIKE, "head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 4.0, "final_logit_softcapping": 5.0, "layer_types": _ALTERNATING,
    }),
    "gemma3_text": ("Gemma3TextConfig", {
        **_LLAMA_LIKE, "head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
        "layer_types": _ALTERNATING,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
    }),
    "phi3": ("Phi3Config", {
        **_LLAMA_LIKE, "sliding_window": WINDOW, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    }),
    "falcon": ("FalconConfig", {
        "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_kv_heads": 2, "new_decoder_architecture": True, "bias": True, "ffn_hidden_size": 96,
        "max_position_embeddings": 4096,
    }),
    "falcon7b": ("FalconConfig", {  # the older layout: one shared norm, multi-query, no new arch
        "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "multi_query": True, "parallel_attn": True, "new_decoder_architecture": False, "bias": False,
        "max_position_embeddings": 4096,
    }),
    "bloom": ("BloomConfig", {"vocab_size": 320, "hidden_size": 64, "n_layer": 4, "n_head": 4}),
    "mixtral": ("MixtralConfig", {
        **_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
    }),
    "qwen3_moe": ("Qwen3MoeConfig", {
        **_LLAMA_LIKE, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
        "norm_topk_prob": True, "mlp_only_layers": [0], "tie_word_embeddings": True,
    }),
    # YaRN (gpt-oss's own rope_parameters), sinks, biases, a clamp that bites at this scale
    "gpt_oss": ("GptOssConfig", {
        **_LLAMA_LIKE, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "sliding_window": WINDOW, "layer_types": _ALTERNATING, "swiglu_limit": 1.0,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 128,
        },
    }),
    # MLA with q and kv low-rank paths (v_head_dim != qk dims), YaRN with both mscales, 8 routed
    # experts top-2 in 2 groups of which 1 is eligible, one shared expert, a dense first layer.
    "deepseek_v3": ("DeepseekV3Config", {
        **_SHAPE, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "moe_intermediate_size": 32, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "attention_bias": True,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024,
            "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1,
        },
    }),
}  # fmt: skip


def family_config(arch: str, **overrides: Any):  # noqa: ANN201 - a transformers PreTrainedConfig
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    class_name, kwargs = ARCHS[arch]
    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    return getattr(transformers, class_name)(**{"initializer_range": 0.1, **ids, **kwargs, **overrides})


def create_family_model(
    path: str | os.PathLike[str], arch: str, *, seed: int = 0, perturb: bool = True, **overrides: Any
) -> Path:
    """Write a random ``arch`` model folder (weights, config, demo tokenizer) and return it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = family_config(arch, **overrides)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(path, config.vocab_size, getattr(config, "max_position_embeddings", 2048) or 2048)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
        if perturb:
            with torch.no_grad():
                for name, param in sorted(model.named_parameters()):
                    if name.endswith((".bias", "_bias")):  # gpt-oss: experts.gate_up_proj_bias
                        param.copy_(0.1 * torch.randn_like(param))
                    elif name.endswith(".sinks"):  # gpt-oss: sinks large enough to take a share
                        param.copy_(torch.randn_like(param))
                    elif re.search(r"(norm|\bln_\w+)\.weight$", name):
                        param.add_(0.2 * torch.randn_like(param))
                for name, buffer in sorted(model.named_buffers()):
                    if name.endswith("e_score_correction_bias"):  # DeepSeek's routing bias, init 0
                        buffer.copy_(0.1 * torch.randn_like(buffer))
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = [EOS_ID, IM_END_ID]
    model.generation_config.pad_token_id = PAD_ID
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
    return path

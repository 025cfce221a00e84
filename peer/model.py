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
from peer import gemm
from peer import quant as quantization
from peer.gemm import linear
from peer.kv_cache import KVCache
from peer.tensor_codec import DTYPES
from peer.weights import read_tensors, span_tensor_names, tensor_index

SUPPORTED_MODEL_TYPES = ("llama",)
# RoPE variants whose frequencies depend only on the config. "dynamic" and "longrope" rescale with
# the CURRENT sequence length in transformers, which changes the rotation of keys already in a
# cache; a span cannot reproduce that consistently, so we refuse them instead of drifting silently.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")
_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


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
    """The part of a model's ``config.json`` a span needs, with RoPE frequencies resolved.

    ``inv_freq`` and ``attention_scaling`` come from ``transformers``' own RoPE init functions
    (so linear / llama3 / yarn scaling match it exactly); keeping them as plain numbers makes the
    config self-contained and cheap to log or compare.
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

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> SpanConfig:
        """Parse ``config.json`` through ``transformers.AutoConfig`` (legacy ``rope_scaling`` etc.)."""
        from transformers import AutoConfig

        config_path = Path(model_dir) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        return cls.from_hf(AutoConfig.from_pretrained(str(model_dir)))

    @classmethod
    def from_hf(cls, hf_config) -> SpanConfig:  # noqa: ANN001 - a transformers PreTrainedConfig
        """Build from a ``transformers`` Llama config object."""
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        if hf_config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported: {sorted(_ACTIVATIONS)}")
        rope_type, inv_freq, scaling = _rope_frequencies(hf_config, head_dim)
        return cls(
            model_type=hf_config.model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            hidden_act=hf_config.hidden_act,
            max_position_embeddings=hf_config.max_position_embeddings,
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            rope_type=rope_type,
            inv_freq=tuple(float(x) for x in inv_freq),
            attention_scaling=float(scaling),
        )


def _rope_frequencies(hf_config, head_dim: int) -> tuple[str, torch.Tensor, float]:  # noqa: ANN001
    """RoPE inverse frequencies and cos/sin scaling, via transformers' init functions when scaled."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported by spans; supported: {STATIC_ROPE_TYPES}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        # transformers' default formula, written out: it lives on the model class, not in the table.
        base = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return rope_type, inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return rope_type, inv_freq.float(), float(scaling)


# ---- building blocks ----------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Llama RMSNorm: statistics in fp32, then cast back BEFORE the weight multiply (as HF does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's (non-interleaved) rotary layout: the two halves of each head are the pair."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _SessionSlice:
    """Where one session's tokens sit in the pack, and how its queries may look at its keys."""

    cache: KVCache
    offset: int
    length: int
    mask: torch.Tensor | None  # bool [length, past + length], True = may attend
    is_causal: bool


def _plan_attention(
    caches: Sequence[KVCache], lengths: Sequence[int], device: torch.device
) -> list[_SessionSlice]:
    """Per-session attention masks, computed once per step and shared by all layers.

    A prefill into an empty cache is plain causal. One new token sees the whole cache: no mask.
    A chunk of ``n > 1`` tokens after ``past`` cached ones needs the causal mask shifted right by
    ``past`` (SDPA's ``is_causal`` aligns top-left, which would hide most of the cache).
    """
    plan, offset = [], 0
    for cache, n in zip(caches, lengths, strict=True):
        past, mask = cache.length, None
        if n > 1 and past > 0:
            mask = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(diagonal=past)
        plan.append(_SessionSlice(cache, offset, n, mask, is_causal=(n > 1 and past == 0)))
        offset += n
    return plan


class Attention(nn.Module):
    def __init__(self, config: SpanConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # index inside the span = index inside its KVCache
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: list[_SessionSlice]
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = linear(self.q_proj, x).view(tokens, self.num_heads, self.head_dim)
        k = linear(self.k_proj, x).view(tokens, self.num_kv_heads, self.head_dim)
        v = linear(self.v_proj, x).view(tokens, self.num_kv_heads, self.head_dim)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        out = torch.empty(tokens, self.num_heads, self.head_dim, dtype=x.dtype, device=x.device)
        for s in plan:
            if s.length == 0:
                continue
            rows = slice(s.offset, s.offset + s.length)
            k_all, v_all = s.cache.append(self.layer_idx, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            attn = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0),  # [1, heads, n, head_dim]
                k_all,
                v_all,
                attn_mask=s.mask,
                is_causal=s.is_causal,
                scale=self.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            out[rows] = attn[0].transpose(0, 1)
        return linear(self.o_proj, out.view(tokens, -1))


class MLP(nn.Module):
    def __init__(self, config: SpanConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down_proj, self.act(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class Block(nn.Module):
    """One pre-norm decoder layer."""

    def __init__(self, config: SpanConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: list[_SessionSlice]
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---- the span -----------------------------------------------------------------------------------
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
        self.layers = nn.ModuleList(Block(config, i) for i in range(end - start))
        if self.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.tensor(config.inv_freq, dtype=torch.float32), persistent=False)
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
    ) -> BlockSpan:
        """Load only this span's tensors from ``model_dir`` (a folder, or a hub id when online).

        ``quant`` (``none``, ``int8``, ``nf4``; see ``peer.quant``) quantizes the Linear layers of
        each block right after that block is read, so peak memory holds one block in full
        precision, never the whole span. Unsupported combinations raise ``ValueError`` before any
        tensor is read. ``prepack`` keeps a oneDNN-packed second copy of fp32 CPU weights for
        batched passes where it is faster (see ``peer.gemm``).
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
        wanted = span_tensor_names(
            index, config.num_hidden_layers, start, end, tie_word_embeddings=config.tie_word_embeddings
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
        for prefix, names in bar:
            state = read_tensors(model_dir, index, names, dtype=dtype, device=read_device)
            if prefix is None:  # embedding / final norm / head, read first while no block is quantized
                result = span.load_state_dict(state, strict=False, assign=True)
                if result.unexpected_keys:
                    raise ValueError(
                        f"unexpected tensors for span [{start}, {end}): {result.unexpected_keys[:5]}"
                    )
                continue
            block = span.layers[int(prefix.split(".")[1])]
            block.load_state_dict(
                {name.removeprefix(prefix + "."): tensor for name, tensor in state.items()},
                strict=True,
                assign=True,
            )
            del state
            quantization.quantize_linears(block, quant, device, dtype)
            block.to(device)
        if span.is_last:
            span.lm_head = quantization.quantize_linears(span.lm_head, quant, device, dtype)
        span.inv_freq = torch.tensor(config.inv_freq, dtype=torch.float32, device=device)
        missing = [name for name, tensor in span.state_dict().items() if getattr(tensor, "is_meta", False)]
        if missing:
            raise ValueError(f"checkpoint left tensors of span [{start}, {end}) unloaded: {missing[:5]}")
        span.to(device)
        span.quant = quant
        span = span.eval().requires_grad_(False)
        gemm.calibrate(span.modules(), prepack=prepack)  # how to multiply small batches (peer.gemm)
        return span

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

    def new_cache(self, capacity: int = 16, max_capacity: int | None = None) -> KVCache:
        """An empty cache for one session, in the span's dtype and device."""
        heads, head_dim = self.config.num_key_value_heads, self.config.head_dim
        return KVCache(self.num_layers, heads, head_dim, self.dtype, self.device, capacity, max_capacity)

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
        else:
            x = inputs.to(device=device, dtype=self.dtype)
        positions = torch.cat(
            [torch.arange(c.length, c.length + n) for c, n in zip(caches, lengths, strict=True)]
        ).to(device)
        cos, sin = self._rotary(positions, x.dtype)
        plan = _plan_attention(caches, lengths, device)
        for layer in self.layers:
            x = layer(x, cos, sin, plan)
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
            return linear(self.lm_head, hidden.to(device=self.device, dtype=self.dtype)).float()

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin per token, computed in fp32 exactly as HF does, then cast to the compute dtype."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.config.attention_scaling
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
        expected = (self.num_layers, self.config.num_key_value_heads, self.config.head_dim, self.dtype)
        for cache in caches:
            if (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.dtype) != expected:
                raise ValueError(f"{cache!r} does not belong to span [{self.start}, {self.end})")


def last_token_rows(lengths: Sequence[int]) -> torch.Tensor:
    """Row of each session's last token in a packed step (sessions with 0 tokens get -1)."""
    ends = torch.tensor([int(n) for n in lengths], dtype=torch.long).cumsum(0) - 1
    return torch.where(torch.tensor([int(n) > 0 for n in lengths]), ends, torch.full_like(ends, -1))

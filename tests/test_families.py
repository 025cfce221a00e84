"""Every family of ``peer.families``, exact against ``transformers`` through chains of spans.

Each model is built by transformers' own classes for its family with the family's features on
(``peer.demo_families``: GQA, windows of 8 tokens, biases, q/k norms, soft-capping, partial RoPE,
ALiBi, fused projections, tied and untied embeddings, 4 experts top-2) and perturbed norms and
biases. In-process (the peer's block code, no network), so the whole table runs in seconds; the
same code through real peer processes is tests/test_swarm_families.py.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from peer import gemm
from peer import quant as quantization
from peer.demo_families import ARCHS, WINDOW, create_family_model, family_config
from peer.kv_cache import REWIND_SLACK, CacheRewindError, KVCache
from peer.model import BlockSpan, SpanConfig, block_bytes, last_token_rows

NEW_TOKENS = 48
ATOL = 1e-4
PROMPTS = {"short": 5, "long": 3 * WINDOW + 1}  # the long one is past the window before decoding
SPLITS = {"2-spans": [(0, 2), (2, 4)], "3-spans-uneven": [(0, 1), (1, 3), (3, 4)]}


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if enabled:
        hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("families")

    @cache
    def build(arch: str) -> Path:
        return create_family_model(root / arch, arch)

    return build


@pytest.fixture(scope="module")
def hf_model(model_dir):
    @cache
    def load(arch: str):
        model = AutoModelForCausalLM.from_pretrained(model_dir(arch), dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # decode all NEW_TOKENS, as the chain does
        return model

    return load


def hf_generate(model, sequence: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    out = model.generate(
        torch.tensor([sequence]),
        attention_mask=torch.ones(1, len(sequence), dtype=torch.long),
        do_sample=False,
        max_new_tokens=new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences[0, len(sequence) :].tolist(), torch.stack(out.logits)[:, 0].float()


def prompt_of(kind: str, seed: int = 1) -> list[int]:
    return torch.randint(9, 320, (PROMPTS[kind],), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def reference(hf_model):
    @cache
    def compute(arch: str, kind: str) -> tuple[list[int], torch.Tensor]:
        return hf_generate(hf_model(arch), prompt_of(kind), NEW_TOKENS)

    return compute


@pytest.fixture(scope="module")
def chain(model_dir):
    @cache
    def load(arch: str, split: str) -> tuple[BlockSpan, ...]:
        return tuple(BlockSpan.load(model_dir(arch), a, b, calibrate=False) for a, b in SPLITS[split])

    return load


# ---- driving a chain like the gateway drives a route ------------------------------------------
def step(spans, caches: list[KVCache], tokens: list[int]) -> torch.Tensor:
    """Feed ``tokens`` (one chunk) through every span; the last token's fp32 logits."""
    hidden = torch.tensor(tokens)
    for span, span_cache in zip(spans, caches, strict=True):
        hidden = span(hidden, [span_cache], [len(tokens)])
    return spans[-1].logits(hidden[last_token_rows([len(tokens)])])[0]


def decode(spans, caches, logits: torch.Tensor, count: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens, seen = [], []
    for _ in range(count):
        seen.append(logits)
        tokens.append(int(logits.argmax()))
        logits = step(spans, caches, tokens[-1:])
    return tokens, seen


def fresh(spans) -> list[KVCache]:
    return [span.new_cache() for span in spans]


# ---- exactness -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "split"), [("short", "2-spans"), ("long", "3-spans-uneven")])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_transformers(arch, kind, split, chain, reference):
    ref_tokens, ref_logits = reference(arch, kind)
    spans = chain(arch, split)
    caches = fresh(spans)
    tokens, logits = decode(spans, caches, step(spans, caches, prompt_of(kind)), NEW_TOKENS)
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.stack(logits), ref_logits, atol=ATOL, rtol=0)
    assert float(torch.stack(logits).std(dim=0).max()) > 1e-2  # logits move: the comparison bites


@pytest.mark.parametrize("arch", list(ARCHS))
def test_weights_laid_out_transposed_still_match_transformers(arch, model_dir, reference, monkeypatch):
    """Every Linear re-laid [in, out] in memory (`peer.gemm`, what a peer does where one row
    multiplies faster so), a span holding both the tied embedding and the head included: the
    tokens and logits still match, and the modules that read a weight themselves (MLA's
    ``kv_b_proj``) read it right."""
    monkeypatch.setattr(gemm, "prefers_transposed_layout", lambda weight, flush=None: True)
    monkeypatch.setattr(gemm, "MIN_LAYOUT_BYTES", 0)
    monkeypatch.setattr(gemm, "measure_plan", lambda weight, packed=None: {})
    spans = [BlockSpan.load(model_dir(arch), 0, 4, calibrate=False)]  # first and last: embedding and head
    gemm.calibrate(spans[0].modules())
    linears = [m for m in spans[0].modules() if type(m) is torch.nn.Linear]
    head = spans[0].lm_head.weight
    tied = head.untyped_storage().data_ptr() == spans[0].embed_tokens.weight.untyped_storage().data_ptr()
    relaid = [m for m in linears if not m.weight.is_contiguous()]
    assert len(relaid) == len(linears) - tied, "every Linear but a head shared with the embedding"
    ref_tokens, ref_logits = reference(arch, "short")
    caches = fresh(spans)
    tokens, logits = decode(spans, caches, step(spans, caches, prompt_of("short")), NEW_TOKENS)
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.stack(logits), ref_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_failover_replay_then_second_turn(arch, chain, model_dir, reference, hf_model):
    """Past the window: the last hop dies after 20 tokens, a fresh peer for its blocks is opened
    and every hop up to it replays the history from position 0 (the first hop's window layers
    rewind to 0), decoding carries on to 48 tokens; then a second turn is appended to the same
    caches (resumed, not replayed) and a rewind of 6 tokens inside the window layers' slack is
    fed again. All of it is transformers' tokens and logits."""
    ref_tokens, ref_logits = reference(arch, "long")
    spans = chain(arch, "2-spans")
    caches = fresh(spans)
    prompt = prompt_of("long")
    tokens, _ = decode(spans, caches, step(spans, caches, prompt), 20)
    replacement = BlockSpan.load(model_dir(arch), *SPLITS["2-spans"][1], calibrate=False)
    spans = (spans[0], replacement)
    caches[0].truncate(0)
    caches[1] = replacement.new_cache()
    rest, seen = decode(spans, caches, step(spans, caches, prompt + tokens), NEW_TOKENS - 20)
    assert tokens + rest == ref_tokens
    torch.testing.assert_close(torch.stack(seen), ref_logits[20:], atol=ATOL, rtol=0)

    turn = prompt_of("short", seed=2)  # decode fed every generated token: the cache holds them all
    more, seen = decode(spans, caches, step(spans, caches, turn), 12)
    history = prompt + ref_tokens + turn
    expected, expected_logits = hf_generate(hf_model(arch), history, 12)
    assert more == expected
    torch.testing.assert_close(torch.stack(seen), expected_logits, atol=ATOL, rtol=0)

    keep = len(history) + 5  # rewind the last 6 of the 11 fed tokens and feed them again
    for c in caches:
        c.truncate(keep)
    hidden = torch.tensor(more[5:11])
    for span, span_cache in zip(spans, caches, strict=True):
        hidden = span(hidden, [span_cache], [6])
    torch.testing.assert_close(spans[-1].logits(hidden), expected_logits[6:12], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_block_bytes_is_what_a_loaded_block_holds(arch, chain):
    """The memory plan of a peer that picks its own blocks (`peer.model.block_bytes`) is its
    largest loaded block: every expert, latent attention's projections, fused and biased layers."""
    spans = chain(arch, "2-spans")
    held = max(quantization.resident_bytes(layer) for span in spans for layer in span.layers)
    planned = block_bytes(spans[0].config, 4)
    assert abs(planned - held) / held < 0.01, (planned, held)


@pytest.mark.parametrize("arch", ["mixtral", "gemma2", "bloom", "gpt_oss", "deepseek_v3"])
def test_packed_sessions_match_each_alone(arch, chain):
    """Two sessions decoding in one pack while a third prefills past the window: MoE rows of all
    three go through each expert together, and window masks are per session."""
    spans = chain(arch, "2-spans")
    prompts = [prompt_of("short"), prompt_of("long"), prompt_of("long", seed=3)]
    alone = []
    for prompt in prompts:
        caches = fresh(spans)
        alone.append(decode(spans, caches, step(spans, caches, prompt), 8)[0])
    caches = [[span.new_cache() for _ in prompts] for span in spans]
    tokens: list[list[int]] = [[] for _ in prompts]
    pieces = [list(p) for p in prompts]
    for _ in range(8):
        hidden = torch.tensor([t for piece in pieces for t in piece])
        lengths = [len(piece) for piece in pieces]
        for span, span_caches in zip(spans, caches, strict=True):
            hidden = span(hidden, span_caches, lengths)
        logits = spans[-1].logits(hidden[last_token_rows(lengths)])
        for i, row in enumerate(logits):
            tokens[i].append(int(row.argmax()))
        pieces = [[t[-1]] for t in tokens]
    assert tokens == alone


# ---- sliding-window caches ---------------------------------------------------------------------
def test_window_layers_hold_a_bounded_cache(chain):
    """Mistral (every layer windowed): the cache of a long session stops growing; Gemma 2 (every
    other layer): window layers stop, full layers grow; rewinds below the kept range are refused."""
    span = chain("mistral", "2-spans")[0]
    cache = span.new_cache()
    bound = WINDOW + 2 * REWIND_SLACK + 64  # the store's bound, or what it keeps plus a chunk
    tokens = torch.randint(9, 320, (1000,), generator=torch.Generator().manual_seed(4))
    for start in range(0, 1000, 50):
        span(tokens[start : start + 50], [cache], [50])
        assert cache.capacity - cache.store_of(0)[1] <= bound
    full = KVCache(2, 2, 16, capacity=16)
    full.reserve(1000)
    assert cache.nbytes * 3 < full.nbytes
    assert cache.can_truncate(1000 - REWIND_SLACK) and not cache.can_truncate(100)
    with pytest.raises(CacheRewindError, match="replay"):
        cache.truncate(100)
    cache.truncate(0)  # a replay from the start is always possible
    assert cache.length == 0 and cache.can_truncate(0)

    gemma = chain("gemma2", "2-spans")[0]
    cache = gemma.new_cache()
    for start in range(0, 1000, 50):
        gemma(tokens[start : start + 50], [cache], [50])
    windows = [cache.store_of(i)[0] for i in range(2)]
    assert windows == [WINDOW, 0] and cache.store_of(0)[1] > 0 and cache.store_of(1)[1] == 0


# ---- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "overrides", "field"),
    [
        ("falcon", {"alibi": True}, "alibi"),
        (
            "bloom",
            {"apply_residual_connection_post_layernorm": True},
            "apply_residual_connection_post_layernorm",
        ),
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("qwen3", {"hidden_act": "xielu"}, "hidden_act"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type",
        ),
        ("qwen2", {"layer_types": ["chunked_attention"] * 4}, "layer_types"),
        # a quantized checkpoint is read only in a format the family knows (gpt-oss: MXFP4)
        ("gpt_oss", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
        ("llama", {"quantization_config": {"quant_method": "mxfp4"}}, "quantization_config"),
        ("gpt_oss", {"layer_types": ["chunked_attention"] * 4}, "layer_types"),
        ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
        ("deepseek_v3", {"topk_method": "greedy"}, "topk_method"),
        ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads"),
        ("deepseek_v3", {"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config"),
        (
            "deepseek_v3",
            {"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}},
            "quantization_config",
        ),
        ("llama", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ],
)
def test_unsupported_config_field_is_named(arch, overrides, field):
    with pytest.raises(ValueError, match=field) as info:
        SpanConfig.from_hf(family_config(arch, **overrides))
    assert "\n" not in str(info.value)


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(ValueError, match="model_type 'gpt_neox' is not supported"):
        SpanConfig.from_model_dir(tmp_path)


def test_moe_experts_quantize_like_any_linear(model_dir, reference):
    """int8 on CPU: every expert's projections are quantized, the router is not (routing stays
    the fp32 one), and greedy decoding still mostly agrees with fp32."""
    spans = [
        BlockSpan.load(model_dir("mixtral"), a, b, quant="int8", calibrate=False)
        for a, b in SPLITS["2-spans"]
    ]
    moe = spans[0].layers[0].mlp
    assert type(moe.experts[0].gate_proj) is not torch.nn.Linear
    assert moe.router.weight.dtype == torch.float32
    ref_tokens, _ = reference("mixtral", "short")
    caches = fresh(spans)
    tokens, _ = decode(spans, caches, step(spans, caches, prompt_of("short")), 16)
    assert sum(a == b for a, b in zip(tokens, ref_tokens, strict=False)) >= 8


@pytest.mark.parametrize(
    ("arch", "extra", "line"),
    [
        ("falcon", {"alibi": True}, "config field alibi=True is not supported for falcon (ALiBi on Falcon (falcon-rw))"),
        ("gpt_oss", {"quantization_config": {"quant_method": "awq", "bits": 4}},
         "config field quantization_config (quant_method='awq') is not supported for gpt_oss"
         " (checkpoint formats read: mxfp4)"),
    ],
    ids=["falcon", "gpt_oss"],
)  # fmt: skip
def test_peer_start_names_the_unsupported_field(arch, extra, line, model_dir, tmp_path):
    """`swarm peer` on a folder whose config asks for what the block does not do: one line, exit 2."""
    import json
    import subprocess
    import sys

    config = json.loads((model_dir(arch) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **extra}))
    done = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "peer", "--model", str(tmp_path), "--blocks", "0:2", "--dht", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"swarm peer: error: {line}"]


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])
def test_session_shorter_than_the_window(arch, chain, reference):
    """A session whose max_length is under the window holds its window layers at full attention
    (no trimmed store): still transformers' tokens (a peer once failed such a step)."""
    ref_tokens, ref_logits = reference(arch, "short")
    spans = chain(arch, "2-spans")
    caches = [span.new_cache(max_capacity=WINDOW - 1) for span in spans]
    assert caches[0].store_of(0)[0] == 0
    tokens, logits = decode(spans, caches, step(spans, caches, prompt_of("short")), 2)  # 7 tokens held
    assert tokens == ref_tokens[:2]
    torch.testing.assert_close(torch.stack(logits), ref_logits[:2], atol=ATOL, rtol=0)


# ---- DeepSeek-V3: the latent cache, both ways to attend, routing in fp32 ----------------------
def test_mla_caches_the_latent_and_decodes_absorbed(chain, monkeypatch):
    """A deepseek_v3 span's cache holds kv_lora_rank + qk_rope_head_dim numbers per token and
    layer (one part, no values), what the memory budget counts; decoding one token takes the
    absorbed form and a prefill the expanded one, and forcing either gives the same output."""
    from peer import mla

    spans = chain("deepseek_v3", "2-spans")
    config = spans[0].config
    cache = spans[0].new_cache()
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    assert (cache.parts, cache.num_kv_heads, cache.head_dim) == (1, 1, latent)
    assert cache.bytes_per_token == spans[0].num_layers * latent * 4
    dims = (config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim)
    assert mla.absorbs(1, 30, *dims) and not mla.absorbs(30, 30, *dims)

    prompt = prompt_of("long")
    outputs = {}
    for forced in (True, False):
        caches = fresh(spans)
        monkeypatch.setattr(mla, "absorbs", lambda *args, _forced=forced: _forced)
        logits = step(spans, caches, prompt)
        outputs[forced] = torch.stack([logits, step(spans, caches, [int(logits.argmax())])])
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-5, rtol=0)


def test_deepseek_router_stays_fp32_and_experts_quantize(model_dir, reference):
    """int8 on CPU: routed and shared experts are quantized Linears, kv_b_proj (needed whole by
    the absorbed form) and the router are not; the router and its bias stay fp32 under a bf16
    compute dtype as in transformers; int8 greedy decoding still mostly agrees with fp32."""
    spans = [
        BlockSpan.load(model_dir("deepseek_v3"), a, b, quant="int8", calibrate=False)
        for a, b in SPLITS["2-spans"]
    ]
    moe = spans[0].layers[1].mlp
    assert type(moe.experts[0].gate_proj) is not torch.nn.Linear
    assert type(moe.shared_experts.down_proj) is not torch.nn.Linear
    assert moe.router.weight.dtype == torch.float32
    assert spans[0].layers[1].self_attn.kv_b_proj.weight.dtype == torch.float32
    ref_tokens, _ = reference("deepseek_v3", "short")
    caches = fresh(spans)
    tokens, _ = decode(spans, caches, step(spans, caches, prompt_of("short")), 16)
    assert sum(a == b for a, b in zip(tokens, ref_tokens, strict=False)) >= 8

    bf16 = BlockSpan.load(model_dir("deepseek_v3"), 0, 2, dtype=torch.bfloat16, calibrate=False)
    router = bf16.layers[1].mlp.router
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert bf16.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16


def test_kimi_k2_folder_is_served_as_deepseek_v3(model_dir, tmp_path):
    """Kimi K2's folders say ``model_type: kimi_k2`` (custom code, unknown to transformers) and
    keep the legacy ``rope_scaling``; the span reads them as DeepSeek-V3 and computes the same."""
    import json
    import shutil

    source = model_dir("deepseek_v3")
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(model_type="kimi_k2", rope_theta=rope.pop("rope_theta"))
    config["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert SpanConfig.from_model_dir(tmp_path).attention == "mla"
    kimi, deepseek = (BlockSpan.load(folder, 0, 4, calibrate=False) for folder in (tmp_path, source))
    prompt = torch.tensor(prompt_of("long"))
    outputs = [span(prompt, [span.new_cache()], [len(prompt)]) for span in (kimi, deepseek)]
    assert torch.equal(outputs[0], outputs[1])


def test_deepseek_sub_span_view_matches_a_span_of_its_own(model_dir, chain):
    """A session of blocks [2, 4) on a peer that holds [0, 4) runs a narrowed view (sub-spans):
    its latent cache holds only its own layers, and it computes what a span [2, 4) computes."""
    first, own = chain("deepseek_v3", "2-spans")
    view = BlockSpan.load(model_dir("deepseek_v3"), 0, 4, calibrate=False).narrow(2, 4)
    prompt = prompt_of("long")
    hidden = first(torch.tensor(prompt), [first.new_cache()], [len(prompt)])
    caches = [own.new_cache(), view.new_cache()]
    assert caches[1].num_layers == 2
    outputs = [span(hidden, [cache], [len(prompt)]) for span, cache in zip((own, view), caches, strict=True)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)
    step_hidden = hidden[-1:]
    decoded = [span(step_hidden, [cache], [1]) for span, cache in zip((own, view), caches, strict=True)]
    torch.testing.assert_close(decoded[1], decoded[0], atol=1e-6, rtol=0)

"""gpt-oss beyond the family table's exactness tests (tests/test_families.py runs those for it):
its shipped MXFP4 expert format, int8 experts, and what a peer counts and measures for a MoE.

The MXFP4 folder is the demo model with its experts packed the way gpt-oss ships them
(``*_blocks`` / ``*_scales``, ``quantization_config: mxfp4``); its reference is the same model
with the experts replaced by transformers' own dequantization of those packed tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from peer.demo_families import create_family_model
from peer.model import BlockSpan
from peer.mxfp4 import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4
from peer.throughput import measure_pass_profile
from tests.test_families import ATOL, NEW_TOKENS, decode, fresh, hf_generate, prompt_of, step

EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def test_dequantize_matches_transformers():
    """Random packed bytes and exponents (every code, both nibbles): the same values as
    transformers' ``convert_moe_packed_tensors``, bit for bit, in fp32 and bf16."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(127 - 8, 127 + 4, (3, 40, 4), generator=gen, dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        ours = dequantize_mxfp4(blocks, scales, dtype=dtype)
        theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)
        assert ours.shape == theirs.shape == (3, 128, 40) and ours.dtype == dtype
        assert torch.equal(ours, theirs)
    assert set(torch.unique(dequantize_mxfp4(blocks, torch.full_like(scales, 127))).tolist()) == set(
        FP4_VALUES
    )


def test_quantize_round_trips_representable_values_and_refuses_bad_shapes():
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 24, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 130, (2, 24, 2), generator=gen, dtype=torch.uint8)
    weight = dequantize_mxfp4(blocks, scales)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(weight)), weight)
    noisy = torch.randn(2, 64, 24, generator=gen)
    assert (dequantize_mxfp4(*quantize_mxfp4(noisy)) - noisy).abs().max() < 0.5 * noisy.abs().max()
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(blocks.float(), scales)
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(blocks, scales[..., :1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MXFP4 folder, its dequantized reference folder), from one demo gpt-oss model."""
    root = tmp_path_factory.mktemp("gpt_oss")
    reference = create_family_model(root / "reference", "gpt_oss")
    packed_dir = root / "mxfp4"
    packed_dir.mkdir()
    for item in reference.iterdir():
        if item.name != "model.safetensors":
            (packed_dir / item.name).write_bytes(item.read_bytes())
    state = load_file(reference / "model.safetensors")
    packed = {}
    for name in list(state):
        if name.endswith(EXPERT_TENSORS):
            blocks, scales = quantize_mxfp4(state[name])
            packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
            state[name] = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)
        else:
            packed[name] = state[name]
    save_file(state, reference / "model.safetensors", metadata={"format": "pt"})
    save_file(packed, packed_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((packed_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (packed_dir / "config.json").write_text(json.dumps(config))
    return packed_dir, reference


def test_mxfp4_folder_loads_the_dequantized_weights(folders):
    """A peer reading the shipped layout holds exactly the reference's weights (and reads only
    its own blocks' packed tensors), so it decodes transformers' tokens for that reference."""
    from transformers import AutoModelForCausalLM

    packed_dir, reference = folders
    for start, end in ((0, 1), (1, 3), (3, 4)):
        packed = BlockSpan.load(packed_dir, start, end, calibrate=False).state_dict()
        plain = BlockSpan.load(reference, start, end, calibrate=False).state_dict()
        assert packed.keys() == plain.keys()
        assert "layers.0.mlp.experts.3.gate_up_proj.weight" in packed
        for name, tensor in plain.items():
            assert torch.equal(packed[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    expected, expected_logits = hf_generate(model, prompt_of("long"), NEW_TOKENS)
    spans = [BlockSpan.load(packed_dir, a, b, calibrate=False) for a, b in ((0, 2), (2, 4))]
    caches = fresh(spans)
    tokens, logits = decode(spans, caches, step(spans, caches, prompt_of("long")), NEW_TOKENS)
    assert tokens == expected
    torch.testing.assert_close(torch.stack(logits), expected_logits, atol=ATOL, rtol=0)


def test_experts_quantize_int8_and_router_stays_exact(folders):
    """Every expert is a pair of Linears, so ``--quant int8`` packs them; the router (weight and
    bias) stays fp32, and decoding still mostly agrees with the fp32 span."""
    _, reference = folders
    spans = [BlockSpan.load(reference, a, b, quant="int8", calibrate=False) for a, b in ((0, 2), (2, 4))]
    moe = spans[0].layers[0].mlp
    assert all(type(e.gate_up_proj) is not torch.nn.Linear for e in moe.experts)
    assert all(type(e.down_proj) is not torch.nn.Linear for e in moe.experts)
    assert moe.router.weight.dtype == moe.router.bias.dtype == torch.float32
    full = [BlockSpan.load(reference, a, b, calibrate=False) for a, b in ((0, 2), (2, 4))]
    caches, full_caches = fresh(spans), fresh(full)
    ours, _ = decode(spans, caches, step(spans, caches, prompt_of("short")), 16)
    ref, _ = decode(full, full_caches, step(full, full_caches, prompt_of("short")), 16)
    assert sum(a == b for a, b in zip(ours, ref, strict=True)) >= 8


def test_throughput_profile_reaches_many_experts(folders, monkeypatch):
    """The start-up profile times a 16-session pass whose tokens spread over the experts as real
    traffic does (identical rows once all went to the same 2 experts, undercounting the MoE)."""
    _, reference = folders
    span = BlockSpan.load(reference, 0, 2, calibrate=False)
    reached: set[int] = set()
    for index, expert in enumerate(span.layers[1].mlp.experts):
        original = expert.forward

        def counting(x, index=index, original=original):
            reached.add(index)
            return original(x)

        monkeypatch.setattr(expert, "forward", counting)
    measure_pass_profile(span, rounds=1)
    assert len(reached) > span.config.experts_per_tok

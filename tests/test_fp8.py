"""Block-wise FP8 checkpoints (DeepSeek-V3's shipped format) load to their dequantized weights.

The demo deepseek_v3 model is rewritten the way DeepSeek ships it: every Linear weight of the
blocks as float8_e4m3fn plus a float32 ``weight_scale_inv`` per 128x128 tile, and
``quantization_config: {"quant_method": "fp8", ...}`` in config.json. A span loaded from that
folder must equal, tensor for tensor, a span loaded from a plain folder holding the dequantized
weights (``fp8 * scale``), and so compute the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peer import fp8
from peer.demo_families import create_family_model
from peer.model import BlockSpan, SpanConfig

BLOCK = (128, 128)
FP8_MAX = 448.0  # largest float8_e4m3fn


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block-wise FP8: per tile, scale = amax / 448, stored weight = weight / scale."""
    rows, cols = weight.shape
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    scale = torch.empty(tiles)
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            scale[i, j] = weight[r, c].abs().max().clamp(min=1e-12) / FP8_MAX
            quantized[r, c] = (weight[r, c] / scale[i, j]).to(torch.float8_e4m3fn)
    return quantized, scale


def is_fp8_linear(name: str, tensor: torch.Tensor) -> bool:
    # as shipped: block Linears in FP8; norms, the router and its bias, embeddings and head not
    return ".layers." in name and tensor.dim() == 2 and ".mlp.gate." not in name


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8")
    source = create_family_model(root / "source", "deepseek_v3")
    fp8_dir, plain_dir = root / "fp8", root / "dequantized"
    shutil.copytree(source, fp8_dir)
    shutil.copytree(source, plain_dir)
    state = load_file(source / "model.safetensors")
    stored, dequantized = {}, {}
    for name, tensor in state.items():
        if is_fp8_linear(name, tensor):
            weight, scale = quantize(tensor, BLOCK)
            stored[name], stored[name.removesuffix(".weight") + ".weight_scale_inv"] = weight, scale
            dequantized[name] = (
                weight.float()
                * scale.repeat_interleave(128, 0)[: tensor.shape[0]].repeat_interleave(128, 1)[
                    :, : tensor.shape[1]
                ]
            )
        else:
            stored[name] = dequantized[name] = tensor
    save_file(stored, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, plain_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK),
    }  # fmt: skip
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return fp8_dir, plain_dir


@pytest.mark.parametrize(("start", "end"), [(0, 2), (2, 4)])
def test_fp8_folder_loads_to_the_dequantized_weights(folders, start, end):
    fp8_dir, plain_dir = folders
    assert any(t.dtype == torch.float8_e4m3fn for t in load_file(fp8_dir / "model.safetensors").values())
    assert SpanConfig.from_model_dir(fp8_dir).fp8_block == BLOCK
    got = BlockSpan.load(fp8_dir, start, end, calibrate=False)
    want = BlockSpan.load(plain_dir, start, end, calibrate=False)
    got_state, want_state = got.state_dict(), want.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor), name
    hidden = torch.tensor([5, 6, 7, 8]) if start == 0 else torch.randn(4, got.config.hidden_size)
    out = [span(hidden, [span.new_cache()], [4]) for span in (got, want)]
    # the weights are equal bit for bit (above); a pass may still round differently, since MKL picks
    # its kernels by the weights' memory alignment, which differs between the two folders' files
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_dequantize_tiles_a_ragged_weight():
    """A 300x200 weight is 3x2 tiles of 128 (the last ones partial); each tile has its own scale."""
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    quantized, scale = quantize(weight, BLOCK)
    expected = quantized.float().clone()
    for i in range(3):
        for j in range(2):
            expected[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= scale[i, j]
    assert torch.equal(fp8.dequantize(quantized, scale, BLOCK), expected)
    torch.testing.assert_close(expected, weight, atol=0.1, rtol=0.07)  # fp8: ~3 mantissa bits
    with pytest.raises(ValueError, match="does not tile"):
        fp8.dequantize(quantized, scale[:2], BLOCK)

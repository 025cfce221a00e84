"""Plain functions that make small model folders for tests (no fixtures here, no hub).

Fixtures in the test files call these with ``tmp_path_factory`` so every test module builds its
models once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from peer.demo_model import create_demo_model


def make_model(
    path: str | Path, *, preset: str = "demo", seed: int = 0, perturb: bool = False, **overrides: Any
) -> Path:
    """A random Llama folder; ``perturb`` also randomises biases and norm weights.

    transformers initialises biases to 0 and norm weights to 1, which would let a wrong bias or a
    norm applied in the wrong place go unnoticed; perturbing them makes exactness tests bite.
    """
    path = create_demo_model(path, preset=preset, seed=seed, **overrides)
    if perturb:
        file = path / "model.safetensors"
        with safe_open(str(file), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        generator = torch.Generator().manual_seed(seed + 1)
        for name, tensor in sorted(tensors.items()):
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            if name.endswith(".bias"):
                tensors[name] = 0.1 * noise
            elif name.endswith("norm.weight"):
                tensors[name] = tensor + 0.2 * noise
        save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def shard_model(src: str | Path, dst: str | Path, num_shards: int = 3) -> Path:
    """Copy a single-file model folder to ``dst`` with its tensors split over ``num_shards`` files
    and a ``model.safetensors.index.json``, the way large checkpoints are published."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    with safe_open(str(src / "model.safetensors"), framework="pt") as handle:
        names = sorted(handle.keys())
        tensors = {name: handle.get_tensor(name) for name in names}
    weight_map: dict[str, str] = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::num_shards]}
        save_file(part, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return dst

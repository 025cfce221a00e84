"""Read one span's tensors from a Hugging Face folder of safetensors, and nothing else.

A peer serving blocks ``[start, end)`` of a model must not need the memory (or the read time) of
the whole checkpoint. ``safetensors.safe_open`` maps the file and ``get_tensor`` materialises only
the tensor asked for, so we first work out the names we need from the index (or the file headers)
and then open each file that holds one of them.

Names are translated to the ``BlockSpan`` module's own (``model.layers.7.mlp.up_proj.weight`` ->
``layers.2.mlp.up_proj.weight`` for a span starting at block 5) so the result loads with a strict
``load_state_dict``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from peer.families import LLAMA_NAMES, CheckpointNames

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Old checkpoints stored the rotary frequencies; we recompute them from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def tensor_index(model_dir: Path) -> dict[str, str]:
    """Map every tensor name in the checkpoint to the safetensors file (relative name) holding it.

    Reads only the index JSON or the files' headers, never tensor data.
    """
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return {str(name): str(file) for name, file in weight_map.items()}
    files = (
        [model_dir / SINGLE_FILE]
        if (model_dir / SINGLE_FILE).is_file()
        else sorted(model_dir.glob("*.safetensors"))
    )
    if not files:
        raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors in {model_dir}")
    index: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                index[name] = file.name
    return index


def span_tensor_names(
    index: dict[str, str],
    num_layers: int,
    start: int,
    end: int,
    *,
    tie_word_embeddings: bool,
    names: CheckpointNames = LLAMA_NAMES,
) -> dict[str, str]:
    """Pick the checkpoint tensors a span needs: ``{module name: checkpoint name}``.

    Blocks ``[start, end)``; the embedding when ``start == 0``; the final norm and the LM head when
    ``end == num_layers`` (the embedding matrix stands in for the head when the weights are tied or
    the checkpoint has no ``lm_head.weight``, which is how ``save_pretrained`` writes tied models).
    ``names`` says where the family keeps them (``peer.families``): ``transformer.h.N.`` for BLOOM
    and Falcon, and how each part is renamed to the block's module names.
    """
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"span [{start}, {end}) is not inside a model of {num_layers} blocks")
    # LlamaForCausalLM checkpoints prefix the base model with "model."; a bare LlamaModel does not.
    prefix = names.prefix if any(name.startswith(names.prefix) for name in index) else ""
    layer_re = re.compile(rf"^{re.escape(names.layers)}\.(\d+)\.(.+)$")
    wanted: dict[str, str] = {}
    for name in index:
        if not name.startswith(prefix) or name.endswith(_IGNORED_SUFFIXES):
            continue
        match = layer_re.match(name[len(prefix) :])
        if match and start <= int(match.group(1)) < end:
            wanted[f"layers.{int(match.group(1)) - start}.{names.rename(match.group(2))}"] = name
    embed = f"{prefix}{names.embed}.weight"
    if start == 0:
        wanted["embed_tokens.weight"] = embed
        if names.embed_norm:
            for part in ("weight", "bias"):
                if f"{prefix}{names.embed_norm}.{part}" in index:
                    wanted[f"embed_norm.{part}"] = f"{prefix}{names.embed_norm}.{part}"
    if end == num_layers:
        wanted["norm.weight"] = f"{prefix}{names.norm}.weight"
        if f"{prefix}{names.norm}.bias" in index:  # LayerNorm families
            wanted["norm.bias"] = f"{prefix}{names.norm}.bias"
        has_head = "lm_head.weight" in index
        wanted["lm_head.weight"] = "lm_head.weight" if has_head and not tie_word_embeddings else embed
    missing = sorted({source for source in wanted.values() if source not in index})
    if missing:
        raise ValueError(f"checkpoint lacks tensors needed by span [{start}, {end}): {missing[:5]}")
    return wanted


def load_span_state_dict(
    model_dir: str | os.PathLike[str],
    start: int,
    end: int,
    *,
    num_layers: int,
    tie_word_embeddings: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Load the span's tensors, converted to ``dtype`` on ``device``, keyed by module name.

    A tensor needed twice (a tied embedding on a span that is both first and last) is read once
    and shared.
    """
    model_dir = Path(model_dir)
    index = tensor_index(model_dir)
    wanted = span_tensor_names(index, num_layers, start, end, tie_word_embeddings=tie_word_embeddings)
    return read_tensors(model_dir, index, wanted, dtype=dtype, device=device)


def read_tensors(
    model_dir: Path,
    index: dict[str, str],
    wanted: dict[str, str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read ``{module name: checkpoint name}`` from the checkpoint, converted to ``dtype`` on ``device``.

    ``BlockSpan.load`` calls this once per block so a quantizing peer never holds the whole span
    in full precision.
    """
    by_file: dict[str, set[str]] = {}
    for source in wanted.values():
        by_file.setdefault(index[source], set()).add(source)
    loaded: dict[str, torch.Tensor] = {}
    for file, names in sorted(by_file.items()):
        with safe_open(str(model_dir / file), framework="pt", device="cpu") as handle:
            for name in sorted(names):
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                loaded[name] = tensor.to(device)
    logger.debug("read %d tensors from %d file(s)", len(loaded), len(by_file))
    return {module_name: loaded[source] for module_name, source in wanted.items()}

"""Where a model's files are: a local folder, or a hub snapshot when one can be had.

Both the gateway (tokenizer, config) and the peers (weights) need the folder; this module imports
no torch so that the gateway does not either.
"""

from __future__ import annotations

import os
from pathlib import Path


def resolve_model_dir(model: str | os.PathLike[str]) -> Path:
    """Return a local folder for ``model``: the folder itself, or a hub snapshot when one can be had.

    The hub is only tried when ``model`` is not an existing folder and ``huggingface_hub`` is
    installed; the local cache is tried first so an offline machine with a cached snapshot works.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise FileNotFoundError(f"{model!r} is not a folder and huggingface_hub is not installed") from exc
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    errors = []
    for local_only in (True, False):
        try:
            return Path(snapshot_download(str(model), allow_patterns=patterns, local_files_only=local_only))
        except Exception as exc:  # noqa: BLE001 - any hub failure means "not available here"
            errors.append(f"{type(exc).__name__}: {exc}")
    raise FileNotFoundError(f"{model!r} is not a folder and could not be fetched from the hub ({errors[-1]})")


# Older families name some fields their own way (BLOOM: n_layer / n_head; Falcon: num_kv_heads,
# ffn_hidden_size). The gateway and the launcher read config.json without transformers, so the
# standard names are filled in from these aliases here.
_ALIASES = {
    "num_hidden_layers": ("n_layer", "num_layers"),
    "num_attention_heads": ("n_head",),
    "num_key_value_heads": ("num_kv_heads",),
    "intermediate_size": ("ffn_hidden_size",),
}


def read_model_config(model_dir: str | os.PathLike[str]) -> dict:
    """``config.json`` of a model folder, with the standard field names filled in from aliases."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key, aliases in _ALIASES.items():
        if config.get(key) is None:
            config[key] = next((config[a] for a in aliases if config.get(a) is not None), None)
    if config.get("intermediate_size") is None and config.get("hidden_size"):
        config["intermediate_size"] = 4 * int(config["hidden_size"])  # BLOOM's MLP
    return config

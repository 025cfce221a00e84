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

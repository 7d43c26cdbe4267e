"""Models named by a Hugging Face hub id (``owner/name``), read from the local hub cache.

``resolve(repo_id)`` gives the snapshot directory of ``repo_id`` in the Hugging Face cache (the
layout ``huggingface_hub`` writes: ``models--Owner--Name/refs/main`` holding a commit hash,
``snapshots/<hash>/`` holding the files). A cached snapshot is used as is, without asking the hub
whether ``main`` moved. When it is not cached:

- with ``HF_HUB_OFFLINE=1`` the id is a ``ModelSourceError`` naming the id and the cache searched;
- otherwise the model's files (config, safetensors, tokenizer; no other weight formats) are
  downloaded into the cache by ``huggingface_hub``, and a failed download is a
  ``ModelSourceError`` as well.

The cache directory and the offline switch are read from the environment at each call
(``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``~/.cache/huggingface/hub``), not from
``huggingface_hub.constants``, which are fixed when that package is first imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prefopt_jax.errors import ModelSourceError

# huggingface_hub's own rule for repo ids (validate_repo_id), owner required.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What from_pretrained reads; a download fetches nothing else (no .bin, .onnx, .gguf...).
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors",
               "model.safetensors.index.json", "tokenizer*", "*.jinja", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt"]
_TRUE = {"1", "on", "yes", "true"}


def is_hub_id(source: str) -> bool:
    """Whether ``source`` is shaped like a hub model id ``owner/name`` (not whether it exists)."""
    source = str(source)
    return (bool(_HUB_ID.match(source)) and "--" not in source and ".." not in source
            and not source.startswith((".", "-")) and len(source) <= 96)


def cache_dir() -> Path:
    """The Hugging Face hub cache that the environment names now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """Whether the environment forbids reaching the hub (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of ``repo_id`` at ``main``, or None when not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache_dir()), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def resolve(repo_id: str, download: bool = True) -> Path | None:
    """Snapshot directory of ``repo_id``: cached, else downloaded unless offline.

    With ``download=False`` an id that is not cached gives None while online (it would be
    downloaded on load) and still raises offline.
    """
    snapshot = cached_snapshot(repo_id)
    if snapshot is not None:
        return snapshot
    if offline():
        raise ModelSourceError(
            f"{repo_id!r} is neither a path nor a model in the Hugging Face cache {cache_dir()} "
            "(HF_HUB_OFFLINE=1, so it is not downloaded)")
    if not download:
        return None
    return _download(repo_id)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache_dir()),
                                      allow_patterns=MODEL_FILES))
    except Exception as err:  # network, missing/gated repository: all mean "nothing loadable"
        raise ModelSourceError(
            f"{repo_id!r} is neither a path nor a model in the Hugging Face cache {cache_dir()}, "
            f"and downloading it failed ({type(err).__name__}: {err})") from err

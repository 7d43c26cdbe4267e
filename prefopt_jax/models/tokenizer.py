"""Tokenizer loading from local files only (a Hugging Face directory or a GGUF file).

Tokenizers are transformers objects and carry the chat template of their source. Nothing here
reaches a model hub: paths are local and the loaders run with ``local_files_only``. Loading leaves
loader-only keywords (``local_files_only``...) out of the tokenizer's saved config.

``stop_token_ids`` gives the ids generation should stop at: the eos token and the token that
closes an assistant turn in the chat template (``<|im_end|>`` for SmolLM2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# Keywords of from_pretrained that transformers keeps in init_kwargs and would write into
# tokenizer_config.json; they describe one load, not the tokenizer.
LOADER_ONLY_KEYS = ("local_files_only", "is_local", "cache_dir", "force_download",
                    "resume_download", "proxies", "token", "use_auth_token", "revision",
                    "subfolder", "trust_remote_code", "gguf_file", "user_agent", "_commit_hash",
                    "_from_auto", "_from_pipeline")
# A content no chat template changes or finds elsewhere in its rendering.
_PROBE = "zqx7 probe reply"


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether a model directory ships tokenizer files."""
    return any((Path(directory) / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(directory: str | Path) -> Any | None:
    """Tokenizer of a Hugging Face model directory, or None when it has no tokenizer files."""
    if not has_tokenizer_files(directory):
        return None
    from transformers import AutoTokenizer

    return _drop_loader_keys(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))


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
        return _drop_loader_keys(AutoTokenizer.from_pretrained(str(shipped),
                                                               local_files_only=True))
    try:
        return _drop_loader_keys(AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"reading the tokenizer of {path} needs transformers' GGUF reader, which imports "
            f"torch ({err}); install the CPU build (pip install torch==2.13.0 on this machine) or "
            f"load the model from a Hugging Face directory that has tokenizer files") from err


def _drop_loader_keys(tokenizer: Any) -> Any:
    """``tokenizer`` without loader-only keywords in the config it saves."""
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    if isinstance(init_kwargs, dict):
        for key in LOADER_ONLY_KEYS:
            init_kwargs.pop(key, None)
    return tokenizer


def clean_saved_config(directory: str | Path) -> None:
    """Remove loader-only keys from a saved ``tokenizer_config.json`` (for tokenizers loaded
    elsewhere, whose init_kwargs still hold them)."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text())
    if any(key in config for key in LOADER_ONLY_KEYS):
        kept = {k: v for k, v in config.items() if k not in LOADER_ONLY_KEYS}
        path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant message's content.

    Found by rendering a user/assistant exchange: ``<|im_end|>`` for ChatML templates,
    ``<|eot_id|>`` for Llama 3, ``</s>`` for Mistral. None without a chat template, or when the
    template puts no special token there.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates raise freely (jinja errors, role checks); then there is none
        return None
    at = text.rfind(_PROBE) if isinstance(text, str) else -1
    if at < 0:
        return None
    suffix = text[at + len(_PROBE):].lstrip()
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    return ids[0] if ids and ids[0] in _special_ids(tokenizer) else None


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids generation stops at: the eos token, then the chat template's end of turn if other."""
    ids = []
    for token_id in (getattr(tokenizer, "eos_token_id", None), end_of_turn_id(tokenizer)):
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids

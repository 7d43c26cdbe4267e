"""Fixtures for data tests: a tiny local tokenizer and helpers that write local dataset files."""

import json
import os

import pytest

from prefopt_jax.data.synthetic import tiny_tokenizer


@pytest.fixture(scope="session")
def tok():
    """A byte-level BPE tokenizer with a chat template, trained in a second on a few words."""
    return tiny_tokenizer()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keeps datasets' Arrow cache inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def write_jsonl():
    """A function that writes rows as JSON lines and returns the path as a string."""
    def write(path, rows) -> str:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return os.fspath(path)

    return write

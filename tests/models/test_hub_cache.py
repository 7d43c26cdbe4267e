"""Models named by hub id load from a local Hugging Face cache; unresolvable sources fail early.

The cache is built here in the layout huggingface_hub writes (models--Owner--Name/refs/main,
snapshots/<hash>/), from a tiny random model exported with save_pretrained: nothing is downloaded.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax.errors import ModelSourceError, UserError
from prefopt_jax.models import from_pretrained, hf, hub, presets, save_pretrained
from prefopt_jax.models.spec import ModelSpec, check_source, random_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """(cache dir, original model, tokenizer): ``TinyOwner/Tiny-Model`` cached, hub offline."""
    from prefopt_jax.data.synthetic import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = random_model(presets.tiny_config(vocab_size=len(tokenizer)), seed=5)
    cache = tmp_path / "hub"
    repo = cache / "models--TinyOwner--Tiny-Model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    save_pretrained(model, repo / "snapshots" / COMMIT, tokenizer)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, model, tokenizer


def test_hub_id_loads_from_the_cache(hub_cache):
    cache, original, tokenizer = hub_cache
    model, loaded_tokenizer = from_pretrained("TinyOwner/Tiny-Model")
    tokens_bt = jnp.asarray([[1, 5, 9, 13, 40, 2]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(tokens_bt)), np.asarray(original(tokens_bt)))
    assert loaded_tokenizer.encode("a few words") == tokenizer.encode("a few words")
    assert hub.resolve("TinyOwner/Tiny-Model") == cache / "models--TinyOwner--Tiny-Model" \
        / "snapshots" / COMMIT
    check_source(ModelSpec(source="TinyOwner/Tiny-Model"))


def test_uncached_hub_id_offline_names_the_id_and_cache(hub_cache):
    cache = hub_cache[0]
    for call in (lambda: from_pretrained("TinyOwner/Other-Model"),
                 lambda: check_source(ModelSpec(source="TinyOwner/Other-Model"))):
        with pytest.raises(ModelSourceError) as err:
            call()
        assert "TinyOwner/Other-Model" in str(err.value) and str(cache) in str(err.value)
        assert "HF_HUB_OFFLINE" in str(err.value)


def test_uncached_hub_id_online_downloads_only_model_files(hub_cache, monkeypatch):
    """Online, a missing id is fetched (model files only); a failed fetch is a ModelSourceError."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise ConnectionError("no network here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    check_source(ModelSpec(source="TinyOwner/Other-Model"))  # would be downloaded on load
    assert all(kwargs.get("local_files_only") for _, kwargs in calls)
    with pytest.raises(ModelSourceError, match="no network here"):
        from_pretrained("TinyOwner/Other-Model")
    repo_id, kwargs = calls[-1]
    assert repo_id == "TinyOwner/Other-Model" and not kwargs.get("local_files_only")
    assert kwargs["cache_dir"] == str(hub_cache[0]) and "*.safetensors" in kwargs["allow_patterns"]


def test_missing_path_is_a_short_model_source_error(tmp_path):
    missing = tmp_path / "runs" / "export"
    with pytest.raises(ModelSourceError) as err:
        from_pretrained(missing)
    assert isinstance(err.value, UserError) and isinstance(err.value, FileNotFoundError)
    assert isinstance(err.value, hf.ModelNotFoundError)
    assert str(missing) in str(err.value) and len(str(err.value)) < 300
    with pytest.raises(ModelSourceError, match="export"):
        check_source(ModelSpec(source=str(missing)))


def test_check_source(tmp_path, hub_cache):
    check_source(ModelSpec(source="tiny"))
    check_source(ModelSpec(source="random:smollm2-135m"))
    with pytest.raises(ModelSourceError, match="random:nope"):
        check_source(ModelSpec(source="random:nope"))
    exported = save_pretrained(random_model(presets.tiny_config()), tmp_path / "export")
    check_source(ModelSpec(source=str(exported)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="config.json"):
        check_source(ModelSpec(source=str(tmp_path / "empty")))
    with pytest.raises(ModelSourceError):
        check_source(ModelSpec(source=""))


def test_hub_id_shape():
    assert hub.is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    for source in ("smollm2", "/abs/path", "a/b/c", "./x", "../x/y", "a--b/c", "owner/",
                   "model.gguf"):
        assert not hub.is_hub_id(source), source


def test_cache_dir_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.cache_dir() == tmp_path / "cache"

"""Sources: Python lists, datasets objects, TFDS (with a stand-in module), host slices."""

import sys
import types

import numpy as np
import pytest

from prefopt_jax.errors import DataSourceError

from prefopt_jax.data import DataConfig, open_source, prepare, shard_range
from prefopt_jax.data.sources import ListSource

ROWS = [{"prompt": f"q{i}", "chosen": " yes", "rejected": " no"} for i in range(10)]


def test_shard_ranges_are_balanced_and_cover():
    ranges = [shard_range(10, i, 3) for i in range(3)]
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError):
        shard_range(10, 3, 3)


def test_list_fingerprint_follows_content():
    assert ListSource(ROWS).fingerprint == ListSource(list(ROWS)).fingerprint
    assert ListSource(ROWS).fingerprint != ListSource(ROWS[:9]).fingerprint


def test_dataset_objects_and_splits(tok, hf_cache):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    assert len(open_source(ds)) == 10
    both = datasets.DatasetDict({"train": ds, "test": ds.select(range(4))})
    data, report = prepare(both, tok, DataConfig(cache_dir=None, split="test"))
    assert len(data) == 4 and report.source.endswith(":test")
    with pytest.raises(DataSourceError, match="no split 'dev'"):
        open_source(both, split="dev")


def fake_tfds(rows, calls):
    """A stand-in for tensorflow_datasets with builder/load/as_numpy and split slicing."""
    module = types.ModuleType("tensorflow_datasets")
    encoded = [{k: (np.bytes_(v.encode()) if isinstance(v, str) else v) for k, v in r.items()}
               for r in rows]

    def builder(name, data_dir=None):
        split = types.SimpleNamespace(num_examples=len(rows))
        return types.SimpleNamespace(info=types.SimpleNamespace(splits={"train": split},
                                                                version="1.0.0"))

    def load(name, split, data_dir=None):
        calls.append(split)
        lo, hi = split[split.index("[") + 1:-1].split(":")
        return encoded[int(lo):int(hi)]

    module.builder, module.load, module.as_numpy = builder, load, lambda ds: iter(ds)
    return module


def test_tfds_builder_reads_its_slice(tok, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(ROWS, calls))
    data, report = prepare("tfds:my_prefs", tok, DataConfig(cache_dir=None), process_index=1,
                           process_count=2)
    assert data.example_index_n.tolist() == [5, 6, 7, 8, 9]
    assert tok.decode(list(data.prompt(0))) == "<s>q5"
    assert calls == ["train[0:10]", "train[5:10]"]  # format detection, then the host's slice


def test_tfds_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        open_source("tfds:anything")


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="unknown file type '.txt'"):
        open_source(str(path))

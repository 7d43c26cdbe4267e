"""Data sources: Python lists, local JSON/JSONL, Hugging Face datasets (files, saved, hub), TFDS.

A `Source` knows its row count and a fingerprint, and reads a range of rows as plain dicts, so a
host reads only its own slice. JSON and JSONL are parsed with the standard library rather than
Arrow, so each row arrives exactly as written (Arrow would coerce or reject mixed types before
validation could name the row).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from prefopt_jax.data.formats import DataError
from prefopt_jax.errors import DataSourceError

HF_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class Source:
    """A row-addressable data source: len, fingerprint, rows(start, stop)."""

    name: str
    fingerprint: str

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> list[dict]:
        """Rows [start, stop) as dicts."""
        raise NotImplementedError

    def location(self, row: int) -> str:
        """Where row `row` (counted from 0, as datasets index) is, in words a user can find
        it by: a file's line number where there is one."""
        return f"{self.name} row {row}"


class ListSource(Source):
    """Rows given as a Python list of dicts."""

    def __init__(self, rows: list, name: str = "python-list", fingerprint: str | None = None):
        self._rows, self.name = list(rows), name
        self.fingerprint = fingerprint or hashlib.sha256(
            json.dumps(self._rows, default=repr, sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, start: int, stop: int) -> list[dict]:
        return self._rows[start:stop]


class JsonSource(Source):
    """A local .json (a list of rows, or a dict of equal-length columns) or .jsonl file."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            raw = f.read()
        self.name, self.fingerprint = path, hashlib.sha256(raw).hexdigest()[:16]
        if path.endswith(".jsonl"):
            numbered = [(n, ln) for n, ln in enumerate(raw.splitlines(), 1) if ln.strip()]
            self._line_numbers = [n for n, _ in numbered]
            self._lines, self._rows = [ln for _, ln in numbered], None
        else:
            self._lines, self._rows = None, json_rows(json.loads(raw), path)

    def __len__(self) -> int:
        return len(self._lines) if self._rows is None else len(self._rows)

    def rows(self, start: int, stop: int) -> list[dict]:
        if self._rows is not None:
            return self._rows[start:stop]
        out = []
        for i, line in enumerate(self._lines[start:stop], start):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(i, None, f"invalid JSON: {err}", where=self.location(i)) from None
        return out

    def location(self, row: int) -> str:
        if self._rows is None and 0 <= row < len(self._line_numbers):
            return f"{self.name} line {self._line_numbers[row]}"
        return super().location(row)


def json_rows(data: Any, path: str) -> list:
    """Rows of a parsed .json file: a list of rows or a dict of columns."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) == 1:
            return [dict(zip(data, values)) for values in zip(*data.values())]
    raise DataSourceError(f"{path}: expected a JSON list of rows or a dict of equal-length "
                          "columns")


class HFSource(Source):
    """A `datasets.Dataset` (from local files, a saved dataset or the hub)."""

    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name
        self.fingerprint = getattr(dataset, "_fingerprint", None) or name

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, start: int, stop: int) -> list[dict]:
        columns = self.dataset[start:stop]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]


class TFDSSource(Source):
    """A TFDS builder split ("tfds:name[/config][:version]"); needs tensorflow_datasets.

    Rows are read with TFDS split slicing ("train[a:b]"), so a host reads only its range.
    """

    def __init__(self, spec: str, split: str, data_dir: str | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as err:
            raise ImportError("TFDS sources need the optional tensorflow-datasets "
                              "package: pip install tensorflow-datasets") from err
        self._tfds, self._split, self._data_dir = tfds, split, data_dir
        self._builder_name, self.name = spec[len("tfds:"):], spec
        info = tfds.builder(self._builder_name, data_dir=data_dir).info
        self._num_rows = int(info.splits[split].num_examples)
        self.fingerprint = hashlib.sha256(
            f"{spec}|{split}|{info.version}|{self._num_rows}".encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self._num_rows

    def rows(self, start: int, stop: int) -> list[dict]:
        if stop <= start:
            return []
        dataset = self._tfds.load(self._builder_name, split=f"{self._split}[{start}:{stop}]",
                                  data_dir=self._data_dir)
        return [decode_tf(row) for row in self._tfds.as_numpy(dataset)]


def decode_tf(value: Any) -> Any:
    """Numpy values from TFDS into plain Python: bytes to str, arrays to lists."""
    if isinstance(value, dict):
        return {k: decode_tf(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "tolist"):
        return decode_tf(value.tolist())
    if isinstance(value, (list, tuple)):
        return [decode_tf(v) for v in value]
    return value


def open_source(source: Any, split: str = "train") -> Source:
    """A Source from a list of rows, a datasets.Dataset(Dict), a path, "tfds:..." or a hub name."""
    if isinstance(source, Source):
        return source
    if isinstance(source, (list, tuple)):
        return ListSource(source)
    if hasattr(source, "column_names"):
        return hf_dataset(source, split, name=type(source).__name__)
    source = os.fspath(source)
    if source.startswith("tfds:"):
        return TFDSSource(source, split)
    if not os.path.exists(source) and looks_local(source):
        raise DataSourceError(f"data source {source}: no such file or directory")
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1]
        if ext in (".json", ".jsonl"):
            return JsonSource(source)
        if ext not in HF_FILE_BUILDERS:
            raise DataSourceError(f"{source}: unknown file type {ext!r}; expected .json, .jsonl, "
                             f"{', '.join(HF_FILE_BUILDERS)}")
        import datasets
        return hf_dataset(datasets.load_dataset(HF_FILE_BUILDERS[ext], data_files=source,
                                                split="train"), split, source)
    import datasets
    if os.path.isdir(source) and is_saved_dataset(source):
        return hf_dataset(datasets.load_from_disk(source), split, source)
    # A folder of data files or a hub name: the hub is only reached for the latter.
    try:
        dataset = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataSourceError(f"data source {source}: not a local file or folder, and the "
                              f"datasets library could not load it as a dataset name: "
                              f"{first}") from err
    return hf_dataset(dataset, split, source)


def looks_local(source: str) -> bool:
    """Whether a source string is meant as a local path (not a hub dataset name)."""
    return (os.path.splitext(source)[1] in (".json", ".jsonl", *HF_FILE_BUILDERS)
            or source.startswith(("/", "./", "../", "~")) or source.count("/") > 1)


def is_saved_dataset(path: str) -> bool:
    """Whether path holds the output of `Dataset(Dict).save_to_disk`."""
    return any(os.path.exists(os.path.join(path, f))
               for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def hf_dataset(dataset, split: str, name: str) -> HFSource:
    """Wraps a datasets.Dataset, picking split from a DatasetDict."""
    if isinstance(dataset.column_names, dict):
        if split not in dataset:
            raise DataSourceError(f"{name}: no split {split!r} (has {', '.join(dataset)})")
        dataset = dataset[split]
    return HFSource(dataset, f"{name}:{split}")


def shard_range(num_rows: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of one host; slices are balanced and cover all rows."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return (num_rows * process_index // process_count,
            num_rows * (process_index + 1) // process_count)

"""From a source to tokenised examples for one host: read, detect, validate, transform, tokenise.

The result is cached on disk under a key of the dataset fingerprint, the host's row range, the
tokenizer and every setting here, so a second start-up skips straight to batching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import numpy as np

from prefopt_jax.data import formats, transforms
from prefopt_jax.data.report import DataReport
from prefopt_jax.data.sources import open_source, shard_range
from prefopt_jax.data.tokenize import TokenizeConfig, tokenize_records, tokenizer_fingerprint
from prefopt_jax.data.tokenized import TokenizedData
from prefopt_jax.errors import DataSourceError

CACHE_VERSION = 1
CHUNK_ROWS = 10_000
log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "prefopt_jax", "data")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How to read and tokenise a preference dataset (flat, so gin binds each field).

    format: None to detect, or one of formats.FORMATS. ranked: how scored lists become pairs
    (best_vs_worst, all_pairs, best_vs_random) or listwise; list_size: K for listwise.
    max_prompt_length, max_completion_length, max_length, prompt_truncation,
    completion_truncation, add_bos, add_eos: see tokenize.TokenizeConfig (TRL's meanings;
    a prompt over its limit is an error unless prompt_truncation says otherwise).
    flip_rate: fraction of labels swapped. relabel_with_scores: reward-augmented pairs.
    filter_min_length/filter_max_length: drop examples whose longest sequence is outside.
    skip_bad_rows: skip and count bad rows instead of raising. seed: flips and random pairs.
    cache_dir: None disables the tokenisation cache.
    """

    split: str = "train"
    format: str | None = None
    ranked: str = "best_vs_worst"
    list_size: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    max_length: int | None = None
    prompt_truncation: str = "error"
    completion_truncation: str = "keep_start"
    add_bos: bool = True
    add_eos: bool = True
    flip_rate: float = 0.0
    relabel_with_scores: bool = False
    score_template: str = transforms.DEFAULT_SCORE_TEMPLATE
    system_template: str = transforms.DEFAULT_SYSTEM_TEMPLATE
    filter_min_length: int | None = None
    filter_max_length: int | None = None
    skip_bad_rows: bool = False
    seed: int = 0
    cache_dir: str | None = os.environ.get("PREFOPT_JAX_CACHE", DEFAULT_CACHE_DIR)

    def __post_init__(self):
        self.tokenize_config()  # validates the truncation settings at construction

    def tokenize_config(self) -> TokenizeConfig:
        """The tokenisation settings."""
        names = [f.name for f in dataclasses.fields(TokenizeConfig)]
        return TokenizeConfig(**{name: getattr(self, name) for name in names})


def format_spec(source, config: DataConfig) -> formats.FormatSpec:
    """The format of a source: as configured, or detected from its first rows."""
    head = source.rows(0, min(len(source), formats.DETECT_ROWS))
    if not head:
        raise DataSourceError(f"{source.name}: no rows")
    fmt = config.format or formats.detect_format(head)
    if fmt not in formats.FORMATS:
        raise DataSourceError(f"{source.name}: unknown format {fmt!r}; expected one of "
                              f"{list(formats.FORMATS)}")
    if config.ranked not in formats.RANKED_MODES:
        raise DataSourceError(f"unknown ranked mode {config.ranked!r}; expected "
                              f"{formats.RANKED_MODES}")
    return formats.FormatSpec(fmt, formats.detect_conversational(head, fmt), config.ranked,
                              config.list_size, config.seed)


def check_source(source, config: DataConfig = DataConfig()) -> str:
    """Opens a source and validates its first rows, before any model loads (no tokenizer).

    A missing file, an unknown format or a bad row among the first `formats.DETECT_ROWS` fails
    here naming the file and line; the rest is validated as it is tokenised. Returns the format.
    """
    src = open_source(source, config.split)
    try:
        spec = format_spec(src, config)
        report = DataReport(source=src.name, rows=(0, len(src), len(src)), format=spec.format,
                            conversational=spec.conversational, kind=spec.kind)
        formats.normalize(src.rows(0, min(len(src), formats.DETECT_ROWS)), spec, report,
                          skip_bad_rows=config.skip_bad_rows)
    except formats.DataError as err:
        raise err.located(src) from None
    return spec.format


def cache_key(fingerprint: str, rows: tuple[int, int], config: DataConfig, tokenizer) -> str:
    """A hash of everything the tokenised examples depend on."""
    settings = dataclasses.asdict(dataclasses.replace(config, cache_dir=None))
    parts = [CACHE_VERSION, fingerprint, rows, settings, tokenizer_fingerprint(tokenizer)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def prepare(source, tokenizer, config: DataConfig = DataConfig(), process_index: int = 0,
            process_count: int = 1) -> tuple[TokenizedData, DataReport]:
    """Tokenised examples of this host's contiguous slice of source, and a report of what happened.

    Args:
        source: a list of row dicts, a datasets.Dataset, a path (json, jsonl, parquet, csv,
            saved dataset, folder), "tfds:name" or a hub name.
        tokenizer: a transformers tokenizer (chat template used for conversational data).
    """
    src = open_source(source, config.split)
    start, stop = shard_range(len(src), process_index, process_count)
    path = None
    if config.cache_dir is not None:
        key = cache_key(src.fingerprint, (start, stop), config, tokenizer)
        path = os.path.join(config.cache_dir, f"{key}.npz")
    if path is not None and os.path.exists(path):
        data, report = load_cached(path)
    else:
        try:
            data, report = build(src, start, stop, tokenizer, config)
        except formats.DataError as err:
            raise err.located(src) from None
        if path is not None:
            data.save(path, extra={"report": np.array(report.to_json())})
    log.info("%s", report.summary())
    return data, report


def build(src, start: int, stop: int, tokenizer, config: DataConfig):
    """Reads rows [start, stop) of src, validates, transforms and tokenises them."""
    spec = format_spec(src, config)
    report = DataReport(source=src.name, rows=(start, stop, len(src)), format=spec.format,
                        conversational=spec.conversational, kind=spec.kind)
    records = []
    for chunk in range(start, stop, CHUNK_ROWS):
        rows = src.rows(chunk, min(chunk + CHUNK_ROWS, stop))
        records += formats.normalize(rows, spec, report, start=chunk,
                                     skip_bad_rows=config.skip_bad_rows)
    records = apply_transforms(records, spec, config, report)
    k = num_completions(records, spec)
    if spec.kind == "listwise":
        records = [pad_list(r, k) for r in records]
    data = tokenize_records(records, tokenizer, config.tokenize_config(), spec.kind, k, report,
                            config.skip_bad_rows)
    data = transforms.filter_by_length(data, report, config.filter_min_length,
                                       config.filter_max_length)
    report.counts["examples"] = len(data)
    if len(data) == 0:
        raise ValueError(f"no examples left from rows [{start}, {stop}):\n{report.summary()}")
    return data, report


def apply_transforms(records: list, spec: formats.FormatSpec, config: DataConfig,
                     report: DataReport) -> list:
    """Score-conditioned relabelling, then label flipping, as configured."""
    if config.relabel_with_scores:
        records = transforms.relabel_with_scores(records, spec.kind, config.score_template,
                                                 config.system_template)
        report.counts["relabelled_pairs"] += len(records)
    if config.flip_rate > 0:
        records = transforms.flip_labels(records, config.flip_rate, config.seed, spec.kind)
        report.counts["labels_flipped"] += sum(int(r.fields["flipped"]) for r in records)
    return records


def num_completions(records: list, spec: formats.FormatSpec) -> int:
    """K: fixed by the kind, or for listwise data the configured or longest list."""
    if spec.kind != "listwise":
        return {"paired": 2, "triple": 3, "unpaired": 1}[spec.kind]
    return spec.list_size or max((len(r.completions) for r in records), default=1)


def pad_list(record: formats.Record, k: int) -> formats.Record:
    """A listwise record padded to K completions with filler (None, score nan)."""
    pad = k - len(record.completions)
    fields = dict(record.fields, scores=list(record.fields["scores"]) + [float("nan")] * pad)
    return dataclasses.replace(record, completions=record.completions + [None] * pad,
                               fields=fields)


def load_cached(path: str) -> tuple[TokenizedData, DataReport]:
    """Tokenised examples and their report from the cache."""
    with np.load(path, allow_pickle=False) as z:
        report = DataReport.from_json(str(z["report"]))
    report.counts["loaded_from_cache"] = 1
    return TokenizedData.load(path), report

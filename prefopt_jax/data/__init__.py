"""Preference data: sources -> formats (validate) -> tokenize -> layout -> loader (host shard).

From a source to batches:

    data, report = prepare(source, tokenizer, DataConfig(max_length=1024), process_index,
                           process_count)      # this host's rows, tokenised (cached on disk)
    print(report.summary())                   # format, skipped rows, truncation and drops
    loader = Loader(data, batch_size, LayoutConfig(kind="packed"), seed=0, num_epochs=None)
    batch = loader.next_batch()               # numpy dict, the contract in docs/interfaces.md
    state = loader.state_dict()               # into the checkpoint; load_state_dict resumes

Kinds and K (completions per example; Q = P * K sequences, in order within an example):
paired K=2 (chosen, rejected), triple K=3 (chosen, rejected, gold), unpaired K=1 (+ `label`),
listwise K=list_size (+ `scores` [P, K], nan for filler completions).

Multi-host: every host calls prepare with its process_index/process_count (it reads only its
contiguous slice) and builds a Loader with the same batch_size and steps_per_epoch; the engine
agrees on one shape per step with the max of `peek_shape()` over hosts, passed as `min_shape`.
"""

from prefopt_jax.data.formats import FORMATS, DataError, FormatSpec, Record, detect_format
from prefopt_jax.data.layout import LAYOUTS, LayoutConfig, Shape, make_batch, padding_fraction
from prefopt_jax.data.loader import Loader
from prefopt_jax.data.pipeline import DataConfig, check_source, prepare
from prefopt_jax.data.report import DataReport
from prefopt_jax.data.sources import open_source, shard_range
from prefopt_jax.data.tokenize import TokenizeConfig
from prefopt_jax.data.tokenized import TokenizedData
from prefopt_jax.data.tokenizer import load_tokenizer


def make_loader(source, tokenizer, config: DataConfig = DataConfig(), *, batch_size: int,
                layout: LayoutConfig = LayoutConfig(), process_index: int = 0,
                process_count: int = 1, **loader_kwargs) -> tuple[Loader, DataReport]:
    """prepare + Loader in one call: this host's loader and the data report."""
    data, report = prepare(source, load_tokenizer(tokenizer), config, process_index,
                           process_count)
    return Loader(data, batch_size, layout, **loader_kwargs), report


__all__ = [
    "FORMATS", "LAYOUTS", "DataConfig", "DataError", "DataReport", "FormatSpec", "LayoutConfig",
    "Loader", "Record", "Shape", "TokenizeConfig", "TokenizedData", "check_source",
    "detect_format",
    "load_tokenizer", "make_batch", "make_loader", "open_source", "padding_fraction", "prepare",
    "shard_range",
]

"""Preference data: sources -> formats (validate) -> tokenize -> layout -> loader (host shard).

From a source to batches:

    data, report = prepare(source, tokenizer, DataConfig(...), process_index, process_count)
    print(report.summary())
    loader = Loader(data, batch_size, LayoutConfig(kind="packed"), seed=0)
    batch = loader.next_batch()          # numpy dict, the contract in docs/interfaces.md
    state = loader.state_dict()          # goes into the checkpoint; load_state_dict resumes
"""

from prefopt_jax.data.formats import FORMATS, DataError, FormatSpec, Record, detect_format
from prefopt_jax.data.layout import LAYOUTS, LayoutConfig, Shape, make_batch, padding_fraction
from prefopt_jax.data.loader import Loader
from prefopt_jax.data.pipeline import DataConfig, prepare
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
    "Loader", "Record", "Shape", "TokenizeConfig", "TokenizedData", "detect_format",
    "load_tokenizer", "make_batch", "make_loader", "open_source", "padding_fraction", "prepare",
    "shard_range",
]

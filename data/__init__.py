"""ParaRNN-LM data: embedded default corpus/tokenizer and the streaming pipeline.

* ``data/sotu/``            State of the Union addresses (train/validation jsonl.gz), CC0 / PDDL.
* ``data/tokenizer/gpt2/``  GPT-2 byte-level BPE tokenizer files for ``AutoTokenizer``, MIT.
* :mod:`data.pipeline`      config, loading, packing, per-rank sharding, exact resume, validation.
* :mod:`data.packing`       pure-Python packer (``[EOS]+doc``, rows of seq_len+1 overlapping by one).
* :mod:`data.stats`         bytes per token (bits-per-byte) and the unigram-perplexity baseline.

``python -m data`` prints corpus statistics and the packing throughput.
"""
from training.common import REPO_ROOT, ConfigError

from .packing import Row, TokenPacker, collate_rows
from .pipeline import (
    DataConfig,
    DocumentSource,
    PackedStream,
    encode_document,
    load_dataset_call,
    load_tokenizer,
    open_split,
    pack_validation_rows,
    resolve_data_files,
    validation_batches,
)
from .stats import UnigramBaseline, token_byte_lengths, unigram_baseline, unigram_perplexity

__all__ = [
    "REPO_ROOT", "ConfigError", "DataConfig", "DocumentSource", "PackedStream", "Row", "TokenPacker",
    "UnigramBaseline", "collate_rows", "encode_document", "load_dataset_call", "load_tokenizer", "open_split",
    "resolve_data_files", "token_byte_lengths", "unigram_baseline", "unigram_perplexity",
    "pack_validation_rows", "validation_batches",
]

"""SlimPajama data: shard readers, tokenizers, packing into row streams, the sample corpus."""

from dga_jax.data.corpus import build_sample_corpus, default_corpus_dir
from dga_jax.data.pipeline import DataConfig, DataIterator, make_eval_iterator, make_train_iterator
from dga_jax.data.slimpajama import ReadStats, list_shards, parse_record, read_shard
from dga_jax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataIterator",
    "HFTokenizer",
    "ReadStats",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_sample_corpus",
    "default_corpus_dir",
    "list_shards",
    "load_tokenizer",
    "make_eval_iterator",
    "make_train_iterator",
    "parse_record",
    "read_shard",
]

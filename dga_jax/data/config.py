"""The data config: which files, how they are cut into rows, how many rows and workers.

`DataConfig` is checked when it is made (`ConfigError` naming the `config.data` key); the
iterators over it are `dga_jax.data.pipeline`'s.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from dga_jax import strict
from dga_jax.errors import ConfigError

logger = logging.getLogger(__name__)

# The `meta.redpajama_set_name`s of SlimPajama (other data sets in its format may use others).
SLIMPAJAMA_SET_NAMES = (
    "RedPajamaArXiv",
    "RedPajamaBook",
    "RedPajamaC4",
    "RedPajamaCommonCrawl",
    "RedPajamaGithub",
    "RedPajamaStackExchange",
    "RedPajamaWikipedia",
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    - `train` / `validation`: a directory (searched recursively), a glob, or one shard file of
      `.jsonl.zst` / `.jsonl` / `.parquet`. Both unset (None or "") -> the sample corpus,
      built once under `sample_corpus_dir` (default `default_corpus_dir()`); one set without
      the other is a `ConfigError`.
    - `tokenizer`: "byte" or a path (see `load_tokenizer`); `add_bos` / `add_eos` wrap each
      document in its BOS / EOS ids.
    - `set_names`: keep only these `meta.redpajama_set_name`s (empty: all); a name that is not
      one of `SLIMPAJAMA_SET_NAMES` is warned about (a misspelt filter keeps nothing, which
      shows only after reading the whole split).
    - `shuffle_shards`: permute the training shard order per epoch with `seed` (validation is
      always read in sorted order).
    - `num_workers`: Grain worker processes for each JAX process (0: none); it must divide the
      per-process batch.
    - `eval_batches`: batches per evaluation.
    """

    seq_len: int
    global_batch_size: int
    tokenizer: str = "byte"
    train: str | None = None
    validation: str | None = None
    set_names: tuple[str, ...] = ()
    add_bos: bool = True
    add_eos: bool = True
    shuffle_shards: bool = True
    seed: int = 0
    num_workers: int = 0
    eval_batches: int = 8
    sample_corpus_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.set_names, str):
            raise ConfigError(
                f"config.data.set_names must be a sequence of names, got {self.set_names!r}"
            )
        object.__setattr__(self, "set_names", tuple(self.set_names))
        _check_set_names(self.set_names)
        for name in ("train", "validation", "sample_corpus_dir"):
            object.__setattr__(self, name, getattr(self, name) or None)  # ConfigDicts use ""
        if (self.train is None) != (self.validation is None):
            given, missing = ("train", "validation") if self.train else ("validation", "train")
            raise ConfigError(
                f"config.data.{given} is set but config.data.{missing} is not: set both "
                "config.data.train and config.data.validation, or neither for the sample corpus"
            )
        for name, least in _INT_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a positive int" if least == 1 else f"an int >= {least}"
                raise ConfigError(f"config.data.{name} must be {kind}, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Builds a config from plain values; an unknown key or a wrong type is a `ConfigError`."""
        return strict.build(cls, values, "data.")


# The int fields of `DataConfig` and their least values.
_INT_FIELDS = {"seq_len": 1, "global_batch_size": 1, "eval_batches": 1, "num_workers": 0}


def _check_set_names(set_names: tuple[str, ...]) -> None:
    """Names must be non-empty strings (a number never matches a record's set name); names
    SlimPajama does not have are warned about (`RedPajamaGitHub` would keep nothing)."""
    for name in set_names:
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"config.data.set_names must hold non-empty strings, got {name!r} in {set_names}"
            )
    unknown = [name for name in set_names if name not in SLIMPAJAMA_SET_NAMES]
    if unknown:
        logger.warning(
            "config.data.set_names %s: not SlimPajama set names (%s); records of other "
            "data sets must carry them in meta.redpajama_set_name, or nothing is kept",
            unknown,
            ", ".join(SLIMPAJAMA_SET_NAMES),
        )

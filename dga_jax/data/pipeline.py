"""Training and evaluation batches: iterators over this process's rows of a `DataConfig`.

A global batch has `global_batch_size` rows; row `r` at step `s` is window `s` of row stream
`r` (`dga_jax.data.packing`), which depends on neither the number of processes nor of workers.
Process `p` of `n` yields rows `[p * b, (p + 1) * b)` with `b = global_batch_size // n`, so
concatenating the processes' batches in process order gives the global batch.

    it = make_train_iterator(config, process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it)           # {"inputs": int32 [b, seq_len], "targets": int32 [b, seq_len]}
    state = it.get_state()     # small JSON dict; it.set_state(state) resumes exactly
    it.stats                   # ReadStats of this process's rows, e.g. for logging

With no data path configured, both splits come from the sample corpus (`dga_jax.data.corpus`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from dga_jax.data import workers
from dga_jax.data.config import DataConfig
from dga_jax.data.corpus import build_sample_corpus, default_corpus_dir
from dga_jax.data.packing import (
    PackedRowsDataset,
    StreamSpec,
    check_usable,
    initial_row_state,
    load_stream_tokenizer,
)
from dga_jax.data.slimpajama import ReadStats, list_shards
from dga_jax.errors import ConfigError, InputError

logger = logging.getLogger(__name__)


class DataIterator(grain.DatasetIterator):
    """Batches of this process's rows of the global batch; checkpointable.

    `get_state()` is `{"step": int, "rows": {str(row): row state}}`: a few integers per row,
    the same whatever `num_workers` is. `set_state` restarts the row streams from it (and
    Grain's workers, if any). With `num_steps`, the iterator stops after that many batches.
    The workers never see `workers.STOP_SIGNALS`: stopping is the main process's.
    """

    def __init__(
        self,
        spec: StreamSpec,
        rows: Sequence[int],
        *,
        num_workers: int = 0,
        num_steps: int | None = None,
    ):
        super().__init__()
        self._windows: grain.DatasetIterator | None = None
        load_stream_tokenizer(spec)  # fail here, not in a worker, on a bad tokenizer
        if num_workers and len(rows) % num_workers:
            raise ConfigError(
                f"config.data.num_workers={num_workers} must divide the {len(rows)} rows of "
                "this process"
            )
        self._spec = spec
        self._rows = rows
        self._num_workers = num_workers
        self._num_steps = num_steps
        self._step = 0
        self._row_states = {row: initial_row_state() for row in rows}
        # A row's position names a file by its place in the epoch's order, which the seed sets.
        self._order = {
            "shuffle": spec.shuffle_files,
            "seed": spec.seed if spec.shuffle_files else 0,
        }

    def _build_windows(self) -> grain.DatasetIterator:
        """One window per row in turn, from the current row states."""
        rows = grain.MapDataset.source(list(self._rows))
        dataset = PackedRowsDataset(
            rows.to_iter_dataset(grain.ReadOptions(num_threads=0)), self._spec, self._row_states
        )
        if self._num_workers:
            buffer = 2 * len(self._rows) // self._num_workers
            dataset = workers.prefetch(dataset, self._num_workers, buffer)
        return iter(dataset)

    def __next__(self) -> dict[str, np.ndarray]:
        """{"inputs", "targets"}: int32 [b, seq_len], targets = inputs shifted left by one."""
        self._assert_not_closed()
        if self._num_steps is not None and self._step >= self._num_steps:
            self._close_windows()
            raise StopIteration
        if self._windows is None:
            self._windows = self._build_windows()
            # Grain starts its workers in this first call, from threads made in it: they
            # inherit the blocked signals, and keep them blocked for life.
            if self._num_workers:
                with workers.stop_signals_blocked():
                    return self._next_batch()
        return self._next_batch()

    def _next_batch(self) -> dict[str, np.ndarray]:
        windows = []
        for row in self._rows:
            element = next(self._windows)
            if element["row"] != row:
                raise RuntimeError(f"expected a window of row {row}, got row {element['row']}")
            self._row_states[row] = element["state"]
            windows.append(element["tokens"])
        tokens = np.stack(windows)  # [b, seq_len + 1]
        self._step += 1
        return {"inputs": tokens[:, :-1].copy(), "targets": tokens[:, 1:].copy()}

    @property
    def stats(self) -> ReadStats:
        """What this process's rows have read and skipped so far."""
        return sum(
            (ReadStats.from_dict(s["stats"]) for s in self._row_states.values()), ReadStats()
        )

    @functools.cached_property
    def _shards(self) -> dict[str, Any]:
        """The files' `shard_fingerprint`, taken at the first save or resume (it reads every
        shard's size: not at start-up, nor for an evaluation's iterator, which saves none)."""
        return shard_fingerprint(self._spec.files)

    def get_state(self) -> dict[str, Any]:
        """`{"step", "rows", "shards", "order"}`: JSON-serialisable, a few integers per row, the
        fingerprint of the shard list the rows' positions index (`shard_fingerprint`) and the
        file order (shuffled or not, with which seed) they index it in."""
        rows = {str(row): state for row, state in self._row_states.items()}
        return {"step": self._step, "rows": rows, "shards": self._shards, "order": self._order}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from a `get_state()` of an iterator over the same rows and shard files in the
        same order (a state from before shards or orders were recorded is taken as it is)."""
        self._check_same_files(state)
        rows = {int(row): row_state for row, row_state in state["rows"].items()}
        if sorted(rows) != list(self._rows):
            raise ValueError(
                f"iterator state holds rows {sorted(rows)}, this process has {list(self._rows)}; "
                "resume with the same global_batch_size and process_count"
            )
        self._close_windows()
        self._row_states = rows
        self._step = int(state["step"])

    def _check_same_files(self, state: dict[str, Any]) -> None:
        """An `InputError` unless `state`'s positions index this iterator's files and order."""
        saved = state.get("shards")  # its keys only: older states hold no sizes
        if saved is not None and any(self._shards.get(k) != v for k, v in saved.items()):
            raise InputError(
                f"config.data.{self._spec.split}: the shard files changed since this position "
                f"was saved ({saved['count']} files then, {self._shards['count']} now, or other "
                "names or sizes): it indexes the old list. Resume with the same files, or start "
                "a new run (--config.init_checkpoint for the weights)"
            )
        order = state.get("order")
        if order is not None and order != self._order:
            raise InputError(
                f"config.data.{self._spec.split}: the position was saved with shuffle_shards="
                f"{order['shuffle']}, seed={order['seed']}, not shuffle_shards="
                f"{self._order['shuffle']}, seed={self._order['seed']}: it would resume in "
                "other files, re-reading some and skipping others. Resume with the saved "
                "order (DataConfig's seed and shuffle_shards; config.data.seed in training), or "
                "start a new run (--config.init_checkpoint for the weights)"
            )

    def close(self) -> None:
        """Stops Grain's workers, if any."""
        self._close_windows()
        super().close()

    def _close_windows(self) -> None:
        if self._windows is not None:
            self._windows.close()
            self._windows = None


def make_train_iterator(
    config: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    rows: Sequence[int] | None = None,
) -> DataIterator:
    """The endless training stream (epochs follow each other) for one process.

    The process yields `rows` of the global batch (sorted global row indices; e.g. those its
    devices address when sequences are sharded across hosts), by default its contiguous share
    `[p * b, (p + 1) * b)`. Every process (and each of its Grain workers) scans all training
    shards, decompressing and splitting lines, but parses and tokenizes only its rows' records.
    """
    spec = _stream_spec(config, "train", shuffle=config.shuffle_shards)
    rows = (
        _check_rows(config, rows)
        if rows is not None
        else _process_rows(config, process_index, process_count)
    )
    return DataIterator(spec, rows, num_workers=config.num_workers)


def make_eval_iterator(
    config: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    rows: Sequence[int] | None = None,
) -> DataIterator:
    """`config.eval_batches` batches of the validation split, the same on every call.

    The validation shards are read in sorted order from the start; if they hold fewer tokens
    than the steps need, they are read again (as the training stream does). `rows` as for
    `make_train_iterator`.
    """
    spec = _stream_spec(config, "validation", shuffle=False)
    rows = (
        _check_rows(config, rows)
        if rows is not None
        else _process_rows(config, process_index, process_count)
    )
    return DataIterator(spec, rows, num_workers=config.num_workers, num_steps=config.eval_batches)


def check_split(config: DataConfig, split: str) -> None:
    """An `InputError` naming `config.data.<split>` unless that split ("train" or "validation")
    holds a usable document: what its iterators would raise at their first batch, found before
    a run compiles and trains. Reads up to the first usable document."""
    check_usable(_stream_spec(config, split, shuffle=False))


def _check_rows(config: DataConfig, rows: Sequence[int]) -> tuple[int, ...]:
    rows = tuple(int(r) for r in rows)
    if (
        not rows
        or list(rows) != sorted(set(rows))
        or not 0 <= rows[0] <= rows[-1] < (config.global_batch_size)
    ):
        raise ValueError(
            f"rows must be sorted, distinct and in [0, data.global_batch_size="
            f"{config.global_batch_size}), got {rows}"
        )
    return rows


def _process_rows(config: DataConfig, process_index: int, process_count: int) -> range:
    if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if config.global_batch_size % process_count:
        raise ConfigError(
            f"config.data.global_batch_size={config.global_batch_size} must be a multiple of "
            f"process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    per_process = config.global_batch_size // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


def _stream_spec(config: DataConfig, split: str, *, shuffle: bool) -> StreamSpec:
    return StreamSpec(
        files=tuple(_shards(config, split)),
        tokenizer=config.tokenizer,
        seq_len=config.seq_len,
        num_rows=config.global_batch_size,
        split=split,
        add_bos=config.add_bos,
        add_eos=config.add_eos,
        set_names=config.set_names,
        shuffle_files=shuffle,
        seed=config.seed,
    )


def _shards(config: DataConfig, split: str) -> list[str]:
    """The shard files of `split` ("train" or "validation"); the sample corpus's if unset."""
    pattern = getattr(config, split)
    if pattern is not None:
        return list_shards(pattern)
    corpus = build_sample_corpus(config.sample_corpus_dir or default_corpus_dir())
    logger.info(
        "No %s data path configured: using the sample corpus built from the Python standard "
        "library at %s",
        split,
        corpus,
    )
    return list_shards(str(corpus / split))


def shard_fingerprint(files: Sequence[str]) -> dict[str, Any]:
    """{"count", "sha256", "sizes_sha256"} of the shard paths, relative to their common
    directory, and of their sizes in bytes: a data set moved or copied whole keeps it, another
    one with the same file names does not. A saved position indexes this list, so a resume must
    find it again."""
    root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
    names = "\n".join(os.path.relpath(f, root) for f in files)
    sizes = ",".join(str(os.path.getsize(f)) for f in files)
    return {"count": len(files), "sha256": _sha256(names), "sizes_sha256": _sha256(sizes)}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()

"""Row streams: one global document order, dealt to `num_rows` rows, packed into windows.

The stream of a split is defined without reference to processes or workers, so any split of
its rows among them yields the same global batches:

- epoch `e` orders the shard files (sorted, or a seeded per-epoch permutation of them); records
  are numbered in file order, epoch after epoch without restarting: with `N` records an epoch,
  epoch `e` holds records `e * N` to `(e + 1) * N - 1`. A broken shard's `CorruptShard` takes
  one number. Epochs follow each other forever.
- record `g` belongs to row stream `g % num_rows`. Rows thus take the records in turn across
  epochs, and every row gets records even when a split has fewer than `num_rows` of them.
- a row stream turns its good documents into `[BOS] + ids + [EOS]` (as configured), joins them
  into one token stream and cuts that into consecutive windows of `seq_len + 1` tokens: no token
  is lost or repeated between two windows, and documents run on across window boundaries.

Global batch row `r` at step `s` is window `s` of row stream `r`. The state of a row stream is
a small JSON dict: the `Cursor` of its current (or next) record, the tokens of that record it
has already emitted (`offset`), and its `ReadStats`.

A row that reads through a whole epoch without a usable document checks that it can ever be
dealt one (`EpochCensus`) and raises an `InputError` if not, rather than read on forever.

`RowStreams` runs several rows on one sequential scan of the shards: every process (and every
worker) decompresses and splits all shard files, but parses and tokenizes only the records of
its own rows. Records of a row that is behind the others wait, unparsed, in its queue of at
most `queue_bytes`; a row whose queue overflows reads on with a scan of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from dga_jax.data.census import EpochCensus
from dga_jax.data.slimpajama import RawRecord, ReadStats, iter_raw_records, parse_record
from dga_jax.data.tokenizers import Tokenizer, load_tokenizer
from dga_jax.errors import ConfigError, MissingInputError

logger = logging.getLogger(__name__)
PREFLIGHT_REPORT = 10_000  # records `check_usable` reads before it first says it found none

RowState = dict[str, Any]
# Bytes of raw records a row stream may hold back (see `RowStreams` for the memory bound): about
# 700 SlimPajama records, far more than rows drift apart in a run of thousands of steps, so rows
# rarely pay for a private scan.
QUEUE_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """Everything that defines the row streams of one split; workers rebuild them from it."""

    files: tuple[str, ...]
    tokenizer: str
    seq_len: int
    num_rows: int
    split: str  # "train", "validation", ...: names the split in errors
    add_bos: bool = True
    add_eos: bool = True
    set_names: tuple[str, ...] = ()
    shuffle_files: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True, order=True)
class Cursor:
    """Record number `record` (counted across epochs), which lies in epoch `epoch`; ordered by
    (epoch, record). The record lies in (or after) file `file` of that epoch's order, whose
    first record is number `file_start`: hints that let a restart skip the earlier files."""

    epoch: int = 0
    record: int = 0
    file: int = dataclasses.field(default=0, compare=False)
    file_start: int = dataclasses.field(default=0, compare=False)

    def following(self) -> Cursor:
        """The next record number (which may lie in a later file or epoch)."""
        return dataclasses.replace(self, record=self.record + 1)


def initial_row_state() -> RowState:
    """State of a row stream that has not started."""
    return {"cursor": dataclasses.asdict(Cursor()), "offset": 0, "stats": ReadStats().as_dict()}


def load_stream_tokenizer(spec: StreamSpec) -> Tokenizer:
    """The tokenizer of `spec`, checked to have the BOS/EOS tokens that `spec` adds."""
    tokenizer = load_tokenizer(spec.tokenizer)
    for wanted, name in ((spec.add_bos, "bos"), (spec.add_eos, "eos")):
        if wanted and getattr(tokenizer, f"{name}_id") is None:
            raise ConfigError(
                f"config.data.tokenizer {spec.tokenizer!r} has no {name.upper()} token to add: "
                f"set config.data.add_{name}=False"
            )
    return tokenizer


def file_order(spec: StreamSpec, epoch: int) -> tuple[str, ...]:
    """The shard files of `epoch`: sorted, or permuted by a hash of (seed, epoch, position)."""
    if not spec.shuffle_files:
        return spec.files

    def rank(position: int) -> bytes:
        return hashlib.sha256(f"{spec.seed}:{epoch}:{position}".encode()).digest()

    return tuple(spec.files[i] for i in sorted(range(len(spec.files)), key=rank))


def scan(spec: StreamSpec, start: Cursor) -> Iterator[tuple[Cursor, RawRecord]]:
    """Every raw record from `start` on, with its cursor, across epochs without end."""
    epoch, first_file, index = start.epoch, start.file, start.file_start
    while True:
        files, epoch_start = file_order(spec, epoch), index
        for file in range(first_file, len(files)):
            file_start = index
            for raw in iter_raw_records(files[file]):
                if (epoch, index) >= (start.epoch, start.record):
                    yield Cursor(epoch, index, file, file_start), raw
                index += 1
        if first_file == 0 and index == epoch_start:
            raise MissingInputError(
                f"config.data.{spec.split}: no records in any of the {len(files)} shards, "
                f"e.g. {files[0]!r}"
            )
        epoch, first_file = epoch + 1, 0


def check_usable(spec: StreamSpec) -> None:
    """Raises the error a row stream of `spec` would (`MissingInputError` with no records, else
    `EpochCensus.unusable_error`) unless some record is a usable document. Reads up to the first
    usable one: the whole split only when none is, saying so at 10K, 20K, 40K... records read
    (records of another schema, or a `set_names` no record has, read a large split whole)."""
    tokenizer, stats, report = load_stream_tokenizer(spec), ReadStats(), PREFLIGHT_REPORT
    for cursor, raw in scan(spec, Cursor()):
        if cursor.epoch:
            no_document = EpochCensus(records=cursor.record, stats=stats, period=1, reachable=0)
            raise no_document.unusable_error(spec, row=0)
        if cursor.record == report:
            logger.warning(
                "config.data.%s: no usable document in its first %d records yet (%s); reading on",
                spec.split,
                report,
                ", ".join(f"{n} {name}" for name, n in stats.as_dict().items() if n),
            )
            report *= 2
        record = parse_record(raw, stats=stats, set_names=spec.set_names)
        if record is not None and len(document_tokens(tokenizer, spec, record["text"])):
            return


def document_tokens(tokenizer: Tokenizer, spec: StreamSpec, text: str) -> np.ndarray:
    """A document as its row stream holds it: `[BOS] + ids + [EOS]` as `spec` adds them."""
    bos = [tokenizer.bos_id] if spec.add_bos else []
    eos = [tokenizer.eos_id] if spec.add_eos else []
    return np.asarray(bos + tokenizer.encode(text) + eos, np.int32)


def _size(raw: RawRecord) -> int:
    """Bytes a raw record holds (its text, for a parquet row)."""
    if isinstance(raw, bytes):
        return len(raw)
    if isinstance(raw, dict):
        return len(str(raw.get("text", "")))
    return 0  # a CorruptShard or LongLine marker


class _Row:
    """Mutable state of one row stream."""

    def __init__(self, state: RowState):
        self.cursor = Cursor(**state["cursor"])
        self.offset = int(state["offset"])
        self.stats = ReadStats.from_dict(state["stats"])
        self.tokens: np.ndarray | None = None  # of the record at `cursor`, once loaded
        # Records of this row that the shared scan passed, in order.
        self.queue: collections.deque[tuple[Cursor, RawRecord]] = collections.deque()
        self.queued_bytes = 0
        # The first record the shared scan dropped because the queue was full; the shared scan
        # then deals this row nothing more, and it reads on from here with `own_scan`.
        self.dropped: Cursor | None = None
        self.own_scan: Iterator[tuple[Cursor, RawRecord]] | None = None

    def state(self) -> RowState:
        cursor = dataclasses.asdict(self.cursor)
        return {"cursor": cursor, "offset": self.offset, "stats": self.stats.as_dict()}


class RowStreams:
    """Several row streams of one split, fed by one scan that starts at the earliest of them.

    Memory is bounded whatever the document lengths. Only `_deal` queues, and only while a row's
    queue holds less than `queue_bytes`: the first record that finds it full is dropped and
    remembered, and the shared scan deals that row nothing more. The row drains its queue, then
    reads on from the dropped record with a private scan that keeps none of the others' records.
    So a row holds less than `queue_bytes` plus one record, plus the read buffers of one open
    shard for the shared scan and one per private scan. Nothing changes in what a row reads: its
    queue holds its records in order up to the dropped one, and its private scan yields the rest
    in order, so its windows are those it would have alone. The price of a private scan is that
    it decompresses every record again for one row.
    """

    def __init__(
        self, spec: StreamSpec, states: Mapping[int, RowState], *, queue_bytes: int = QUEUE_BYTES
    ):
        if queue_bytes < 1:
            raise ValueError(f"queue_bytes must be >= 1, got {queue_bytes}")
        self._spec = spec
        self._queue_bytes = queue_bytes
        self._rows = {row: _Row(state) for row, state in states.items()}
        self._tokenizer = load_stream_tokenizer(spec)
        self._census: EpochCensus | None = None  # taken once a row goes an epoch without a document
        start = min(row.cursor for row in self._rows.values())
        self._records = scan(spec, start)

    def state(self, row: int) -> RowState:
        """JSON-serialisable state of `row`, from which `RowStreams` resumes it exactly."""
        return self._rows[row].state()

    def next_window(self, row: int) -> np.ndarray:
        """The next `seq_len + 1` tokens of `row`: int32 [seq_len + 1]."""
        state = self._rows[row]
        pieces, needed = [], self._spec.seq_len + 1
        while needed:
            if state.tokens is None:
                self._load_document(row)
            piece = state.tokens[state.offset : state.offset + needed]
            pieces.append(piece)
            state.offset += len(piece)
            needed -= len(piece)
            if state.offset == len(state.tokens):
                state.tokens, state.cursor, state.offset = None, state.cursor.following(), 0
        return np.concatenate(pieces)

    def _load_document(self, row: int) -> None:
        """Moves `row` to its next good document and tokenizes it; keeps a restored offset."""
        state = self._rows[row]
        # A restored offset > 0 means its record was read and counted before the restart.
        recounted = state.offset > 0
        first_epoch = state.cursor.epoch
        while True:
            cursor, raw = self._next_record(row)
            if cursor.epoch > first_epoch + 1:  # a whole epoch went by without a document
                self._check_can_be_dealt_a_document(row)
            stats, recounted = (ReadStats() if recounted else state.stats), False
            record = parse_record(raw, stats=stats, set_names=self._spec.set_names)
            tokens = None if record is None else self._tokenize(record["text"])
            if tokens is not None and len(tokens) > state.offset:
                state.cursor, state.tokens = cursor, tokens
                return
            state.cursor, state.offset = cursor.following(), 0

    def _check_can_be_dealt_a_document(self, row: int) -> None:
        """Raises if `row` will never be dealt a usable document, from a census of one epoch."""
        if self._census is None:
            self._census = EpochCensus.take(self._spec, self._tokenize)
        if not self._census.can_deal(row):
            raise self._census.unusable_error(self._spec, row)

    def _next_record(self, row: int) -> tuple[Cursor, RawRecord]:
        """Pops the next record of `row`: from its queue, else its own scan or the shared one."""
        state = self._rows[row]
        if not state.queue and state.dropped is not None:
            if state.own_scan is None:
                state.own_scan = self._own_records(row, state.dropped)
            return next(state.own_scan)
        while not state.queue:
            self._deal(*next(self._records))
        cursor, raw = state.queue.popleft()
        state.queued_bytes -= _size(raw)
        return cursor, raw

    def _deal(self, cursor: Cursor, raw: RawRecord) -> None:
        """Queues a record of the shared scan for its row, or drops it if that queue is full."""
        owner = self._rows.get(cursor.record % self._spec.num_rows)
        if owner is None or owner.dropped is not None or cursor < owner.cursor:
            return
        if owner.queued_bytes < self._queue_bytes:
            owner.queue.append((cursor, raw))
            owner.queued_bytes += _size(raw)
        else:
            owner.dropped = cursor

    def _own_records(self, row: int, start: Cursor) -> Iterator[tuple[Cursor, RawRecord]]:
        """The records of `row` from `start` on, from a scan of its own."""
        rows = self._spec.num_rows
        return (item for item in scan(self._spec, start) if item[0].record % rows == row)

    def _tokenize(self, text: str) -> np.ndarray:
        return document_tokens(self._tokenizer, self._spec, text)


class PackedRowsDataset(grain.IterDataset):
    """Windows of the row streams whose ids `parent` yields: one window per row, rows in turn.

    Elements are `{"row": int, "tokens": int32 [seq_len + 1], "state": RowState}`, the state
    being the row's state just after that window. Row ids come from a `MapDataset`, so Grain's
    `mp_prefetch` deals them out to its workers.
    """

    def __init__(self, parent: grain.IterDataset, spec: StreamSpec, states: Mapping[int, RowState]):
        super().__init__(parent)
        self._spec = spec
        self._states = dict(states)

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self._spec, self._states)

    def __str__(self) -> str:
        return f"PackedRowsDataset(seq_len={self._spec.seq_len}, num_rows={self._spec.num_rows})"


class _PackedRowsIterator(grain.DatasetIterator):
    def __init__(
        self, parent: grain.DatasetIterator, spec: StreamSpec, states: Mapping[int, RowState]
    ):
        super().__init__(parent)
        self._spec = spec
        self._initial_states = states
        self._rows: list[int] = []
        self._streams: RowStreams | None = None
        self._next = 0

    def _started(self) -> RowStreams:
        if self._streams is None:
            self._rows = [int(row) for row in self._parent]
            if not self._rows:
                raise ValueError("PackedRowsDataset got no rows")
            states = {row: self._initial_states[row] for row in self._rows}
            self._streams = RowStreams(self._spec, states)
        return self._streams

    def __next__(self) -> dict[str, Any]:
        self._assert_not_closed()
        streams = self._started()
        row = self._rows[self._next]
        tokens = streams.next_window(row)
        self._next = (self._next + 1) % len(self._rows)
        return {"row": row, "tokens": tokens, "state": streams.state(row)}

    def get_state(self) -> dict[str, Any]:
        streams = self._started()
        return {"rows": {str(row): streams.state(row) for row in self._rows}, "next": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self._started()
        rows = {int(row): row_state for row, row_state in state["rows"].items()}
        if sorted(rows) != sorted(self._rows):
            raise ValueError(f"state is for rows {sorted(rows)}, this iterator has {self._rows}")
        self._streams = RowStreams(self._spec, rows)
        self._next = int(state["next"])

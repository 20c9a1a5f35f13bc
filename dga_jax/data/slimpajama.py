"""SlimPajama shards: find them, read their records, and count what had to be skipped.

A shard is a `*.jsonl.zst` (SlimPajama-627B), `*.jsonl` or `*.parquet` (SlimPajama-6B) file of
records `{"text": str, "meta": {"redpajama_set_name": str, ...}}`; in parquet `meta` is a struct
or a JSON string, and extra columns such as `__index_level_0__` are ignored.

Reading is two steps so that a caller can skip records cheaply: `iter_raw_records` yields each
record unparsed (a JSON line as bytes, a parquet row as a dict) and `parse_record` validates
one. Bad data is never fatal: a malformed line, a line longer than `MAX_LINE_BYTES` (dropped as
it is read: a file without newlines is one line), a record without a string `text`, and a shard
that breaks off (truncated or corrupt zstd/parquet) are skipped and counted in `ReadStats`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Collection, Iterable, Iterator
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from dga_jax.data.tokenizers import encodable
from dga_jax.errors import InputError, MissingInputError

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".jsonl.zst", ".jsonl", ".parquet")
SET_NAME_KEY = "redpajama_set_name"
READ_CHUNK_BYTES = 1 << 20
# Longer lines are skipped as `malformed`, never held whole (64 MiB: ~16M tokens of text).
MAX_LINE_BYTES = 64 << 20
# Compressed bytes per decompression call: zstd's densest block (RLE, ~32,768:1) lets 1 KiB
# expand to at most 32 MiB, where a whole read chunk of zeros came out as 32 GiB at once.
# About as fast on text (50 MiB of JSON lines: 65 ms against 62 in 1 MiB calls).
ZSTD_FEED_BYTES = 1 << 10
PARQUET_BATCH_ROWS = 256
READ_ERRORS = (OSError, zstandard.ZstdError, pa.ArrowException)


@dataclasses.dataclass
class ReadStats:
    """Counters of one reader: documents passed on, and records skipped by reason.

    `corrupt_shards` counts shards that broke off (truncated or undecodable); the records
    before the break are still read.
    """

    documents: int = 0
    malformed: int = 0
    no_text: int = 0
    filtered: int = 0
    corrupt_shards: int = 0

    @property
    def skipped(self) -> int:
        """Records and shards skipped, whatever the reason."""
        return self.malformed + self.no_text + self.filtered + self.corrupt_shards

    def as_dict(self) -> dict[str, int]:
        """The counters as a JSON-serialisable dict (for logs and iterator state)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, counts: dict[str, int]) -> ReadStats:
        """Inverse of `as_dict`."""
        return cls(**counts)

    def __add__(self, other: ReadStats) -> ReadStats:
        mine, theirs = self.as_dict(), other.as_dict()
        return ReadStats(**{key: mine[key] + theirs[key] for key in mine})


@dataclasses.dataclass(frozen=True)
class CorruptShard:
    """Stands for the unreadable rest of a shard in a stream of raw records."""

    path: str
    error: str


@dataclasses.dataclass(frozen=True)
class LongLine:
    """Stands for a line longer than `MAX_LINE_BYTES` in a stream of raw records (its bytes were
    dropped as they were read)."""

    path: str
    size: int  # bytes, the newline not counted


RawRecord = bytes | dict[str, Any] | CorruptShard | LongLine


class TruncatedShardError(IOError):
    """A zstd stream that ends inside a frame."""


def list_shards(pattern: str) -> list[str]:
    """Sorted shard paths under a directory (recursively), of one file, or matching a glob.

    Only files ending in `SHARD_SUFFIXES` are kept; hidden files and directories are skipped.
    A directory's symlinked sub-directories are followed (each real directory once), as a
    glob's `**` does; each file is listed once, under its shortest path. An existing file is
    taken as it is, even if its path looks like a glob.
    """
    if os.path.isdir(pattern):
        paths = list(_walk_visible_files(pattern))
    elif os.path.isfile(pattern):
        paths = [pattern]
    else:
        paths = [path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path)]
    shards = _each_file_once([path for path in paths if path.endswith(SHARD_SUFFIXES)])
    if not shards:
        raise MissingInputError(f"no {'/'.join(SHARD_SUFFIXES)} shards found at {pattern!r}")
    return shards


def _each_file_once(paths: list[str]) -> list[str]:
    """`paths`, sorted, with each file once, under its shortest path (the fewest directories,
    then the first in order): a `**` glob follows links to directories, loops included, so a
    linked data set would be read twice."""
    first: dict[str, str] = {}
    for path in sorted(paths, key=lambda path: (path.count(os.sep), path)):
        first.setdefault(os.path.realpath(path), path)
    return sorted(first.values())


def _walk_visible_files(directory: str) -> Iterator[str]:
    """Visible files under `directory`, through symlinks; a directory reached twice (a second
    link to it, or a link loop) is read the first time only, in sorted (so stable) order. A
    directory that cannot be listed is an `InputError` (`os.walk` would leave it out)."""
    seen = set()
    for root, dirs, names in os.walk(directory, onerror=_unlistable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        yield from (os.path.join(root, name) for name in names if not name.startswith("."))


def _unlistable(error: OSError) -> None:
    raise InputError(
        f"cannot list shard directory {error.filename!r}: {error.strerror or error}"
    ) from error


def iter_raw_records(path: str) -> Iterator[RawRecord]:
    """Unparsed records of one shard in file order; a break ends it with one `CorruptShard`.

    Blank lines are not records. A truncated zstd stream loses its last, partial line.
    """
    records = _records(path)
    while True:
        # Only the reading is guarded: a consumer closing this generator is not an error.
        try:
            raw = next(records)
        except StopIteration:
            return
        except READ_ERRORS as error:
            yield CorruptShard(path, f"{type(error).__name__}: {error}")
            return
        yield raw


def _records(path: str) -> Iterator[RawRecord]:
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    with open(path, "rb") as f:
        yield from _lines(_zstd_chunks(f) if path.endswith(".zst") else _file_chunks(f), path)


def _file_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(READ_CHUNK_BYTES):
        yield chunk


def _zstd_chunks(f: BinaryIO) -> Iterator[bytes]:
    """Decompressed bytes of every zstd frame in `f`; raises if the last frame is cut off."""
    context = zstandard.ZstdDecompressor()
    frame = context.decompressobj()
    in_frame = False
    for chunk in _file_chunks(f):
        for start in range(0, len(chunk), ZSTD_FEED_BYTES):
            piece = chunk[start : start + ZSTD_FEED_BYTES]
            while piece:
                yield frame.decompress(piece)
                in_frame, piece = not frame.eof, (frame.unused_data if frame.eof else b"")
                if not in_frame:
                    frame = context.decompressobj()
    if in_frame:
        raise TruncatedShardError("zstd stream ends inside a frame")


def _lines(chunks: Iterable[bytes], path: str) -> Iterator[bytes | LongLine]:
    """The non-blank lines of the byte stream `chunks` (of the file `path`); a line longer than
    `MAX_LINE_BYTES` is one `LongLine`, its bytes dropped as they arrive."""
    # The pieces of a line that spans chunks are joined once it ends: re-joining the unfinished
    # line at every chunk took quadratic time (minutes for a 1 GB line, a file without newlines).
    partial: list[bytes] | None = []  # None once the line is too long: the rest is dropped
    size = 0  # bytes of the line so far
    for chunk in chunks:
        *ends, tail = chunk.split(b"\n")
        for end in ends:
            yield from _finished_line(partial, end, size + len(end), path)
            partial, size = [], 0
        size += len(tail)
        if partial is not None and size <= MAX_LINE_BYTES:
            partial.append(tail)
        else:
            partial = None
    yield from _finished_line(partial, b"", size, path)


def _finished_line(
    partial: list[bytes] | None, end: bytes, size: int, path: str
) -> Iterator[bytes | LongLine]:
    """The line of the pieces `partial` and `end` (`size` bytes) unless it is blank."""
    if size > MAX_LINE_BYTES:
        yield LongLine(path, size)
        return
    line = b"".join([*partial, end])
    if line and not line.isspace():
        yield line


def _parquet_rows(path: str) -> Iterator[dict[str, Any]]:
    with pq.ParquetFile(path) as shard:
        columns = [name for name in ("text", "meta") if name in shard.schema_arrow.names]
        for batch in shard.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()


def parse_record(
    raw: RawRecord, *, stats: ReadStats, set_names: Collection[str] = ()
) -> dict[str, Any] | None:
    """`{"text", "meta"}` of a good record, or None after counting why it was skipped.

    `meta` comes back as a dict whether it was stored as an object or as a JSON string. With
    `set_names`, records whose `meta.redpajama_set_name` is not among them are `filtered`.
    """
    if isinstance(raw, CorruptShard):
        stats.corrupt_shards += 1
        logger.warning("Skipping the rest of shard %s: %s", raw.path, raw.error)
        return None
    if isinstance(raw, LongLine):
        stats.malformed += 1
        logger.warning(
            "Skipping a line of %d bytes in %s: longer than the %d a record may have (a file "
            "without newlines?)",
            raw.size,
            raw.path,
            MAX_LINE_BYTES,
        )
        return None
    record = _as_object(raw)
    meta = _as_object(record.get("meta") or {}) if record is not None else None
    if record is None or meta is None:
        stats.malformed += 1
        return None
    text = record.get("text")
    if not isinstance(text, str) or not text:
        stats.no_text += 1
        return None
    if set_names and meta.get(SET_NAME_KEY) not in set_names:
        stats.filtered += 1
        return None
    stats.documents += 1
    return {"text": encodable(text), "meta": meta}


def _as_object(value: Any) -> dict[str, Any] | None:
    """A dict as is; JSON bytes or str decoded to a dict; anything else None."""
    if isinstance(value, dict):
        return value
    if isinstance(value, bytes):  # "-sig": a file saved with a byte order mark keeps line 1
        value = value.decode("utf-8-sig", "replace")
    if not isinstance(value, str):
        return None
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the stack
        return None
    return decoded if isinstance(decoded, dict) else None


def read_shard(
    path: str, *, stats: ReadStats | None = None, set_names: Collection[str] = ()
) -> Iterator[dict[str, Any]]:
    """Good records `{"text", "meta"}` of one shard in file order; skips are counted in `stats`."""
    stats = ReadStats() if stats is None else stats
    for raw in iter_raw_records(path):
        record = parse_record(raw, stats=stats, set_names=set_names)
        if record is not None:
            yield record

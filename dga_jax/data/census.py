"""Which rows of a split can ever be dealt a usable document: a census of one epoch.

A row stream that reads a whole epoch without a usable document (`packing.RowStreams`) takes one,
and raises its `unusable_error` if the row never can be dealt one, rather than read on forever.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from dga_jax.data.slimpajama import ReadStats, iter_raw_records, parse_record
from dga_jax.errors import InputError

if TYPE_CHECKING:
    from dga_jax.data.packing import StreamSpec


@dataclasses.dataclass(frozen=True)
class EpochCensus:
    """What one epoch of a split holds, and which rows can ever be dealt a usable document.

    Row `r` gets epoch position `p` of epoch `e` iff `e * N + p = r (mod num_rows)`; as `e` runs
    on, `e * N` takes every multiple of `period = gcd(N, num_rows)`, so the row gets `p` in some
    epoch iff `p = r (mod period)`. Record `i` of a shard lies at `p = start + i`, where `start`
    counts the records of the shards before it: fixed in sorted order; with shuffled files, the
    records of any subset of the other shards. Rows for which no usable record can lie at such
    a place will never get one; others may (with shuffled files: in some later file order).
    """

    records: int  # N, the records of an epoch
    stats: ReadStats  # of the records of one epoch
    period: int
    reachable: int  # bit k set: rows r = k (mod period) can be dealt a usable document

    @classmethod
    def take(cls, spec: StreamSpec, tokenize: Callable[[str], np.ndarray]) -> EpochCensus:
        """Reads every record of one epoch; usable ones parse and `tokenize` to some tokens."""
        stats, sizes, usable = ReadStats(), [], []
        for path in spec.files:
            sizes.append(0)
            usable.append([])
            for raw in iter_raw_records(path):
                record = parse_record(raw, stats=stats, set_names=spec.set_names)
                if record is not None and len(tokenize(record["text"])):
                    usable[-1].append(sizes[-1])
                sizes[-1] += 1
        period = math.gcd(sum(sizes), spec.num_rows)
        reachable = 0
        for starts, indices in zip(_shard_starts(spec, sizes, period), usable, strict=True):
            for index in indices:
                reachable |= _rotate(starts, index, period)
        return cls(sum(sizes), stats, period, reachable)

    def can_deal(self, row: int) -> bool:
        """Whether row `row` can ever be dealt a usable document."""
        return bool(self.reachable >> (row % self.period) & 1)

    def unusable_error(self, spec: StreamSpec, row: int) -> InputError:
        """The error for `row`, which `can_deal` says never gets a usable document."""
        counts = ", ".join(f"{n} {name}" for name, n in self.stats.as_dict().items() if n)
        place = f"config.data.{spec.split}: the {spec.split!r} split"
        epoch = f"its {self.records} records an epoch are {counts}"
        if not self.reachable:
            return InputError(
                f"{place} has no usable document ({epoch}); is config.data.set_names="
                f"{spec.set_names} too strict, or are the records unreadable?"
            )
        return InputError(
            f"{place} can never deal row {row} of its {spec.num_rows} rows a usable document "
            f"({epoch}): record g goes to row g % {spec.num_rows}, and no usable record can "
            "ever fall to that row; fix the unusable records or use another global batch size"
        )


def _shard_starts(spec: StreamSpec, sizes: list[int], period: int) -> list[int]:
    """Per shard, a bitmask of the places (mod `period`) at which it can start in an epoch."""
    if not spec.shuffle_files:
        return [1 << (start % period) for start in itertools.accumulate([0, *sizes[:-1]])]
    counts = collections.Counter(size % period for size in sizes)
    others = {r: _subset_sums(counts - collections.Counter([r]), period) for r in counts}
    return [others[size % period] for size in sizes]


def _subset_sums(counts: Mapping[int, int], period: int) -> int:
    """Bitmask of the sums (mod `period`) of sub-multisets of `counts` (residue -> how many)."""
    sums, every = 1, (1 << period) - 1
    for residue, count in counts.items():
        if sums == every:
            break
        for _ in range(count):
            grown = sums | _rotate(sums, residue, period)
            if grown == sums:  # more of this residue adds nothing either
                break
            sums = grown
    return sums


def _rotate(mask: int, shift: int, width: int) -> int:
    """The bits of `mask` moved up by `shift` places, cyclically within `width` bits."""
    shift %= width
    return ((mask << shift) | (mask >> (width - shift))) & ((1 << width) - 1)

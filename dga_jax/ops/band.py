"""The band's windows: the contiguous run of band entries each query sub-block reads.

Band entries (`ranges.Entries`) are sorted by `start` with non-decreasing `until`, and at most
`band_lag` entries that start before a position t are still visible at t. A sub-block of S
consecutive queries then sees only entries inside one window of fewer than S + band_lag entries,
from the first one still visible to its first query (`ranges.band_ranges`). The XLA walk
(`dga_jax.ops.intervals`) reads each window with one gather and adds its gradients back the
same way. A periodic band (`BandBounds.period`: one entry per position, each visible to the rest
of its own period of P positions only) is read by period instead: a query block of whole
periods takes its own entries, a slice, P per query (`take_periods`, `add_periods`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dga_jax.ops.ranges import Entries
from dga_jax.ops.tiles import Tile, add_slice, round_up

# Windows are a multiple of 8 entries wide. 16 (64 instead of 56 at DGA's band lag of 17 in
# 32-query sub-blocks) ran the band walk's small matmuls 1.2-1.3x faster alone on XLA:CPU, but
# the whole call no faster (streaming, L=16K, H=8, D=128: forward 0.98x, fwd+bwd 0.96x).
WINDOW_MULTIPLE = 8


def band_rows(block_q: int, block_band: int, band_lag: int) -> int:
    """Queries per band sub-block: a divisor of block_q, at most block_band, else the power of
    two at or above band_lag + 1 (at least 8)."""
    wanted = max(8, 1 << max(band_lag, 0).bit_length())
    return math.gcd(block_q, min(block_band, wanted))


def window_width(rows: int, band_lag: int, n_band: int | None) -> int:
    """Entries per window of a sub-block of `rows` queries: rows + band_lag rounded up to
    `WINDOW_MULTIPLE`, at most the band's `n_band` entries rounded up to 8 (a wider window would
    only read padding; None: no band)."""
    width = round_up(rows + band_lag, WINDOW_MULTIPLE)
    return width if n_band is None else min(width, round_up(max(n_band, 1), 8))


def window_chunk(width: int, block_k: int) -> tuple[int, int]:
    """(chunk, width): a window wider than two prefix tiles is read `block_k` entries at a time
    (its width rounded up to whole chunks, the softmax carried across them), so a wide band (a
    sliding window of thousands of keys) runs in tiles the size of the prefix walk's, not in one
    [rows, width] tile per sub-block; a narrower one is one chunk."""
    if width <= 2 * block_k:
        return width, width
    return block_k, round_up(width, block_k)


def split_rows(x: jax.Array, sub_blocks: int) -> jax.Array:
    """[BH, R, ...] rows of a query block -> [BH, S, R/S, ...], its S band sub-blocks."""
    return x.reshape(x.shape[0], sub_blocks, -1, *x.shape[2:])


def take_windows(band: Entries, starts: jax.Array, width: int) -> Tile:
    """The windows of `width` entries from `starts` [BH, S] of flat band entries [BH, N, ...]:
    k, v [BH, S, W, D]; start, until, bias as rows [BH, S, 1, W]."""
    idx = _window_index(starts, width)
    windows = (*starts.shape, width)

    def take(x):
        out = jnp.take_along_axis(x, idx.reshape(*idx.shape, *[1] * (x.ndim - 2)), axis=1)
        return out.reshape(*windows, *x.shape[2:])

    def row(x):
        return None if x is None else take(x)[..., None, :]

    return Tile(take(band.k), take(band.v), row(band.start), row(band.until), row(band.bias))


def add_windows(x: jax.Array, starts: jax.Array, delta: jax.Array) -> jax.Array:
    """x [BH, N, D] += delta [BH, S, W, D] at the windows from `starts` [BH, S] (they may
    overlap)."""
    idx = _window_index(starts, delta.shape[-2])
    rows = delta.reshape(*idx.shape, delta.shape[-1])
    return jax.vmap(lambda x, i, d: x.at[i].add(d))(x, idx, rows)


def take_periods(band: Entries, offset: jax.Array, rows: int, period: int) -> Tile:
    """The band entries [offset, offset + rows) of flat band entries [BH, N, ...] as rows / period
    windows of `period` entries (`interval_attention`'s band_period): k, v [BH, S, P, D]; start
    and bias as rows [BH, S, 1, P]. A slice, no gather. `until` is left out: a periodic entry is
    visible to the rest of its period, so only `start` masks."""

    def take(x):
        out = jax.lax.dynamic_slice_in_dim(x, offset, rows, axis=1)
        return out.reshape(x.shape[0], rows // period, period, *x.shape[2:])

    def row(x):
        return None if x is None else take(x)[..., None, :]

    return Tile(take(band.k), take(band.v), row(band.start), None, row(band.bias))


def add_periods(x: jax.Array, offset: jax.Array, delta: jax.Array) -> jax.Array:
    """x [BH, N, D] += delta [BH, S, P, D] at entries [offset, offset + S * P)."""
    return add_slice(x, offset, delta.reshape(x.shape[0], -1, x.shape[-1]), axis=1)


def _window_index(starts: jax.Array, width: int) -> jax.Array:
    """[BH, S] window starts -> [BH, S * W] entry indices."""
    idx = starts[..., None] + jnp.arange(width, dtype=jnp.int32)
    return idx.reshape(starts.shape[0], -1)


class BandBounds(NamedTuple):
    """What a walk may assume of a band (`interval_attention`'s arguments): at most `lag` entries
    that start before a query are visible to it; `period` > 0: one entry per position, each
    visible only inside its own period of that many positions (0: no such structure)."""

    lag: int
    period: int = 0

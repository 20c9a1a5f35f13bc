"""The XLA walk's geometry: which prefix blocks and band tiles each query block visits.

`interval_attention` (`dga_jax.ops.intervals`) walks query blocks of `block_q` positions, G
query heads per KV head as rows; its forward and its backward (`dga_jax.ops.intervals_backward`)
visit the same tiles in the same order through these functions: the prefix's whole blocks, then
its edge masked (`walk_prefix`), then the band's windows or periods (`band_chunks`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dga_jax.ops.band import add_periods, add_windows, split_rows, take_periods, take_windows
from dga_jax.ops.ranges import Entries
from dga_jax.ops.tiles import Tile


@dataclasses.dataclass(frozen=True)
class WalkSpec:
    """The static shape of one walk (`interval_attention` derives it from BlockSizes)."""

    scale: float
    block_q: int
    block_k: int
    block_edge: int
    band_q: int
    band_width: int
    band_chunk: int  # window entries per band tile: band_width, or a divisor of it
    groups: int
    band_period: int = 0  # > 0: each block's band is its own entries, a slice (`take_periods`)


def walk_prefix(spec: WalkSpec, n_full: jax.Array, n_edge: jax.Array, visit, state):
    """state = visit(offset, masked, state) for each prefix block a query block walks: n_full
    whole blocks unmasked, then n_edge edge blocks masked."""

    def whole(j, state):
        return visit(j * spec.block_k, False, state)

    def edge(j, state):
        return visit(n_full * spec.block_k + j * spec.block_edge, True, state)

    state = jax.lax.fori_loop(0, n_full, whole, state)
    return jax.lax.fori_loop(0, n_edge, edge, state)


def prefix_block(spec: WalkSpec, prefix: Entries, offset: jax.Array, masked: bool) -> Tile:
    """The prefix block at `offset`: k, v [BH, W, D]; start (if masked) and bias [BH, 1, W]
    (W: block_edge if masked, else block_k)."""
    width = spec.block_edge if masked else spec.block_k

    def take(x):
        return jax.lax.dynamic_slice_in_dim(x, offset, width, axis=1)

    def row(x):
        return None if x is None else take(x)[:, None, :]

    start = row(prefix.start) if masked else None
    return Tile(take(prefix.k), take(prefix.v), start, None, row(prefix.bias))


def positions(spec: WalkSpec, i: jax.Array) -> jax.Array:
    """Query block i's positions [R, 1]: row r is position i * block_q + r // G."""
    rows = spec.block_q * spec.groups
    return i * spec.block_q + (jnp.arange(rows, dtype=jnp.int32) // spec.groups)[:, None]  # [R, 1]


def split_band(spec: WalkSpec, x: jax.Array) -> jax.Array:
    """[BH, R, ...] rows of a query block -> [BH, S, R/S, ...] band sub-blocks."""
    return split_rows(x, spec.block_q // spec.band_q)


def band_positions(spec: WalkSpec, t: jax.Array) -> jax.Array:
    """[R, 1] positions -> [S, R/S, 1], the band sub-blocks'."""
    return split_band(spec, t[None])[0]


def band_chunks(spec: WalkSpec, band: Entries, band_start, visit, state):
    """state = visit(state, tile, add) for each chunk of every sub-block's band window, its
    entries from `first` [BH, S] on (`band.window_chunk`): one tile, or a loop over them. With
    a band period, the block's own entries from `band_start` (a scalar) on, one tile. `add(x,
    delta)` adds delta, shaped as the tile's k, into flat entries x [BH, N, D] where the tile
    was read (the backward's dK, dV)."""
    if spec.band_period:

        def add_own(x, delta):
            return add_periods(x, band_start, delta)

        tile = take_periods(band, band_start, spec.block_q, spec.band_period)
        return visit(state, tile, add_own)

    def chunk(c, state):
        first = band_start + c * spec.band_chunk

        def add_window(x, delta):
            return add_windows(x, first, delta)

        return visit(state, take_windows(band, first, spec.band_chunk), add_window)

    count = spec.band_width // spec.band_chunk
    return chunk(0, state) if count == 1 else jax.lax.fori_loop(0, count, chunk, state)

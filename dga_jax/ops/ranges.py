"""KV entries with visibility intervals, and which of them each block of queries visits.

`Entries` come in two lists (what each means: `dga_jax.ops.intervals`): a prefix sorted by
`start` (visible for ever) and a band sorted by `start` with non-decreasing `until`. For query
block i (positions `[i*bq, (i+1)*bq)`) a count of `start <= position` gives the prefix seen by
all its queries and by some; a count of `until <= first position` the first band entry still
visible. All on device (`searchsorted`), shared by the XLA walk, the kernels and the layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEVER = np.iinfo(np.int32).max  # `until` of entries visible for ever; `start` of padding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Entries:
    """KV entries with visibility `[start, until)` and an additive logit bias."""

    k: jax.Array  # [B, H, N, D]
    v: jax.Array  # [B, H, N, D]
    start: jax.Array  # [B, H, N] int32
    until: jax.Array | None = None  # [B, H, N] int32; None: visible for ever
    bias: jax.Array | None = None  # [B, H, N] float32, >= 0 (tiles.online_step); None: zero


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockRanges:
    """What the queries of block i (positions [i*bq, (i+1)*bq)) visit, per batch and head."""

    prefix_full: jax.Array  # [B, H, nq] int32: prefix [0, prefix_full) is visible to all of them
    prefix_end: jax.Array  # [B, H, nq] int32: prefix [prefix_end, N) is visible to none
    band_start: jax.Array  # [B, H, nq] int32: first band entry still visible to the block
    band_end: jax.Array  # [B, H, nq] int32: one past the last band entry visible to the block


def block_ranges(
    prefix_start: jax.Array,
    band_start: jax.Array | None,
    band_until: jax.Array | None,
    block_q: int,
    num_blocks: int,
) -> BlockRanges:
    """Per query block: the prefix it sees whole, in part, and its band window (no sort).

    prefix_start [B, H, NP], band_start and band_until [B, H, NR] (None: no band; until None:
    visible for ever), all int32 and sorted."""
    prefix_full, prefix_end = prefix_ranges(prefix_start, block_q, num_blocks)
    if band_start is None:
        empty = jnp.zeros_like(prefix_end)
        return BlockRanges(prefix_full, prefix_end, empty, empty)
    band = band_ranges(band_start, band_until, block_q, num_blocks)
    return BlockRanges(prefix_full, prefix_end, *band)


def _block_bounds(block_q: int, num_blocks: int) -> tuple[jax.Array, jax.Array]:
    first = jnp.arange(num_blocks, dtype=jnp.int32) * block_q
    return first, first + block_q - 1


def prefix_ranges(start: jax.Array, block_q: int, num_blocks: int):
    """-> (prefix_full, prefix_end) [B, H, nq] of the prefix entries starting at `start`."""
    first, last = _block_bounds(block_q, num_blocks)
    return _count_at_most(start, first), _count_at_most(start, last)


def band_ranges(start: jax.Array, until: jax.Array | None, block_q: int, num_blocks: int):
    """-> (band_start, band_end) [B, H, nq] of band entries visible on [start, until)."""
    first, last = _block_bounds(block_q, num_blocks)
    until = jnp.full(start.shape, NEVER, jnp.int32) if until is None else until
    return _count_at_most(until, first), _count_at_most(start, last)


def _count_at_most(sorted_values: jax.Array, queries: jax.Array) -> jax.Array:
    """#{sorted_values <= query} per [B, H] row of sorted_values [B, H, N] -> [B, H, nq]."""
    per_head = jax.vmap(jax.vmap(_search_right, (0, None)), (0, None))
    return per_head(sorted_values, queries)


def _search_right(sorted_values: jax.Array, queries: jax.Array) -> jax.Array:
    return jnp.searchsorted(sorted_values, queries, side="right").astype(jnp.int32)

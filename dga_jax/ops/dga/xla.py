"""DGA attention in plain XLA: the layout, then blockwise attention over the compressed KV'.

Runs on any backend; memory is linear in L. Query block i walks only the focal+group prefix
visible to its last query and one band of raw entries (`dga_jax.ops.intervals`).
"""

from __future__ import annotations

import jax

from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.layout import dga_layout, gather_entries
from dga_jax.ops.intervals import BlockSizes, interval_attention


def dga_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: DGAConfig,
    scale: float,
    block_sizes: BlockSizes = BlockSizes(),
) -> jax.Array:
    """q [B, L, Hq, D], k/v [B, L, Hkv, D] -> [B, L, Hq, D] in q's dtype."""
    layout = dga_layout(q, k, config, scale, block=block_sizes.block_importance)
    prefix, raw = gather_entries(layout, k, v)
    sizes = layout.sizes
    band = raw if sizes.num_raw else None
    # Raw entries that start before t and are still visible at t: one unfinished group or chunk.
    lag = max(sizes.chunk, sizes.group_size) - 1
    return interval_attention(q, prefix, band, scale=scale, block_sizes=block_sizes, band_lag=lag)

"""DGA attention in plain XLA: the layout, then blockwise attention over the compressed KV'.

Runs on any backend; memory is linear in L. Query block i walks only the focal+group prefix
visible to its last query and one band of raw entries (`dga_jax.ops.intervals`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dga_jax.ops.context import WHOLE, ContextSplit
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.layout import compressed_kv
from dga_jax.ops.intervals import BlockSizes, interval_attention


def dga_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: DGAConfig,
    scale: float,
    block_sizes: BlockSizes = BlockSizes(),
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """q [B, C, Hq, D], k/v [B, C, Hkv, D] -> [B, C, Hq, D] in q's dtype (C = L unless split).

    `lengths` [B]: the valid positions of each row of a right-padded batch (`dga_layout`).
    """
    pieces, lag = compressed_kv(
        q, k, v, config, scale, block=block_sizes.block_importance, split=split, lengths=lengths
    )
    out = [
        interval_attention(rows, prefix, band, scale=scale, block_sizes=block_sizes, band_lag=lag)
        for rows, (prefix, band) in zip(split.piece_rows(q), pieces, strict=True)
    ]
    return jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]

"""DGA attention by any interval-attention implementation: the layout, then the walk over KV'.

`compressed_kv` builds the compressed KV' (focal + group prefix, raw band, and what bounds the
band); `attend` (`dga_jax.ops.dga.backends`: XLA or a Pallas kernel) walks it. Memory is linear
in L: query block i walks only the prefix visible to its last query and one band of raw entries.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dga_jax.ops.context import WHOLE, ContextSplit
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.entries import compressed_kv
from dga_jax.ops.dga.layout import DGALayout
from dga_jax.ops.dga.selection import ImportancePasses
from dga_jax.ops.tiles import BlockSizes


def compressed_attention(
    attend: Callable,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: DGAConfig,
    scale: float,
    block_sizes: BlockSizes = BlockSizes(),
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
    layout: DGALayout | None = None,
    passes: ImportancePasses | None = None,
) -> jax.Array:
    """q [B, C, Hq, D], k/v [B, C, Hkv, D] -> [B, C, Hq, D] in q's dtype (C = L unless split).

    `attend`: an interval attention (`interval_attention`'s signature). Under a `split`, this
    device's rows of the sequence, walked piece by piece with entry intervals relative to the
    piece's first position. `lengths` [B]: the valid positions of each row of a right-padded
    batch (`dga_layout`). `layout`: the sequence's layout if already built (`compressed_kv`).
    `passes`: how global importance runs (None: XLA's loops; `backends.importance_implementation`).
    """
    pieces, bounds = compressed_kv(
        q,
        k,
        v,
        config,
        scale,
        block=block_sizes.block_importance,
        split=split,
        lengths=lengths,
        layout=layout,
        passes=passes,
    )
    out = [
        attend(
            rows,
            prefix,
            band,
            scale=scale,
            block_sizes=block_sizes,
            band_lag=bounds.lag,
            band_period=bounds.period,
        )
        for rows, (prefix, band) in zip(split.piece_rows(q), pieces, strict=True)
    ]
    return jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]

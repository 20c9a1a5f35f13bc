"""One DGA attention call cut at its stage boundaries, for `profile_attention.py`.

Each stage is a function of the static `Setup` and the previous stages' outputs, so each can be
jitted and timed on its own: importance, selection, layout, gather, the prefix walk and the band
walk (the implementation's interval attention over each list alone), and their gradients;
`dga_forward` and `dense_forward` are the whole calls they are compared with. Under "pallas_gpu"
importance runs the Triton kernels and the walks the Triton walks, as in the whole call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import dga_jax
from dga_jax import BlockSizes, DGAConfig, DGALayout
from dga_jax.ops.band import BandBounds
from dga_jax.ops.dga import backends
from dga_jax.ops.dga import layout as dga_layout_ops
from dga_jax.ops.dga import selection as dga_selection
from dga_jax.ops.dga.config import LayoutSizes
from dga_jax.ops.dga.entries import band_bounds, compressed_kv
from dga_jax.ops.intervals import Entries


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static settings every stage closes over."""

    config: DGAConfig
    scale: float
    blocks: BlockSizes
    seq_len: int
    batch: int
    implementation: str = "xla"  # one of `backends.INTERVAL_IMPLEMENTATIONS`
    interpret: bool = False  # the kernels in Pallas' interpreter
    dense: str = "blockwise"  # the dense reference's implementation

    @property
    def sizes(self) -> LayoutSizes:
        """The layout's static entry counts."""
        return self.config.sizes(self.seq_len)

    @property
    def bounds(self) -> BandBounds:
        """What the band bounds (`entries.band_bounds`, as `compressed_kv`)."""
        return band_bounds(self.sizes)


# The stages, each a function of the previous stages' outputs.


def importance(s: Setup, q: jax.Array, k: jax.Array) -> jax.Array:
    """Importance scores [B, Hkv, L] float32: global's two passes over the sampled queries, or
    streaming's per-chunk softmax of each chunk's last query."""
    if s.config.selection == "streaming":
        return dga_selection.streaming_score(q, k, s.sizes, s.scale)
    passes = backends.importance_implementation(s.implementation, s.interpret)
    return dga_selection.global_importance(
        q, k, s.config.group_size, s.scale, block=s.blocks.block_importance, passes=passes
    )


def selection(s: Setup, score: jax.Array) -> jax.Array:
    """Focal mask [B, Hkv, L] bool: the r largest scores (global) or each chunk's r' (streaming)."""
    if s.config.selection == "streaming":
        rows = dga_layout_ops.RowCounts.of(s.config, s.seq_len, s.batch, None)
        return dga_selection.chunk_focal_mask(score, s.sizes, rows.num_groups)
    return dga_selection.top_r_mask(score, s.sizes.num_focal)


def build_layout(s: Setup, focal: jax.Array, score: jax.Array) -> DGALayout:
    """The layout from the focal mask and scores, as `dga_layout` assembles it."""
    rows = dga_layout_ops.RowCounts.of(s.config, s.seq_len, s.batch, None)
    per_head = jax.vmap(dga_layout_ops._assemble, (0, 0, None, None))
    return jax.vmap(per_head, (0, 0, None, 0))(focal, score, s.sizes, rows)


def gather(
    s: Setup, layout: DGALayout, q: jax.Array, k: jax.Array, v: jax.Array
) -> tuple[Entries, Entries | None]:
    """The compressed KV' of this layout: (prefix, band) entries, as the call reads them."""
    [(prefix, band)], _ = compressed_kv(q, k, v, s.config, s.scale, layout=layout)
    return prefix, band


def walk(s: Setup, q: jax.Array, prefix: Entries, band: Entries | None) -> jax.Array:
    """Interval attention of q [B, L, Hq, D] over the prefix and the band (None: none)."""
    attend = backends.interval_implementation(s.implementation, s.interpret)
    lag, period = s.bounds
    return attend(
        q, prefix, band, scale=s.scale, block_sizes=s.blocks, band_lag=lag, band_period=period
    )


def band_walk(s: Setup, q: jax.Array, band: Entries) -> jax.Array:
    """The band walk alone: an empty prefix, whose loops then make no trips."""
    empty = band.k[:, :, :0]
    return walk(s, q, Entries(empty, empty, band.start[:, :, :0]), band)


def walk_grad(s: Setup, q: jax.Array, prefix: Entries | None, band: Entries | None, ct):
    """Gradients of <walk, ct> in q and the entries' k, v: the prefix walk (band None) or the
    band walk (prefix None)."""

    def loss(q, prefix_kv, band_kv):
        p, b = with_kv(prefix, prefix_kv), with_kv(band, band_kv)
        out = band_walk(s, q, b) if p is None else walk(s, q, p, b)
        return jnp.sum(out.astype(jnp.float32) * ct)

    return jax.grad(loss, argnums=(0, 1, 2))(q, kv_of(prefix), kv_of(band))


def kv_of(entries: Entries | None) -> tuple[jax.Array, jax.Array] | None:
    """The differentiable part of entries: (k, v)."""
    return None if entries is None else (entries.k, entries.v)


def with_kv(entries: Entries | None, kv: tuple[jax.Array, jax.Array] | None) -> Entries | None:
    """entries with k, v replaced."""
    return None if entries is None else dataclasses.replace(entries, k=kv[0], v=kv[1])


def dga_forward(s: Setup, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The whole call."""
    return dga_jax.dga_attention(
        q,
        k,
        v,
        group_size=s.config.group_size,
        focal_ratio=s.config.focal_ratio,
        selection=s.config.selection,
        scale=s.scale,
        implementation=s.implementation,
        block_sizes=s.blocks,
        interpret=s.interpret,
    )


def dense_forward(s: Setup, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The dense reference (`s.dense`; "blockwise" in its own default tiles,
    `dense.DENSE_BLOCKS`)."""
    return dga_jax.dense_attention(q, k, v, scale=s.scale, implementation=s.dense)


def with_grad(forward: Callable[..., jax.Array]) -> Callable[..., Any]:
    """(s, q, k, v, ct) -> gradients of <forward(s, q, k, v), ct> in q, k, v."""

    def loss(s, q, k, v, ct):
        return jnp.sum(forward(s, q, k, v).astype(jnp.float32) * ct)

    return jax.grad(loss, argnums=(1, 2, 3))

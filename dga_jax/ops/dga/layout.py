"""The DGA layout: grouping and the compressed KV' (importance and focal selection:
`dga_jax.ops.dga.selection`).

One implementation shared by the XLA path, the kernels, decoding, tests and plots.

Per batch element and KV head, the compressed list `KV' = focal ∪ groups ∪ raw` is kept as two
position-sorted lists (see `docs/DGA_SPEC.md`, "What a query sees"):

- the *prefix* list: focal tokens and group entries sorted by `from` (visible from `from` on, for
  ever), so a query at t sees exactly the first `#{from <= t}` of them;
- the *raw* list: non-focal tokens in position order, `from = p`, `until` = when their group
  appears (or never). The first `num_groups * m` of them are the group members, m at a time.
  `until` is non-decreasing, so a block of queries sees a contiguous band of fewer than
  `block + m'` raw entries.

Both lists are built with cumulative sums and scatters (no sort).

Under a `ContextSplit` (inside `shard_map`, the sequence split across devices) the layout is the
whole sequence's on every device. The entries it describes are read out of k, v by
`dga_jax.ops.dga.entries`.

A right-padded batch (`lengths`: the valid positions of each row) gets, per row, the layout of
its own length: its r, its sampled queries, its groups, with counts dynamic and shapes static
in the padded length L. Padding positions become raw tokens visible from their own position on
(so no valid query sees one, and every padding query sees something finite); prefix slots the
row does not fill come last, visible from NEVER.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.checks import check_lengths, check_qkv, is_int
from dga_jax.ops.context import WHOLE, ContextSplit, check_split
from dga_jax.ops.dga.config import DGAConfig, LayoutSizes
from dga_jax.ops.dga.selection import (
    ImportancePasses,
    chunk_focal_mask,
    global_importance,
    streaming_score,
    top_r_mask,
)
from dga_jax.ops.ranges import NEVER, BlockRanges, block_ranges
from dga_jax.ops.tiles import BlockSizes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DGALayout:
    """Who is focal, who is grouped with whom, and when each compressed entry is visible.

    Shapes: B batch, H KV heads, L positions, NP = num_focal + num_groups prefix entries,
    NR = L - num_focal raw entries, NG groups of m members.
    """

    focal: jax.Array  # [B, H, L] bool
    score: jax.Array  # [B, H, L] f32: importance (global) or tail score (streaming)
    prefix_src: jax.Array  # [B, H, NP] int32: token position, or group index for a group entry
    prefix_is_group: jax.Array  # [B, H, NP] bool
    prefix_from: jax.Array  # [B, H, NP] int32, non-decreasing
    raw_pos: jax.Array  # [B, H, NR] int32, increasing; also the raw entries' `from`
    raw_until: jax.Array  # [B, H, NR] int32, non-decreasing; NEVER for leftovers
    group_weight: jax.Array  # [B, H, NG, m] f32, rows sum to 1
    sizes: LayoutSizes = dataclasses.field(metadata=dict(static=True))
    # [B, H] int32: each row's valid positions, the `lengths` it was built with (the same for
    # every head); None: built without (every row L long). `prefill(layout=)` reads it.
    length: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowCounts:
    """Per row of a (right-padded) batch, [B] int32: valid positions, focal tokens, groups."""

    length: jax.Array
    num_focal: jax.Array
    num_groups: jax.Array

    @classmethod
    def of(
        cls, config: DGAConfig, seq_len: int, batch: int, lengths: jax.Array | None
    ) -> RowCounts:
        """The counts of rows of `lengths` [B] (clipped to [0, seq_len]; None: all seq_len).

        The per-length counts are `config.counts` (exact, on the host), looked up in a table.
        """
        if lengths is None:
            sizes = config.sizes(seq_len)
            counts = (seq_len, sizes.num_focal, sizes.num_groups)
            return cls(*(jnp.full((batch,), n, jnp.int32) for n in counts))
        length = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, seq_len)
        focal, groups = config.counts(np.arange(seq_len + 1))
        return cls(length, *(jnp.asarray(x, jnp.int32)[length] for x in (focal, groups)))


def dga_layout(
    q: jax.Array,
    k: jax.Array,
    config: DGAConfig,
    scale: float | None,
    *,
    block: int = BlockSizes.block_importance,
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
    passes: ImportancePasses | None = None,
) -> DGALayout:
    """Builds the layout from q [B, C, Hq, D] and k [B, C, Hkv, D]; carries no gradient.

    `block` is the key-block size of the global importance pass (memory O(C * block)). Under a
    `split` (inside `shard_map`), q and k are this device's part of a sequence of
    L = C * split.shards positions; the layout is the whole sequence's, the same on every device:
    only sampled queries and per-position scores cross devices. `lengths` [B] int: the valid
    positions of each row of a right-padded batch (module docstring); not under a split.
    `passes`: how global importance's two passes run (None: XLA's loops,
    `selection.XLA_PASSES`; the Triton kernels: `backends.importance_implementation`).
    `scale` None: 1/sqrt(D), as `dga_attention`'s. Inputs are checked as `dga_attention`'s
    (shapes, dtypes, lengths, the split's part count): a layout of mismatched q and k would be
    silently wrong.
    """
    scale, lengths = _check_inputs(q, k, config, scale, block, split, lengths)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    sizes = config.sizes(q.shape[1] * split.shards)
    rows = RowCounts.of(config, sizes.seq_len, q.shape[0], lengths)
    if sizes.num_focal == sizes.seq_len:
        shape = (q.shape[0], k.shape[2], sizes.seq_len)
        focal = jnp.broadcast_to(jnp.arange(sizes.seq_len) < rows.length[:, None, None], shape)
        score = jnp.ones(shape, jnp.float32)
    elif config.selection == "global":
        score = global_importance(
            q,
            k,
            sizes.group_size,
            scale,
            block=block,
            split=split,
            lengths=lengths,
            passes=passes,
        )
        focal = top_r_mask(score, rows.num_focal[:, None])
    else:
        score = streaming_score(q, k, sizes, scale, split)
        focal = chunk_focal_mask(score, sizes, rows.num_groups)
    assemble = jax.vmap(jax.vmap(_assemble, (0, 0, None, None)), (0, 0, None, 0))
    layout = assemble(focal, score, sizes, rows)
    if lengths is None:
        return layout
    length = jnp.broadcast_to(rows.length[:, None], focal.shape[:2])
    return dataclasses.replace(layout, length=length)


def _check_inputs(q, k, config, scale, block, split: ContextSplit, lengths):
    """-> (scale, lengths as int32 [B] or None); errors name the argument and the shapes."""
    if not isinstance(config, DGAConfig):
        raise TypeError(f"config must be a DGAConfig, got {type(config).__name__}")
    scale = check_qkv(q, k, k, scale)
    if not is_int(block) or block < 1:
        raise ValueError(f"block (keys per importance tile) must be an int >= 1, got {block!r}")
    check_split(split, "dga_layout")
    if lengths is not None and split.shards > 1:
        raise ValueError("per-row lengths need whole sequences, not a ContextSplit")
    return scale, check_lengths(lengths, q.shape[0], q.shape[1])


def _assemble(focal: jax.Array, score: jax.Array, sizes: LayoutSizes, row: RowCounts) -> DGALayout:
    """One (batch, head): focal [L] bool, score [L] -> the two sorted entry lists.

    The row's first `row.num_groups` groups are real; the others (a padded row's) are visible
    from NEVER, and their members are leftovers.
    """
    seq_len, m, n_groups = sizes.seq_len, sizes.group_size, sizes.num_groups
    pos = jnp.arange(seq_len, dtype=jnp.int32)
    raw_pos = _compact(~focal, pos, sizes.num_raw)

    members = raw_pos[: n_groups * m].reshape(n_groups, m)
    w = group_weights(score[members])
    if sizes.chunk:  # streaming: the group is decided by, and visible after, its chunk's last query
        key = jnp.arange(n_groups, dtype=jnp.int32) * sizes.chunk + sizes.chunk - 1
        group_from = key + 1
    else:  # global: visible from its last member on
        key = group_from = members[:, -1]
    real = jnp.arange(n_groups) < row.num_groups
    group_from = jnp.where(real, group_from, NEVER)
    leftover = jnp.full((sizes.num_raw - n_groups * m,), NEVER, jnp.int32)
    raw_until = jnp.concatenate([jnp.repeat(group_from, m), leftover])

    # Merge focal tokens (key p) and groups (key = decision position) by key, focal first on ties.
    focal_upto = jnp.cumsum(focal)  # focal tokens at positions <= p
    is_key = jnp.zeros(seq_len, jnp.int32).at[jnp.where(real, key, seq_len)].set(1, mode="drop")
    groups_before = jnp.cumsum(is_key) - is_key  # groups with key < p
    focal_slot = jnp.where(focal, focal_upto - 1 + groups_before, sizes.num_prefix)
    group_slot = jnp.where(real, focal_upto[key], focal_upto[-1]) + jnp.arange(n_groups)
    n, group_ids = sizes.num_prefix, jnp.arange(n_groups, dtype=jnp.int32)
    prefix_src = _scatter(n, 0, focal_slot, pos, group_slot, group_ids)
    prefix_from = _scatter(n, NEVER, focal_slot, pos, group_slot, group_from)
    prefix_is_group = jnp.zeros(n, bool).at[group_slot].set(True)
    return DGALayout(
        focal, score, prefix_src, prefix_is_group, prefix_from, raw_pos, raw_until, w, sizes
    )


def group_weights(score: jax.Array) -> jax.Array:
    """Members' scores [..., m] -> their weights in the group: ∝ score, summing to 1 (uniform
    1/m where the scores sum to 0)."""
    total = score.sum(axis=-1, keepdims=True)
    return jnp.where(total > 0, score / jnp.where(total > 0, total, 1.0), 1.0 / score.shape[-1])


def fold_members(weight: jax.Array, members: jax.Array) -> jax.Array:
    """A group entry, Σ_i weight_i members_i: weight [..., m] f32, members [..., m, D] ->
    [..., D], summed in float32 and stored in members' dtype."""
    out = jnp.einsum("...m,...md->...d", weight, members, preferred_element_type=jnp.float32)
    return out.astype(members.dtype)


def _compact(mask: jax.Array, values: jax.Array, size: int) -> jax.Array:
    """values[mask] in order, as a static-size array (cumsum + scatter, no sort)."""
    slot = jnp.where(mask, jnp.cumsum(mask) - 1, size)
    return jnp.zeros(size, values.dtype).at[slot].set(values, mode="drop")


def _scatter(size, fill, slot_a, values_a, slot_b, values_b):
    out = jnp.full(size, fill, jnp.int32).at[slot_a].set(values_a, mode="drop")
    return out.at[slot_b].set(values_b, mode="drop")


def layout_block_ranges(layout: DGALayout, block_q: int) -> BlockRanges:
    """Per query block of `block_q` positions: the visible prefix and the raw band."""
    num_blocks = -(-layout.sizes.seq_len // block_q)
    return block_ranges(layout.prefix_from, layout.raw_pos, layout.raw_until, block_q, num_blocks)

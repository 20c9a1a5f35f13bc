"""The DGA layout: grouping and the compressed KV' (importance and focal selection:
`dga_jax.ops.dga.selection`).

One implementation shared by the XLA path, the kernels, decoding, tests and plots.

Per batch element and KV head, the compressed list `KV' = focal ∪ groups ∪ raw` is kept as two
position-sorted lists (see `shared/DGA_SPEC.md`, "What a query sees"):

- the *prefix* list: focal tokens and group entries sorted by `from` (visible from `from` on, for
  ever), so a query at t sees exactly the first `#{from <= t}` of them;
- the *raw* list: non-focal tokens in position order, `from = p`, `until` = when their group
  appears (or never). The first `num_groups * m` of them are the group members, m at a time.
  `until` is non-decreasing, so a block of queries sees a contiguous band of fewer than
  `block + m'` raw entries.

Both lists are built with cumulative sums and scatters (no sort).

Under a `ContextSplit` (inside `shard_map`, the sequence split across devices) the same
functions take a device's rows: the layout is the whole sequence's on every device, and
`split_entries` builds the device's KV' with only the compressed prefix and a halo of raw
tokens crossing devices.

A right-padded batch (`lengths`: the valid positions of each row) gets, per row, the layout of
its own length: its r, its sampled queries, its groups, with counts dynamic and shapes static
in the padded length L. Padding positions become raw tokens visible from their own position on
(so no valid query sees one, and every padding query sees something finite); prefix slots the
row does not fill come last, visible from NEVER.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.context import WHOLE, ContextSplit
from dga_jax.ops.dga.config import DGAConfig, LayoutSizes
from dga_jax.ops.dga.selection import (
    chunk_focal_mask,
    global_importance,
    streaming_score,
    top_r_mask,
)
from dga_jax.ops.intervals import NEVER, BlockRanges, Entries, block_ranges


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
    scale: float,
    *,
    block: int = 1024,
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
) -> DGALayout:
    """Builds the layout from q [B, C, Hq, D] and k [B, C, Hkv, D]; carries no gradient.

    `block` is the key-block size of the global importance pass (memory O(C * block)). Under a
    `split` (inside `shard_map`), q and k are this device's part of a sequence of
    L = C * split.shards positions; the layout is the whole sequence's, the same on every device:
    only sampled queries and per-position scores cross devices. `lengths` [B] int: the valid
    positions of each row of a right-padded batch (module docstring); not under a split.
    """
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    sizes = config.sizes(q.shape[1] * split.shards)
    if lengths is not None and split.shards > 1:
        raise ValueError("per-row lengths need whole sequences, not a ContextSplit")
    rows = RowCounts.of(config, sizes.seq_len, q.shape[0], lengths)
    if sizes.num_focal == sizes.seq_len:
        shape = (q.shape[0], k.shape[2], sizes.seq_len)
        focal = jnp.broadcast_to(jnp.arange(sizes.seq_len) < rows.length[:, None, None], shape)
        score = jnp.ones(shape, jnp.float32)
    elif config.selection == "global":
        score = global_importance(
            q, k, sizes.group_size, scale, block=block, split=split, lengths=lengths
        )
        focal = top_r_mask(score, rows.num_focal[:, None])
    else:
        score = streaming_score(q, k, sizes, scale, split)
        focal = chunk_focal_mask(score, sizes, rows.num_groups)
    assemble = jax.vmap(jax.vmap(_assemble, (0, 0, None, None)), (0, 0, None, 0))
    return assemble(focal, score, sizes, rows)


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
    prefix = Entries(None, None, layout.prefix_from)
    raw = Entries(None, None, layout.raw_pos, layout.raw_until)
    return block_ranges(prefix, raw, block_q, num_blocks)


def gather_entries(layout: DGALayout, k: jax.Array, v: jax.Array) -> tuple[Entries, Entries]:
    """The compressed KV' for k, v [B, L, Hkv, D]: (prefix, raw) entries, differentiable in k, v.

    A group entry is the weighted sum of its members (in float32, stored in k's dtype), with bias
    log m because it stands for m tokens.
    """
    sizes = layout.sizes
    m, n_groups = sizes.group_size, sizes.num_groups
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, L, D]
    idx = layout.raw_pos[..., None]
    raw_k = jnp.take_along_axis(kt, idx, axis=2)  # [B, H, NR, D]
    raw_v = jnp.take_along_axis(vt, idx, axis=2)

    def fold(raw):  # [B, H, NR, D] -> [B, H, NG, D]
        members = raw[:, :, : n_groups * m].reshape(*raw.shape[:2], n_groups, m, raw.shape[-1])
        return fold_members(layout.group_weight, members)

    is_group = layout.prefix_is_group[..., None]
    token_idx = jnp.where(is_group, 0, layout.prefix_src[..., None])
    group_idx = jnp.where(is_group, layout.prefix_src[..., None], 0)

    def pick(tokens, groups):
        if n_groups == 0:
            return jnp.take_along_axis(tokens, token_idx, axis=2)
        return jnp.where(
            is_group,
            jnp.take_along_axis(groups, group_idx, axis=2),
            jnp.take_along_axis(tokens, token_idx, axis=2),
        )

    bias = jnp.where(layout.prefix_is_group, math.log(m), 0.0).astype(jnp.float32)
    prefix = Entries(pick(kt, fold(raw_k)), pick(vt, fold(raw_v)), layout.prefix_from, None, bias)
    raw = Entries(raw_k, raw_v, layout.raw_pos, layout.raw_until)
    return prefix, raw


def compressed_kv(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: DGAConfig,
    scale: float,
    *,
    block: int = 1024,
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
) -> tuple[list[tuple[Entries, Entries | None]], int]:
    """([(prefix, band) per piece], band lag): the KV' the queries of q [B, C, Hq, D] attend to.

    One piece (the device's rows) unless `split` is in zig-zag order (two). A piece's entry
    intervals are relative to its first position, so its query row r sees entry e iff
    `start_e <= r < until_e`, as `interval_attention` and the kernels assume. The band lag is the
    number of raw entries that can start before a query and still be visible to it: the members
    of one unfinished group or chunk. `lengths`: see `dga_layout`.
    """
    layout = dga_layout(q, k, config, scale, block=block, split=split, lengths=lengths)
    sizes = layout.sizes
    lag = max(sizes.chunk, sizes.group_size) - 1
    if split.shards == 1:
        prefix, raw = gather_entries(layout, k, v)
        return [(prefix, raw if sizes.num_raw else None)], lag
    return split_entries(layout, k, v, split, lag), lag


def split_entries(
    layout: DGALayout, k: jax.Array, v: jax.Array, split: ContextSplit, lag: int
) -> list[tuple[Entries, Entries | None]]:
    """`gather_entries` for this device's rows k, v [B, C, Hkv, D] of a split sequence: the
    (prefix, band) of each of its pieces, intervals relative to the piece's first position.

    The prefix (~(gamma + 1/m) L entries) is summed across devices: each adds its focal tokens
    and its members' weighted shares of their groups (a group may straddle devices).
    A piece's band is the window of the raw list its queries can see: its own raw tokens and
    fewer than `lag + 1` earlier ones, taken from every piece's last `lag` raw tokens (gathered).
    """
    chunk, positions = k.shape[1], split.positions(k.shape[1])
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, C, D]
    slot, weight = jax.vmap(jax.vmap(_prefix_slots))(layout)  # [B, H, L]
    slot, weight = (jnp.take(x, positions, axis=2) for x in (slot, weight))
    n_prefix = layout.prefix_from.shape[-1]

    def fold(x):  # [B, H, C, D] -> [B, H, NP, D]: this device's share of every prefix entry
        shares = weight[..., None] * x.astype(jnp.float32)
        add = jax.vmap(jax.vmap(_scatter_add, (0, 0, None)), (0, 0, None))
        # Summed across devices in x's dtype (half the bytes under bfloat16): only an entry
        # whose group straddles devices has more than one non-zero share, one rounding more.
        return split.psum(add(slot, shares, n_prefix).astype(x.dtype))

    bias = jnp.where(layout.prefix_is_group, math.log(layout.sizes.group_size), 0.0)
    prefix_k, prefix_v = fold(kt), fold(vt)
    span = chunk // split.pieces
    band = _Band(layout, split, span, lag)
    halos = (band.halo(kt), band.halo(vt)) if lag and layout.sizes.num_raw else (None, None)
    out = []
    for piece, first in enumerate(split.firsts(chunk)):
        prefix = Entries(prefix_k, prefix_v, layout.prefix_from - first, None, bias)
        window = band.window((kt, vt), halos, piece, first) if layout.sizes.num_raw else None
        out.append((prefix, window))
    return out


def _prefix_slots(layout: DGALayout) -> tuple[jax.Array, jax.Array]:
    """One (batch, head): the prefix entry [L] each position adds to (NP: none) and its weight."""
    sizes = layout.sizes
    n_prefix, n_groups, m = layout.prefix_from.shape[0], sizes.num_groups, sizes.group_size
    entry = jnp.arange(n_prefix, dtype=jnp.int32)
    is_group, src = layout.prefix_is_group, layout.prefix_src
    slot = jnp.full(sizes.seq_len, n_prefix, jnp.int32)
    slot = slot.at[jnp.where(is_group, sizes.seq_len, src)].set(entry, mode="drop")
    group_slot = jnp.zeros(n_groups, jnp.int32).at[jnp.where(is_group, src, n_groups)]
    group_slot = group_slot.set(entry, mode="drop")
    members = layout.raw_pos[: n_groups * m]
    slot = slot.at[members].set(jnp.repeat(group_slot, m))
    weight = jnp.ones(sizes.seq_len, jnp.float32).at[members].set(layout.group_weight.reshape(-1))
    return slot, weight


def _scatter_add(slot: jax.Array, x: jax.Array, size: int) -> jax.Array:
    return jnp.zeros((size, x.shape[-1]), x.dtype).at[slot].add(x, mode="drop")


@dataclasses.dataclass(frozen=True)
class _Band:
    """The raw entries each piece's queries can see, with the halo they need from before it.

    Pieces are `span` positions long; global piece g covers [g * span, (g + 1) * span). Each
    piece's last `lag` raw tokens hold every earlier raw entry a later piece can see (the
    members of the group or chunk unfinished at its first query), so gathering them from every
    piece is enough: P * pieces * lag rows.
    """

    layout: DGALayout
    split: ContextSplit
    span: int
    lag: int

    def count_before(self, x: jax.Array) -> jax.Array:
        """#{raw_pos < x} per (batch, head): x [B, H, n] -> [B, H, n]."""
        return jax.vmap(jax.vmap(_search_left))(self.layout.raw_pos, x)

    def broadcast(self, x) -> jax.Array:
        return jnp.broadcast_to(x, self.layout.raw_pos.shape[:2] + (1,))

    def halo(self, x: jax.Array) -> jax.Array:
        """Every piece's last `lag` raw rows of x [B, H, C, D], gathered from all devices:
        [B, H, P * pieces * lag, D]."""
        raw_pos, n_raw = self.layout.raw_pos, self.layout.raw_pos.shape[-1]
        tails = []
        for piece, first in enumerate(self.split.firsts(self.span * self.split.pieces)):
            end = self.count_before(self.broadcast(first + self.span))
            index = end - self.lag + jnp.arange(self.lag, dtype=jnp.int32)  # [B, H, lag]
            valid = index >= self.count_before(self.broadcast(first))
            pos = jnp.take_along_axis(raw_pos, jnp.clip(index, 0, n_raw - 1), axis=-1)
            row = jnp.clip(pos - first, 0, self.span - 1) + piece * self.span
            rows = jnp.take_along_axis(x, row[..., None], axis=2)
            tails.append(jnp.where(valid[..., None], rows, 0))
        return self.split.gather(jnp.concatenate(tails, axis=2), axis=2)

    def halo_slot(self, piece: jax.Array) -> jax.Array:
        """Where global piece g's tail starts in the gathered halo."""
        parts = self.split.shards
        if self.split.pieces == 1:
            return piece * self.lag
        late = piece >= parts
        device = jnp.where(late, 2 * parts - 1 - piece, piece)
        return (device * 2 + late) * self.lag

    def window(self, tokens, halos, piece: int, first: jax.Array) -> Entries:
        """The band of local piece `piece` (positions from `first`), intervals from `first`.

        tokens: this device's k and v [B, H, C, D]; halos: their `halo`s (None if lag = 0).
        """
        raw_pos, raw_until = self.layout.raw_pos, self.layout.raw_until
        n_raw = raw_pos.shape[-1]
        width = min(n_raw, self.span + self.lag)
        start = jnp.minimum(jnp.sum(raw_until <= first, axis=-1), n_raw - width)  # [B, H]
        index = start[..., None] + jnp.arange(width, dtype=jnp.int32)  # [B, H, W]
        pos = jnp.take_along_axis(raw_pos, index, axis=-1)
        until = jnp.take_along_axis(raw_until, index, axis=-1)
        local = (pos >= first) & (pos < first + self.span)
        row = (jnp.clip(pos - first, 0, self.span - 1) + piece * self.span)[..., None]
        owner = pos // self.span  # global piece of each entry
        behind = index - (self.count_before((owner + 1) * self.span) - self.lag)
        halo_row = self.halo_slot(owner) + jnp.clip(behind, 0, max(self.lag - 1, 0))

        def take(x, halo):  # [B, H, C, D] -> [B, H, W, D]
            out = jnp.where(local[..., None], jnp.take_along_axis(x, row, axis=2), 0)
            if halo is None:
                return out
            halo = jnp.take_along_axis(halo, halo_row[..., None], axis=2)
            return jnp.where((pos < first)[..., None], halo, out)

        k, v = (take(x, halo) for x, halo in zip(tokens, halos, strict=True))
        never = until == NEVER
        return Entries(k, v, pos - first, jnp.where(never, NEVER, until - first))


def _search_left(sorted_values: jax.Array, queries: jax.Array) -> jax.Array:
    return jnp.searchsorted(sorted_values, queries, side="left").astype(jnp.int32)

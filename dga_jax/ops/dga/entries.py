"""The compressed KV' a layout describes: the entries every DGA implementation attends to.

`gather_entries` reads the prefix (focal tokens, group entries folded from their members) and
the raw band out of k, v; `chunk_entries` is the same for streaming selection, in position order
and without a gather; `compressed_kv` builds the layout (unless given) and its entries for
the queries of this device; under a `ContextSplit` (inside `shard_map`, the sequence split
across devices) `split_entries` builds the device's KV' with only the compressed prefix and a
halo of raw tokens crossing devices. Differentiable in k, v; the layout itself carries no gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dga_jax.ops.band import BandBounds
from dga_jax.ops.context import WHOLE, ContextSplit
from dga_jax.ops.dga.config import DGAConfig, LayoutSizes
from dga_jax.ops.dga.layout import DGALayout, dga_layout, fold_members
from dga_jax.ops.dga.selection import ImportancePasses
from dga_jax.ops.intervals import NEVER, Entries
from dga_jax.ops.tiles import BlockSizes


def gather_entries(layout: DGALayout, k: jax.Array, v: jax.Array) -> tuple[Entries, Entries]:
    """The compressed KV' for k, v [B, L, Hkv, D]: (prefix, raw) entries, differentiable in k, v.

    A group entry is the weighted sum of its members (in float32, stored in k's dtype), with bias
    log m because it stands for m tokens. k and v must be the layout's rows, positions and heads.
    """
    _check_layout_kv(layout, k, v)
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


def _check_layout_kv(layout: DGALayout, k: jax.Array, v: jax.Array) -> None:
    """k, v [B, L, Hkv, D] of the layout's [B, Hkv, L]: else a gather would silently broadcast
    (other heads or rows) or read past them."""
    if not isinstance(layout, DGALayout):
        raise ValueError(f"layout must be a DGALayout (dga_layout's), got {layout!r}")
    b, h, seq_len = layout.focal.shape
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 4 or (x.shape[0], x.shape[2], x.shape[1]) != (b, h, seq_len):
            raise ValueError(
                f"{name} must be [B, L, Hkv, D] with [B, Hkv, L] = {[b, h, seq_len]} (the "
                f"layout's); got {name} {tuple(x.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {k.shape}, v {v.shape}")


def compressed_kv(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: DGAConfig,
    scale: float,
    *,
    block: int = BlockSizes.block_importance,
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
    layout: DGALayout | None = None,
    passes: ImportancePasses | None = None,
) -> tuple[list[tuple[Entries, Entries | None]], BandBounds]:
    """([(prefix, band) per piece], `band_bounds`): the KV' the queries of q [B, C, Hq, D] see.

    One piece (the device's rows) unless `split` is in zig-zag order (two). A piece's entry
    intervals are relative to its first position, so its query row r sees entry e iff
    `start_e <= r < until_e`, as `interval_attention` and the kernels assume. `lengths`: see
    `dga_layout`. `layout`: this sequence's, already built (`dga_layout` with the same config,
    scale and lengths): selection is skipped. `passes`: how global importance runs
    (`dga_layout`).
    """
    if layout is None:
        layout = dga_layout(
            q, k, config, scale, block=block, split=split, lengths=lengths, passes=passes
        )
    sizes = layout.sizes
    bounds = band_bounds(sizes, split)
    if split.shards > 1:
        return split_entries(layout, k, v, split, bounds.lag), bounds
    if bounds.period:
        return [chunk_entries(layout, k, v)], bounds
    prefix, raw = gather_entries(layout, k, v)
    return [(prefix, raw if sizes.num_raw else None)], bounds


def band_bounds(sizes: LayoutSizes, split: ContextSplit = WHOLE) -> BandBounds:
    """What a walk may assume of the band of a layout of `sizes`: its lag, the raw entries that
    can start before a query and still be visible to it (the members of one unfinished group or
    chunk), and for streaming selection over a whole sequence its period m' (`chunk_entries`:
    every token in position order, visible to the rest of its own chunk only)."""
    lag = max(sizes.chunk, sizes.group_size) - 1
    periodic = bool(sizes.chunk and sizes.num_groups) and split.shards == 1
    return BandBounds(lag, sizes.chunk if periodic else 0)


def chunk_entries(layout: DGALayout, k: jax.Array, v: jax.Array) -> tuple[Entries, Entries]:
    """Streaming selection's KV' for k, v [B, L, Hkv, D], read without a gather: (prefix, band).

    The same visible set as `gather_entries`' lists, arranged by chunk of m' positions: every
    token is a band entry, in position order, visible from its position until its chunk's group
    appears (never in a chunk without one), focal tokens included; the prefix holds, per chunk,
    its r' focal tokens, then its group, all visible from that moment on. A focal token seen
    raw until its chunk ends and in the prefix after it is seen exactly when the layout's prefix
    entry is. Each prefix entry is a weighted sum of its chunk's m' tokens (one-hot for a focal
    token, the group weights for the group; `_fold_chunks`): k and v are read in place, and
    their gradients need no scatter.
    """
    sizes = layout.sizes
    n, width, m = sizes.num_groups, sizes.chunk, sizes.group_size
    r = width - m
    weight = _chunk_weights(layout).transpose(0, 2, 3, 4, 1)  # [B, n, r + 1, m', H]
    group_from = layout.raw_until[..., : n * m : m]  # [B, H, n]; NEVER for a padded row's

    def fold(x):  # [B, L, H, D] -> [B, H, n * (r + 1), D], read in place
        out = _fold_chunks(width, x.shape[1], weight, x)  # [B, n, r + 1, H, D]
        return out.transpose(0, 3, 1, 2, 4).reshape(x.shape[0], x.shape[2], -1, x.shape[3])

    entry_from = jnp.repeat(group_from, r + 1, axis=-1)
    bias = jnp.tile(jnp.asarray([0.0] * r + [math.log(m)], jnp.float32), n)
    bias = jnp.broadcast_to(bias, entry_from.shape)
    prefix = Entries(fold(k), fold(v), entry_from, None, bias)
    rest = jnp.full((*group_from.shape[:2], sizes.seq_len - n * width), NEVER, jnp.int32)
    until = jnp.concatenate([jnp.repeat(group_from, width, axis=-1), rest], axis=-1)
    start = jnp.broadcast_to(jnp.arange(sizes.seq_len, dtype=jnp.int32), until.shape)
    return prefix, Entries(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), start, until)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fold_chunks(width: int, seq_len: int, weight: jax.Array, x: jax.Array) -> jax.Array:
    """out[b, c, e, h] = sum_i weight[b, c, e, i, h] x[b, c * width + i, h]: weight
    [B, n, E, width, H] float32, x [B, L, H, D] -> [B, n, E, H, D] in x's dtype, summed in
    float32 (positions from n * width on take no part; seq_len = L).

    A few weighted sums per chunk, written as elementwise products of strided slices of x: one
    fused pass over k or v in their own layout, both ways. XLA:CPU runs that several times
    faster than the batched [E, width] x [width, D] matmuls of an einsum, or than reshaping x
    into chunks (a copy). The weights (the layout's) get no gradient.
    """
    return _fold_forward(width, seq_len, weight, x)[0]


def _fold_forward(width, seq_len, weight, x):
    stop = weight.shape[1] * width
    out = sum(
        weight[:, :, :, i, :, None] * x[:, i:stop:width, None].astype(jnp.float32)
        for i in range(width)
    )
    return out.astype(x.dtype), weight


def _fold_backward(width, seq_len, weight, d_out):  # d_out: in x's dtype, as the output
    b, n, e, h, d = d_out.shape
    d_x = sum(
        weight[:, :, j, :, :, None] * d_out[:, :, j, None].astype(jnp.float32) for j in range(e)
    )
    d_x = jnp.pad(
        d_x.reshape(b, n * width, h, d), ((0, 0), (0, seq_len - n * width), (0, 0), (0, 0))
    )
    return jnp.zeros_like(weight), d_x.astype(d_out.dtype)


_fold_chunks.defvjp(_fold_forward, _fold_backward)


def _chunk_weights(layout: DGALayout) -> jax.Array:
    """Per chunk, the weights of its m' tokens in each of its r' + 1 prefix entries:
    [B, H, n, r' + 1, m'] float32, a one-hot row per focal token (in position order), then the
    group's row (its members' `group_weight`, 0 at the focal tokens)."""
    sizes = layout.sizes
    n, width, m = sizes.num_groups, sizes.chunk, sizes.group_size
    focal = layout.focal[..., : n * width].reshape(*layout.focal.shape[:2], n, width)
    rank = jnp.cumsum(focal, axis=-1) - 1  # a focal token's rank in its chunk
    one_hot = focal[..., None, :] & (rank[..., None, :] == jnp.arange(width - m)[:, None])
    member = jnp.clip(jnp.cumsum(~focal, axis=-1) - 1, 0, m - 1)  # a member's rank in its group
    group = jnp.where(focal, 0.0, jnp.take_along_axis(layout.group_weight, member, axis=-1))
    return jnp.concatenate([one_hot.astype(jnp.float32), group[..., None, :]], axis=-2)


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
        if n_prefix == 0:  # no focal token, no group: JAX cannot differentiate an empty scatter
            return jnp.zeros((*x.shape[:2], 0, x.shape[-1]), x.dtype)
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
    """One (batch, head): the prefix entry [L] each position adds to (NP: none) and its weight.

    Slots a padded row does not fill (from NEVER) take no token: their source 0 would otherwise
    compete with position 0's own slot."""
    sizes = layout.sizes
    n_prefix, n_groups, m = layout.prefix_from.shape[0], sizes.num_groups, sizes.group_size
    entry = jnp.arange(n_prefix, dtype=jnp.int32)
    is_group, src = layout.prefix_is_group, layout.prefix_src
    is_token = ~is_group & (layout.prefix_from != NEVER)
    slot = jnp.full(sizes.seq_len, n_prefix, jnp.int32)
    slot = slot.at[jnp.where(is_token, src, sizes.seq_len)].set(entry, mode="drop")
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

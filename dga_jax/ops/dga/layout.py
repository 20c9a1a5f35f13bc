"""The DGA layout: importance, focal selection, grouping, and the compressed KV'.

One implementation shared by the XLA path, the kernels, decoding, tests and plots.

Per batch element and KV head, the compressed list `KV' = focal ∪ groups ∪ raw` is kept as two
position-sorted lists (see `shared/DGA_SPEC.md`, "What a query sees"):

- the *prefix* list: focal tokens and group entries sorted by `from` (visible from `from` on, for
  ever), so a query at t sees exactly the first `#{from <= t}` of them;
- the *raw* list: non-focal tokens in position order, `from = p`, `until` = when their group
  appears (or never). The first `num_groups * m` of them are the group members, m at a time.
  `until` is non-decreasing, so a block of queries sees a contiguous band of fewer than
  `block + m'` raw entries.

Both lists are built with cumulative sums and scatters (no sort); the only data-dependent
choice, the top-r focal set, is a 31-step radix select over the float32 bit patterns.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.dga.config import DGAConfig, LayoutSizes
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


def dga_layout(
    q: jax.Array, k: jax.Array, config: DGAConfig, scale: float, *, block: int = 1024
) -> DGALayout:
    """Builds the layout from q [B, L, Hq, D] and k [B, L, Hkv, D]; carries no gradient.

    `block` is the key-block size of the global importance pass (memory O(L * block)).
    """
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    sizes = config.sizes(q.shape[1])
    if sizes.num_focal == sizes.seq_len:
        shape = (q.shape[0], k.shape[2], sizes.seq_len)
        focal, score = jnp.ones(shape, bool), jnp.ones(shape, jnp.float32)
    elif config.selection == "global":
        score = global_importance(q, k, sizes.group_size, scale, block=block)
        focal = top_r_mask(score, sizes.num_focal)
    else:
        score, focal = streaming_selection(q, k, sizes, scale)
    return jax.vmap(jax.vmap(_assemble, (0, 0, None)), (0, 0, None))(focal, score, sizes)


def sampled_positions(seq_len: int, group_size: int) -> np.ndarray:
    """S = {m-1, 2m-1, ...} ∪ {L-1}: the queries that vote on importance."""
    return np.unique(
        np.minimum(np.arange(group_size - 1, seq_len + group_size - 1, group_size), seq_len - 1)
    )


def global_importance(
    q: jax.Array, k: jax.Array, group_size: int, scale: float, *, block: int = 1024
) -> jax.Array:
    """s_i = Σ_heads Σ_{j in S, j >= i} softmax_j(q_j k_i * scale), as [B, Hkv, L] float32.

    q: [B, L, Hq, D], k: [B, L, Hkv, D].

    Two flash-style passes over the lower triangle of (sampled query block, key block) tiles:
    the first finds each sampled query's log-sum-exp, the second sums probabilities per key.
    """
    b, seq_len, hkv = q.shape[0], q.shape[1], k.shape[2]
    tiles = _ImportanceTiles.build(q, k, group_size, scale, block)
    lse = jax.lax.map(functools.partial(_sampled_lse, tiles), jnp.arange(tiles.row_blocks))
    keys = jnp.arange(tiles.ks.shape[1] // block)
    s = jax.lax.map(functools.partial(_key_importance, tiles, lse), keys)  # [nK, B*Hkv, block]
    return s.transpose(1, 0, 2).reshape(b, hkv, -1)[..., :seq_len]


@dataclasses.dataclass(frozen=True)
class _ImportanceTiles:
    """Sampled queries and keys cut into tiles; padding is never visible."""

    qs: jax.Array  # [B*Hkv, nS (padded), G, D] sampled queries
    ks: jax.Array  # [B*Hkv, L (padded to block), D]
    row_pos: jax.Array  # [nS (padded)] int32 positions of the sampled queries, -1 for padding
    rows: int  # sampled queries per tile: a tile spans ~block positions
    block: int  # keys per tile
    group_size: int
    scale: float

    @classmethod
    def build(cls, q, k, group_size: int, scale: float, block: int) -> _ImportanceTiles:
        b, seq_len, hq, d = q.shape
        hkv = k.shape[2]
        pos = sampled_positions(seq_len, group_size)
        rows = max(1, block // group_size)
        n_rows, n_keys = _round_up(len(pos), rows), _round_up(seq_len, block)
        qs = q[:, pos].reshape(b, len(pos), hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)
        qs = jnp.pad(
            qs.reshape(b * hkv, len(pos), hq // hkv, d),
            ((0, 0), (0, n_rows - len(pos)), (0, 0), (0, 0)),
        )
        ks = jnp.pad(
            k.transpose(0, 2, 1, 3).reshape(b * hkv, seq_len, d),
            ((0, 0), (0, n_keys - seq_len), (0, 0)),
        )
        row_pos = jnp.asarray(np.pad(pos, (0, n_rows - len(pos)), constant_values=-1), jnp.int32)
        return cls(qs, ks, row_pos, rows, block, group_size, scale)

    @property
    def row_blocks(self) -> int:
        return self.qs.shape[1] // self.rows

    def positions(self, i: jax.Array) -> jax.Array:
        """[rows] positions of sampled-query tile i."""
        return jax.lax.dynamic_slice_in_dim(self.row_pos, i * self.rows, self.rows)

    def logits(self, i: jax.Array, kb: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Logits [B*Hkv, rows*G, block] of tile (i, kb) and their causal visibility."""
        g, d = self.qs.shape[2], self.qs.shape[3]
        q_tile = jax.lax.dynamic_slice_in_dim(self.qs, i * self.rows, self.rows, axis=1)
        k_tile = jax.lax.dynamic_slice_in_dim(self.ks, kb * self.block, self.block, axis=1)
        s = (
            jnp.einsum(
                "brd,bkd->brk",
                q_tile.reshape(-1, self.rows * g, d),
                k_tile,
                preferred_element_type=jnp.float32,
            )
            * self.scale
        )
        j = jnp.repeat(self.positions(i), g)  # [rows*G]
        visible = kb * self.block + jnp.arange(self.block)[None, :] <= j[:, None]
        return s, visible


def _sampled_lse(tiles: _ImportanceTiles, i: jax.Array) -> jax.Array:
    """Log-sum-exp [B*Hkv, rows*G] of sampled-query tile i over its causal keys (inf: none)."""

    def body(kb, carry):
        mx, total = carry
        s, visible = tiles.logits(i, kb)
        new = jnp.maximum(mx, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
        safe = jnp.where(jnp.isfinite(new), new, 0.0)
        p = jnp.where(visible, jnp.exp(s - safe[..., None]), 0.0)
        return new, total * jnp.exp(mx - safe) + p.sum(-1)

    shape = (tiles.qs.shape[0], tiles.rows * tiles.qs.shape[2])
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape))
    last_key_block = jnp.max(tiles.positions(i)) // tiles.block
    mx, total = jax.lax.fori_loop(0, last_key_block + 1, body, init)
    return jnp.where(total > 0, mx + jnp.log(total), jnp.inf)


def _key_importance(tiles: _ImportanceTiles, lse: jax.Array, kb: jax.Array) -> jax.Array:
    """Σ over sampled queries of softmax probabilities, for key block kb: [B*Hkv, block]."""

    def body(i, acc):
        s, visible = tiles.logits(i, kb)
        return acc + jnp.where(visible, jnp.exp(s - lse[i][..., None]), 0.0).sum(axis=1)

    first = (kb * tiles.block) // (tiles.rows * tiles.group_size)  # earlier tiles end before kb
    init = jnp.zeros((tiles.qs.shape[0], tiles.block))
    return jax.lax.fori_loop(first, tiles.row_blocks, body, init)


def top_r_mask(score: jax.Array, r: int) -> jax.Array:
    """Mask of the r largest non-negative scores along the last axis; ties: lower index wins.

    A radix select on the float32 bit patterns (monotone for non-negative floats): 31 counting
    passes find the r-th largest value, then ties at that value are taken in position order.
    """
    if r == 0:
        return jnp.zeros(score.shape, bool)
    bits = jax.lax.bitcast_convert_type(score.astype(jnp.float32), jnp.int32)

    def narrow(_, bounds):  # invariant: count(bits >= lo) >= r > count(bits >= hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid[..., None], axis=-1) >= r
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo = jnp.zeros(score.shape[:-1], jnp.int32)
    hi = jnp.full(score.shape[:-1], np.int32(0x7F800001))  # above +inf
    threshold, _ = jax.lax.fori_loop(0, 31, narrow, (lo, hi))
    threshold = threshold[..., None]
    above = bits > threshold
    ties = bits == threshold
    room = r - jnp.sum(above, axis=-1, keepdims=True)
    return above | (ties & (jnp.cumsum(ties, axis=-1) <= room))


def streaming_selection(
    q: jax.Array, k: jax.Array, sizes: LayoutSizes, scale: float
) -> tuple[jax.Array, jax.Array]:
    """Per chunk of m' positions, the last query scores the chunk and its top r' become focal.

    Returns (score [B, Hkv, L] f32, focal [B, Hkv, L] bool); the incomplete last chunk scores 0
    and has no focal token.
    """
    b, seq_len, hq, d = q.shape
    hkv, chunk, n = k.shape[2], sizes.chunk, sizes.num_groups
    per_chunk = sizes.num_focal // max(n, 1)
    last = jnp.arange(n) * chunk + chunk - 1
    q_last = q[:, last].reshape(b, n, hkv, hq // hkv, d)  # [B, C, Hkv, G, D]
    k_chunk = k[:, : n * chunk].reshape(b, n, chunk, hkv, d)  # [B, C, m', Hkv, D]
    logits = (
        jnp.einsum("bchgd,bcihd->bhcgi", q_last, k_chunk, preferred_element_type=jnp.float32)
        * scale
    )
    score = jax.nn.softmax(logits, axis=-1).sum(axis=3)  # [B, Hkv, C, m']
    ahead = (score[..., None, :] > score[..., :, None]) | (
        (score[..., None, :] == score[..., :, None])
        & (jnp.arange(chunk)[None, :] < jnp.arange(chunk)[:, None])
    )  # ahead[..., i, j]: j outranks i
    focal = jnp.sum(ahead, axis=-1) < per_chunk
    pad = ((0, 0), (0, 0), (0, seq_len - n * chunk))
    flat = (b, hkv, n * chunk)
    return jnp.pad(score.reshape(flat), pad), jnp.pad(focal.reshape(flat), pad)


def _assemble(focal: jax.Array, score: jax.Array, sizes: LayoutSizes) -> DGALayout:
    """One (batch, head): focal [L] bool, score [L] -> the two sorted entry lists."""
    seq_len, m, n_groups = sizes.seq_len, sizes.group_size, sizes.num_groups
    pos = jnp.arange(seq_len, dtype=jnp.int32)
    nonfocal = ~focal
    raw_pos = _compact(nonfocal, pos, sizes.num_raw)

    members = raw_pos[: n_groups * m].reshape(n_groups, m)
    w = score[members]
    total = w.sum(axis=-1, keepdims=True)
    w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 1.0 / m)
    if sizes.chunk:  # streaming: the group is decided by, and visible after, its chunk's last query
        key = jnp.arange(n_groups, dtype=jnp.int32) * sizes.chunk + sizes.chunk - 1
        group_from = key + 1
    else:  # global: visible from its last member on
        key = group_from = members[:, -1]
    leftover = jnp.full((sizes.num_raw - n_groups * m,), NEVER, jnp.int32)
    raw_until = jnp.concatenate([jnp.repeat(group_from, m), leftover])

    # Merge focal tokens (key p) and groups (key = decision position) by key, focal first on ties.
    focal_upto = jnp.cumsum(focal)  # focal tokens at positions <= p
    is_key = jnp.zeros(seq_len, jnp.int32).at[key].set(1)
    groups_before = jnp.cumsum(is_key) - is_key  # groups with key < p
    focal_slot = jnp.where(focal, focal_upto - 1 + groups_before, sizes.num_prefix)
    group_slot = focal_upto[key] + jnp.arange(n_groups)
    n = sizes.num_prefix
    prefix_src = _scatter(n, focal_slot, pos, group_slot, jnp.arange(n_groups, dtype=jnp.int32))
    prefix_from = _scatter(n, focal_slot, pos, group_slot, group_from)
    prefix_is_group = jnp.zeros(n, bool).at[group_slot].set(True)
    return DGALayout(
        focal, score, prefix_src, prefix_is_group, prefix_from, raw_pos, raw_until, w, sizes
    )


def _compact(mask: jax.Array, values: jax.Array, size: int) -> jax.Array:
    """values[mask] in order, as a static-size array (cumsum + scatter, no sort)."""
    slot = jnp.where(mask, jnp.cumsum(mask) - 1, size)
    return jnp.zeros(size, values.dtype).at[slot].set(values, mode="drop")


def _scatter(size, slot_a, values_a, slot_b, values_b):
    out = jnp.zeros(size, jnp.int32).at[slot_a].set(values_a, mode="drop")
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
        out = jnp.einsum(
            "bhgm,bhgmd->bhgd", layout.group_weight, members, preferred_element_type=jnp.float32
        )
        return out.astype(raw.dtype)

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


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple

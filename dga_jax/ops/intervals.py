"""Flash-style attention in XLA over KV entries that carry visibility intervals.

A query at position t sees entry e iff `start_e <= t < until_e`, with an additive logit bias.
Entries come in two lists, the shape of both DGA's compressed KV' and of dense causal attention:

- *prefix*: sorted by `start`, visible for ever. Query block i walks prefix blocks
  `[0, ceil(prefix_end_i / block_k))` in loops whose trip counts are data-dependent, so nothing
  past the last visible block is read; blocks visible to the whole query block skip masking.
- *band* (optional): sorted by `start` with non-decreasing `until`, and at most `band_lag`
  entries that start before any t are still visible at t. A sub-block of `block_band` queries
  then sees a contiguous window of fewer than `block_band + band_lag` entries: one slice each.

Softmax statistics are float32; the backward pass (a `jax.custom_vjp`) recomputes the
probabilities block by block from the saved log-sum-exp, so memory is linear in L.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dga_jax.ops.ranges import NEVER, band_ranges, prefix_ranges
from dga_jax.ops.tiles import (
    XLA_DOTS,
    BlockSizes,
    Tile,
    online_finish,
    online_init,
    online_step,
    round_up,
    tile_grads,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Entries:
    """KV entries with visibility `[start, until)` and an additive logit bias."""

    k: jax.Array  # [B, H, N, D]
    v: jax.Array  # [B, H, N, D]
    start: jax.Array  # [B, H, N] int32
    until: jax.Array | None = None  # [B, H, N] int32; None: visible for ever
    bias: jax.Array | None = None  # [B, H, N] float32; None: zero


def interval_attention(
    q: jax.Array,
    prefix: Entries,
    band: Entries | None = None,
    *,
    scale: float,
    block_sizes: BlockSizes = BlockSizes(),
    band_lag: int = 0,
    q_prefix: jax.Array | None = None,
) -> jax.Array:
    """Attention of q [B, L, Hq, D] over prefix (and band) entries [B, Hkv, N, D] -> [B, L, Hq, D].

    Query position t = row index. Query heads h use KV head h // (Hq // Hkv). `q_prefix`
    [B, L, Hq, D]: the queries the prefix entries are scored with (None: q), for attention
    whose prefix sees the queries at other RoPE positions than the band does (StreamingLLM's
    sinks, LM-Infinite's global branch); one softmax over both. Gradients reach q, q_prefix
    and the entries' k, v; `start`, `until` and `bias` are structure and carry none.
    """
    if prefix.until is not None:
        raise ValueError("prefix entries are visible for ever: pass until=None (use the band)")
    b, seq_len, hq, d = q.shape
    hkv, n_prefix = prefix.k.shape[1], max(prefix.k.shape[2], 1)
    bq = min(block_sizes.block_q, round_up(seq_len, 8))
    bk = min(block_sizes.block_k, round_up(n_prefix, 8))
    sub = math.gcd(bq, block_sizes.block_band)
    nq = -(-seq_len // bq)
    width = round_up(sub + band_lag, 8)
    if band is not None:  # a window wider than the band would only read padding
        width = min(width, round_up(max(band.k.shape[2], 1), 8))
    spec = _Spec(scale, block_q=bq, block_k=bk, band_q=sub, band_width=width, groups=hq // hkv)

    prefix_full, prefix_end = prefix_ranges(prefix.start, bq, nq)
    # Trip counts are shared by all heads: whole blocks every head sees, blocks some head sees.
    n_full = jnp.min(prefix_full.reshape(b * hkv, nq), axis=0) // bk
    n_total = -(-jnp.max(prefix_end.reshape(b * hkv, nq), axis=0) // bk)
    band_start = None
    if band is not None:
        band_start, _ = band_ranges(band.start, band.until, sub, nq * bq // sub)
        band = _flatten(band, max(round_up(band.k.shape[2], 8), width))
        band_start = jnp.minimum(band_start, band.k.shape[1] - width)
        band_start = band_start.reshape(b * hkv, nq, bq // sub).transpose(1, 0, 2)  # [nq, BH, S]
    prefix = _flatten(prefix, round_up(n_prefix, bk))

    qb = _query_blocks(q, hkv, bq)
    qpb = None if q_prefix is None else _query_blocks(q_prefix, hkv, bq)
    out = _attend(spec, qb, qpb, prefix, band, n_full, n_total, band_start)
    out = out.reshape(nq, b, hkv, bq, hq // hkv, d).transpose(1, 0, 3, 2, 4, 5)
    return out.reshape(b, nq * bq, hq, d)[:, :seq_len]


def _query_blocks(q: jax.Array, hkv: int, bq: int) -> jax.Array:
    """q [B, L, Hq, D] -> [nq, B*Hkv, bq*G, D]: row r of block i is position i*bq + r // G,
    query head r % G (zero rows past L)."""
    b, seq_len, hq, d = q.shape
    g, nq = hq // hkv, -(-seq_len // bq)
    qb = jnp.pad(
        q.reshape(b, seq_len, hkv, g, d), ((0, 0), (0, nq * bq - seq_len), (0, 0), (0, 0), (0, 0))
    )
    qb = qb.reshape(b, nq, bq, hkv, g, d).transpose(1, 0, 3, 2, 4, 5)
    return qb.reshape(nq, b * hkv, bq * g, d)


@dataclasses.dataclass(frozen=True)
class _Spec:
    scale: float
    block_q: int
    block_k: int
    band_q: int
    band_width: int
    groups: int


def _flatten(entries: Entries, size: int) -> Entries:
    """[B, H, N, ...] -> [B*H, size, ...], padded with entries that are never visible."""

    def pad(x, value):
        if x is None:
            return None
        x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
        widths = [(0, 0), (0, size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=value)

    return Entries(
        pad(entries.k, 0),
        pad(entries.v, 0),
        pad(entries.start, NEVER),
        pad(entries.until, NEVER),
        pad(entries.bias, 0),
    )


def _prefix_block(spec: _Spec, prefix: Entries, j: jax.Array, masked: bool) -> Tile:
    """Prefix block j: k, v [BH, bk, D]; start (if masked) and bias [BH, 1, bk]."""

    def take(x):
        return jax.lax.dynamic_slice_in_dim(x, j * spec.block_k, spec.block_k, axis=1)

    def row(x):
        return None if x is None else take(x)[:, None, :]

    start = row(prefix.start) if masked else None
    return Tile(take(prefix.k), take(prefix.v), start, None, row(prefix.bias))


def _band_index(spec: _Spec, starts: jax.Array) -> jax.Array:
    """[BH, S] window starts -> [BH, S * W] entry indices."""
    idx = starts[..., None] + jnp.arange(spec.band_width, dtype=jnp.int32)
    return idx.reshape(starts.shape[0], -1)


def _band_block(spec: _Spec, band: Entries, starts: jax.Array) -> Tile:
    """The band window of each query sub-block: k, v [BH, S, W, D]; rows [BH, S, 1, W]."""
    idx = _band_index(spec, starts)
    windows = (*starts.shape, spec.band_width)

    def take(x):
        out = jnp.take_along_axis(x, idx.reshape(*idx.shape, *[1] * (x.ndim - 2)), axis=1)
        return out.reshape(*windows, *x.shape[2:])

    def row(x):
        return None if x is None else take(x)[..., None, :]

    return Tile(take(band.k), take(band.v), row(band.start), row(band.until), row(band.bias))


def _scatter_add_band(spec: _Spec, x: jax.Array, starts: jax.Array, delta: jax.Array):
    """x [BH, N, D] += delta [BH, S, W, D] at the band windows (windows may overlap)."""
    idx = _band_index(spec, starts)
    return jax.vmap(_scatter_add_rows)(x, idx, delta.reshape(*idx.shape, delta.shape[-1]))


def _scatter_add_rows(x, idx, delta):
    return x.at[idx].add(delta)


def _add_prefix_block(spec: _Spec, x: jax.Array, j: jax.Array, delta: jax.Array) -> jax.Array:
    offset = j * spec.block_k
    current = jax.lax.dynamic_slice_in_dim(x, offset, spec.block_k, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(x, current + delta, offset, axis=1)


def _positions(spec: _Spec, i: jax.Array) -> jax.Array:
    rows = spec.block_q * spec.groups
    return i * spec.block_q + (jnp.arange(rows, dtype=jnp.int32) // spec.groups)[:, None]  # [R, 1]


def _split_band(spec: _Spec, x: jax.Array) -> jax.Array:
    """[BH, R, ...] rows of a query block -> [BH, S, R/S, ...] band sub-blocks."""
    return x.reshape(x.shape[0], spec.block_q // spec.band_q, -1, *x.shape[2:])


def _band_positions(spec: _Spec, t: jax.Array) -> jax.Array:
    """[R, 1] positions -> [S, R/S, 1], the band sub-blocks'."""
    return _split_band(spec, t[None])[0]


def _forward_block(spec: _Spec, prefix: Entries, band: Entries | None, xs):
    i, q, qp, n_full, n_total, band_start = xs
    t = _positions(spec, i)
    state = online_init(q.shape)
    q_prefix = q if qp is None else qp

    def step(masked):
        def body(j, state):
            tile = _prefix_block(spec, prefix, j, masked)
            return online_step(XLA_DOTS, spec.scale, state, q_prefix, t, tile)

        return body

    state = jax.lax.fori_loop(0, n_full, step(False), state)
    state = jax.lax.fori_loop(n_full, n_total, step(True), state)
    if band is not None:
        split = online_step(
            XLA_DOTS,
            spec.scale,
            tuple(_split_band(spec, x) for x in state),
            _split_band(spec, q),
            _band_positions(spec, t),
            _band_block(spec, band, band_start),
        )
        state = tuple(x.reshape(y.shape) for x, y in zip(split, state, strict=True))
    out, lse = online_finish(state)
    return out.astype(q.dtype), lse


def _attend_fwd(spec, q, qp, prefix, band, n_full, n_total, band_start):
    xs = (jnp.arange(q.shape[0], dtype=jnp.int32), q, qp, n_full, n_total, band_start)
    out, lse = jax.lax.map(functools.partial(_forward_block, spec, prefix, band), xs)
    return out, (q, qp, prefix, band, n_full, n_total, band_start, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec, q, qp, prefix, band, n_full, n_total, band_start):
    """Blocked queries q (and qp, the prefix's, or None) [nq, BH, R, D] -> out [nq, BH, R, D]."""
    return _attend_fwd(spec, q, qp, prefix, band, n_full, n_total, band_start)[0]


def _grad_step(spec: _Spec, q, do, lse, delta, t, tile: Tile):
    """Gradients of one tile: dq [..., R, D], dk and dv [..., N, D], all float32."""
    ds, p = tile_grads(XLA_DOTS, spec.scale, q, t, do, lse, delta, tile)
    return XLA_DOTS.nn(ds.astype(tile.k.dtype), tile.k), XLA_DOTS.tn(ds, q), XLA_DOTS.tn(p, do)


def _backward_block(spec: _Spec, prefix: Entries, band: Entries | None, carry, xs):
    """One query block's dq (and dqp: the prefix queries', or None) and its dk, dv added in."""
    i, q, qp, do, lse, delta, n_full, n_total, band_start = xs
    t = _positions(spec, i)
    dk_prefix, dv_prefix, dk_band, dv_band = carry
    q_prefix = q if qp is None else qp

    def step(masked):
        def body(j, state):
            dq, dk_all, dv_all = state
            block = _prefix_block(spec, prefix, j, masked)
            dq_j, dk, dv = _grad_step(spec, q_prefix, do, lse, delta, t, block)
            return (
                dq + dq_j,
                _add_prefix_block(spec, dk_all, j, dk),
                _add_prefix_block(spec, dv_all, j, dv),
            )

        return body

    state = (jnp.zeros(q.shape, jnp.float32), dk_prefix, dv_prefix)
    state = jax.lax.fori_loop(0, n_full, step(False), state)
    dq, dk_prefix, dv_prefix = jax.lax.fori_loop(n_full, n_total, step(True), state)
    dqp = None
    if qp is not None:
        dq, dqp = jnp.zeros(q.shape, jnp.float32), dq
    if band is not None:
        split = functools.partial(_split_band, spec)
        dq_b, dk, dv = _grad_step(
            spec,
            split(q),
            split(do),
            split(lse),
            split(delta),
            _band_positions(spec, t),
            _band_block(spec, band, band_start),
        )
        dq = dq + dq_b.reshape(dq.shape)
        dk_band = _scatter_add_band(spec, dk_band, band_start, dk)
        dv_band = _scatter_add_band(spec, dv_band, band_start, dv)
    return (dk_prefix, dv_prefix, dk_band, dv_band), (dq, dqp)


def _attend_bwd(spec, residuals, d_out):
    q, qp, prefix, band, n_full, n_total, band_start, out, lse = residuals
    # [nq, BH, R, 1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)

    def zeros(entries):
        if entries is None:
            return None, None
        return jnp.zeros(entries.k.shape, jnp.float32), jnp.zeros(entries.v.shape, jnp.float32)

    xs = (
        jnp.arange(q.shape[0], dtype=jnp.int32),
        q,
        qp,
        d_out,
        lse,
        delta,
        n_full,
        n_total,
        band_start,
    )
    (dk_p, dv_p, dk_b, dv_b), (dq, dqp) = jax.lax.scan(
        functools.partial(_backward_block, spec, prefix, band), (*zeros(prefix), *zeros(band)), xs
    )
    d_prefix = Entries(dk_p.astype(prefix.k.dtype), dv_p.astype(prefix.v.dtype), None)
    d_band = None
    if band is not None:
        d_band = Entries(dk_b.astype(band.k.dtype), dv_b.astype(band.v.dtype), None)
    dqp = None if qp is None else dqp.astype(qp.dtype)
    return dq.astype(q.dtype), dqp, d_prefix, d_band, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)

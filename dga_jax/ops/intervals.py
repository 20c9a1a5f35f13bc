"""Flash-style attention in XLA over KV entries that carry visibility intervals.

A query at position t sees entry e iff `start_e <= t < until_e`, with an additive logit bias.
Entries come in two lists, the shape of both DGA's compressed KV' and of dense causal attention:

- *prefix*: sorted by `start`, visible for ever. Query block i walks the whole `block_k`
  blocks that all its queries see without masking, then the edge (entries only some of its
  queries see) masked, `block_edge` entries at a time, up to the last visible one: trip counts
  are data-dependent, so nothing past it is read, and the edge is rounded up finely.
- *band* (optional): sorted by `start` with non-decreasing `until`, and at most `band_lag`
  entries that start before any t are still visible at t. A sub-block of S queries then sees a
  contiguous window of fewer than `S + band_lag` entries: one slice each. S (`band_rows`) is
  the power of two just above band_lag, at most `block_band`: a narrow band (DGA's one group)
  is not read in windows much wider than what a query sees, a wide one (a sliding window) in
  few large matmuls, `block_k` window entries at a time (`band.window_chunk`). A band that is
  one entry per position, each visible to the rest of its own period only (`band_period`:
  streaming DGA's chunks of m'), is read a period at a time instead, in query blocks of whole
  periods: P entries per query, sliced, where windows would read S + band_lag gathered ones.

Softmax statistics are float32; the backward pass (a `jax.custom_vjp`) recomputes the
probabilities block by block from the saved log-sum-exp, so memory is linear in L.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from dga_jax.ops.band import (
    add_periods,
    add_windows,
    band_rows,
    split_rows,
    take_periods,
    take_windows,
    window_chunk,
    window_width,
)
from dga_jax.ops.ranges import NEVER, Entries, band_ranges, prefix_ranges
from dga_jax.ops.tiles import (
    XLA_DOTS,
    BlockSizes,
    Tile,
    add_slice,
    cotangent_like,
    online_finish,
    online_init,
    online_step,
    round_up,
    tile_grads,
    tn_transposed,
    varying_like,
)


def interval_attention(
    q: jax.Array,
    prefix: Entries,
    band: Entries | None = None,
    *,
    scale: float,
    block_sizes: BlockSizes = BlockSizes(),
    band_lag: int = 0,
    q_prefix: jax.Array | None = None,
    band_period: int = 0,
) -> jax.Array:
    """Attention of q [B, L, Hq, D] over prefix (and band) entries [B, Hkv, N, D] -> [B, L, Hq, D].

    Query position t = row index. Query heads h use KV head h // (Hq // Hkv). `q_prefix`
    [B, L, Hq, D]: the queries the prefix entries are scored with (None: q), for attention
    whose prefix sees the queries at other RoPE positions than the band does (StreamingLLM's
    sinks, LM-Infinite's global branch); one softmax over both. Gradients reach q, q_prefix
    and the entries' k, v; `start`, `until` and `bias` are structure and carry none.

    `band_period` P > 0 says more of the band (streaming DGA's, in chunks of m'): it holds one
    entry per position, entry e visible to the queries of its own period from e on,
    [e, P * (e // P) + P), and to no other; its `until` is then not read, and `band_lag` stays
    a valid bound for the implementations that do not use the period. Query blocks are then
    whole periods (block_q rounded up to a multiple of P, as few blocks as block_q gives), and
    each period's queries read its own P entries, a slice: windows of P entries instead of
    sub-block + band_lag (m' = 18 at m = 16, gamma = 0.1: 18 against 56), and no gather.
    """
    if prefix.until is not None:
        raise ValueError("prefix entries are visible for ever: pass until=None (use the band)")
    b, seq_len, hq, d = q.shape
    hkv, n_prefix = prefix.k.shape[1], max(prefix.k.shape[2], 1)
    period = _check_period(band_period, band, seq_len)
    bq = query_block_size(block_sizes.block_q, seq_len, period)
    bk = min(block_sizes.block_k, round_up(n_prefix, 8))
    nq = -(-seq_len // bq)
    if period:
        sub = chunk = width = period
    else:
        sub = band_rows(bq, block_sizes.block_band, band_lag)
        width = window_width(sub, band_lag, None if band is None else band.k.shape[2])
        chunk, width = window_chunk(width, block_sizes.block_k)
    edge = math.gcd(bk, block_sizes.block_edge)
    spec = _Spec(scale, bq, bk, edge, sub, width, chunk, groups=hq // hkv, band_period=period)

    prefix_full, prefix_end = prefix_ranges(prefix.start, bq, nq)
    # Trip counts are shared by all heads: whole blocks every head sees, edge blocks after them.
    n_full = jnp.min(prefix_full.reshape(b * hkv, nq), axis=0) // bk
    n_edge = -(-(jnp.max(prefix_end.reshape(b * hkv, nq), axis=0) - n_full * bk) // edge)
    band_start = None
    if period:
        band = _flatten(band, nq * bq)
        band_start = jnp.arange(nq, dtype=jnp.int32) * bq  # [nq]: each block's first entry
    elif band is not None:
        band_start, _ = band_ranges(band.start, band.until, sub, nq * bq // sub)
        band = _flatten(band, max(round_up(band.k.shape[2], 8), width))
        band_start = jnp.minimum(band_start, band.k.shape[1] - width)
        band_start = band_start.reshape(b * hkv, nq, bq // sub).transpose(1, 0, 2)  # [nq, BH, S]
    prefix = _flatten(prefix, round_up(n_prefix, bk))

    qb = _query_blocks(q, hkv, bq)
    qpb = None if q_prefix is None else _query_blocks(q_prefix, hkv, bq)
    out = _attend(spec, qb, qpb, prefix, band, n_full, n_edge, band_start)
    out = out.reshape(nq, b, hkv, bq, hq // hkv, d).transpose(1, 0, 3, 2, 4, 5)
    return out.reshape(b, nq * bq, hq, d)[:, :seq_len]


def query_block_size(block_q: int, seq_len: int, period: int) -> int:
    """Queries per block: block_q (at most L rounded up to 8); with a band period P, as many
    blocks as that gives, each a whole number of periods."""
    bq = min(block_q, round_up(seq_len, 8))
    if not period:
        return bq
    return round_up(-(-seq_len // -(-seq_len // bq)), period)


def _check_period(period, band: Entries | None, seq_len: int) -> int:
    """`interval_attention`'s band_period, checked: 0 without a band."""
    if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 0:
        raise ValueError(f"band_period must be an int >= 0 (0: none), got {period!r}")
    if band is None or not period:
        return 0
    if band.k.shape[2] != seq_len:
        raise ValueError(
            f"a band with band_period={period} holds one entry per position: got "
            f"{band.k.shape[2]} entries for {seq_len} queries"
        )
    return int(period)


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
    block_edge: int
    band_q: int
    band_width: int
    band_chunk: int  # window entries per band tile: band_width, or a divisor of it
    groups: int
    band_period: int = 0  # > 0: each block's band is its own entries, a slice (`take_periods`)


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


def _walk_prefix(spec: _Spec, n_full: jax.Array, n_edge: jax.Array, visit, state):
    """state = visit(offset, masked, state) for each prefix block a query block walks: n_full
    whole blocks unmasked, then n_edge edge blocks masked."""

    def whole(j, state):
        return visit(j * spec.block_k, False, state)

    def edge(j, state):
        return visit(n_full * spec.block_k + j * spec.block_edge, True, state)

    state = jax.lax.fori_loop(0, n_full, whole, state)
    return jax.lax.fori_loop(0, n_edge, edge, state)


def _prefix_block(spec: _Spec, prefix: Entries, offset: jax.Array, masked: bool) -> Tile:
    """The prefix block at `offset`: k, v [BH, W, D]; start (if masked) and bias [BH, 1, W]
    (W: block_edge if masked, else block_k)."""
    width = spec.block_edge if masked else spec.block_k

    def take(x):
        return jax.lax.dynamic_slice_in_dim(x, offset, width, axis=1)

    def row(x):
        return None if x is None else take(x)[:, None, :]

    start = row(prefix.start) if masked else None
    return Tile(take(prefix.k), take(prefix.v), start, None, row(prefix.bias))


def _positions(spec: _Spec, i: jax.Array) -> jax.Array:
    rows = spec.block_q * spec.groups
    return i * spec.block_q + (jnp.arange(rows, dtype=jnp.int32) // spec.groups)[:, None]  # [R, 1]


def _split_band(spec: _Spec, x: jax.Array) -> jax.Array:
    """[BH, R, ...] rows of a query block -> [BH, S, R/S, ...] band sub-blocks."""
    return split_rows(x, spec.block_q // spec.band_q)


def _band_positions(spec: _Spec, t: jax.Array) -> jax.Array:
    """[R, 1] positions -> [S, R/S, 1], the band sub-blocks'."""
    return _split_band(spec, t[None])[0]


def _forward_block(spec: _Spec, prefix: Entries, band: Entries | None, xs):
    i, q, qp, n_full, n_edge, band_start = xs
    t = _positions(spec, i)
    q_prefix = q if qp is None else qp

    def visit(offset, masked, state):
        tile = _prefix_block(spec, prefix, offset, masked)
        return online_step(XLA_DOTS, spec.scale, state, q_prefix, t, tile)

    state = varying_like(online_init(q.shape), q_prefix, prefix)
    state = _walk_prefix(spec, n_full, n_edge, visit, state)
    if band is not None:
        q_band, t_band = _split_band(spec, q), _band_positions(spec, t)

        def band_step(state, tile, first):
            return online_step(XLA_DOTS, spec.scale, state, q_band, t_band, tile)

        split = tuple(_split_band(spec, x) for x in state)
        split = _band_chunks(spec, band, band_start, band_step, split)
        state = tuple(x.reshape(y.shape) for x, y in zip(split, state, strict=True))
    out, lse = online_finish(state)
    return out.astype(q.dtype), lse


def _attend_fwd(spec, q, qp, prefix, band, n_full, n_edge, band_start):
    xs = (jnp.arange(q.shape[0], dtype=jnp.int32), q, qp, n_full, n_edge, band_start)
    out, lse = jax.lax.map(functools.partial(_forward_block, spec, prefix, band), xs)
    return out, (q, qp, prefix, band, n_full, n_edge, band_start, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec, q, qp, prefix, band, n_full, n_edge, band_start):
    """Blocked queries q (and qp, the prefix's, or None) [nq, BH, R, D] -> out [nq, BH, R, D]."""
    return _attend_fwd(spec, q, qp, prefix, band, n_full, n_edge, band_start)[0]


def _grad_step(spec: _Spec, q, do, lse, delta, t, tile: Tile):
    """Gradients of one tile: dq [..., R, D], and dk, dv transposed [..., D, N] (the fast dot
    on XLA:CPU, `tiles.tn_transposed`), all float32."""
    ds, p = tile_grads(XLA_DOTS, spec.scale, q, t, do, lse, delta, tile)
    dq = XLA_DOTS.nn(ds.astype(tile.k.dtype), tile.k)
    return dq, tn_transposed(ds, q), tn_transposed(p, do)


def _backward_block(spec: _Spec, prefix: Entries, band: Entries | None, carry, xs):
    """One query block's dq (and dqp: the prefix queries', or None) and its dk, dv added in."""
    i, q, qp, do, lse, delta, n_full, n_edge, band_start = xs
    t = _positions(spec, i)
    dk_prefix, dv_prefix, dk_band, dv_band = carry
    q_prefix = q if qp is None else qp

    def visit(offset, masked, state):
        dq, dk_all, dv_all = state
        block = _prefix_block(spec, prefix, offset, masked)
        dq_j, dk, dv = _grad_step(spec, q_prefix, do, lse, delta, t, block)
        return (
            dq + dq_j,
            add_slice(dk_all, offset, dk, axis=2),  # [BH, D, N] += [BH, D, W]
            add_slice(dv_all, offset, dv, axis=2),
        )

    state = (varying_like(jnp.zeros(q.shape, jnp.float32), dk_prefix), dk_prefix, dv_prefix)
    dq, dk_prefix, dv_prefix = _walk_prefix(spec, n_full, n_edge, visit, state)
    dqp = None
    if qp is not None:
        dq, dqp = jnp.zeros(q.shape, jnp.float32), dq
    if band is not None:
        split = functools.partial(_split_band, spec)
        rows = (split(q), split(do), split(lse), split(delta), _band_positions(spec, t))

        def grads(state, tile, first):
            dq_b, dk_band, dv_band = state
            dq_c, dk, dv = _grad_step(spec, *rows, tile)
            add = add_periods if spec.band_period else add_windows
            return (
                dq_b + dq_c,
                add(dk_band, first, jnp.swapaxes(dk, -1, -2)),
                add(dv_band, first, jnp.swapaxes(dv, -1, -2)),
            )

        state = (split(dq), dk_band, dv_band)
        dq_b, dk_band, dv_band = _band_chunks(spec, band, band_start, grads, state)
        dq = dq_b.reshape(dq.shape)
    return (dk_prefix, dv_prefix, dk_band, dv_band), (dq, dqp)


def _band_chunks(spec: _Spec, band: Entries, band_start, visit, state):
    """state = visit(state, tile, first) for each chunk of every sub-block's band window, its
    entries from `first` [BH, S] on (`band.window_chunk`): one tile, or a loop over them. With
    a band period, the block's own entries from `band_start` (a scalar) on, one tile."""
    if spec.band_period:
        return visit(
            state, take_periods(band, band_start, spec.block_q, spec.band_period), band_start
        )

    def chunk(c, state):
        first = band_start + c * spec.band_chunk
        return visit(state, take_windows(band, first, spec.band_chunk), first)

    count = spec.band_width // spec.band_chunk
    return chunk(0, state) if count == 1 else jax.lax.fori_loop(0, count, chunk, state)


def _attend_bwd(spec, residuals, d_out):
    q, qp, prefix, band, n_full, n_edge, band_start, out, lse = residuals
    # [nq, BH, R, 1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)

    def zeros(entries, transposed):  # the prefix's gradients accumulate as [BH, D, N]
        if entries is None:
            return None, None
        shape = entries.k.shape
        shape = (shape[0], shape[2], shape[1]) if transposed else shape
        return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)

    xs = (
        jnp.arange(q.shape[0], dtype=jnp.int32),
        q,
        qp,
        d_out,
        lse,
        delta,
        n_full,
        n_edge,
        band_start,
    )
    carry = (*zeros(prefix, transposed=True), *zeros(band, transposed=False))
    (dk_p, dv_p, dk_b, dv_b), (dq, dqp) = jax.lax.scan(
        functools.partial(_backward_block, spec, prefix, band),
        varying_like(carry, q, qp, d_out, prefix, band),
        xs,
    )
    dk_p, dv_p = (jnp.swapaxes(x, 1, 2) for x in (dk_p, dv_p))  # [BH, D, N] -> [BH, N, D]
    d_prefix = Entries(_cotangent(dk_p, prefix.k), _cotangent(dv_p, prefix.v), None)
    d_band = None
    if band is not None:
        d_band = Entries(_cotangent(dk_b, band.k), _cotangent(dv_b, band.v), None)
    dqp = None if qp is None else _cotangent(dqp, qp)
    return _cotangent(dq, q), dqp, d_prefix, d_band, None, None, None


def _cotangent(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A float32 gradient as `primal`'s cotangent: its dtype, summed over the devices that
    share it (`tiles.cotangent_like`)."""
    return cotangent_like(ct.astype(primal.dtype), primal)


_attend.defvjp(_attend_fwd, _attend_bwd)

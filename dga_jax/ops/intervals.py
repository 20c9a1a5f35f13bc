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

Softmax statistics are float32; the backward pass (a `jax.custom_vjp`,
`dga_jax.ops.intervals_backward`) recomputes the probabilities block by block from the saved
log-sum-exp, so memory is linear in L. Both visit the same tiles (`dga_jax.ops.walk`).
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

from dga_jax.ops.band import band_rows, window_chunk, window_width
from dga_jax.ops.intervals_backward import attend_bwd
from dga_jax.ops.ranges import NEVER, Entries, band_ranges, prefix_ranges
from dga_jax.ops.tiles import (
    XLA_DOTS,
    BlockSizes,
    online_finish,
    online_init,
    online_step,
    round_up,
    varying_like,
)
from dga_jax.ops.walk import (
    WalkSpec,
    band_chunks,
    band_positions,
    positions,
    prefix_block,
    split_band,
    walk_prefix,
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
    spec = WalkSpec(scale, bq, bk, edge, sub, width, chunk, groups=hq // hkv, band_period=period)

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


def _forward_block(spec: WalkSpec, prefix: Entries, band: Entries | None, xs):
    i, q, qp, n_full, n_edge, band_start = xs
    t = positions(spec, i)
    q_prefix = q if qp is None else qp

    def visit(offset, masked, state):
        tile = prefix_block(spec, prefix, offset, masked)
        return online_step(XLA_DOTS, spec.scale, state, q_prefix, t, tile)

    state = varying_like(online_init(q.shape), q_prefix, prefix)
    state = walk_prefix(spec, n_full, n_edge, visit, state)
    if band is not None:
        q_band, t_band = split_band(spec, q), band_positions(spec, t)

        def band_step(state, tile, add):
            return online_step(XLA_DOTS, spec.scale, state, q_band, t_band, tile)

        split = tuple(split_band(spec, x) for x in state)
        split = band_chunks(spec, band, band_start, band_step, split)
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


_attend.defvjp(_attend_fwd, attend_bwd)

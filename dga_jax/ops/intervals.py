"""Flash-style attention in XLA over KV entries that carry visibility intervals.

A query at position t sees entry e iff `start_e <= t < until_e`, with an additive logit bias.
Entries come in two lists, the shape of both DGA's compressed KV' and of dense causal attention:

- *prefix*: sorted by `start`, visible for ever. Query block i walks prefix blocks
  `[0, ceil(prefix_end_i / block_k))` in a loop whose trip count is data-dependent, so nothing
  past the last visible block is read.
- *band* (optional): sorted by `start` with non-decreasing `until`, and at most `band_lag`
  entries that start before any t are still visible at t. A query block then sees a contiguous
  window of fewer than `block_q + band_lag` entries: one slice per query block.

Softmax statistics are float32; the backward pass (a `jax.custom_vjp`) recomputes the
probabilities block by block from the saved log-sum-exp, so memory is linear in L.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

NEVER = np.iinfo(np.int32).max  # `until` of entries visible for ever; `start` of padding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Entries:
    """KV entries with visibility `[start, until)` and an additive logit bias."""

    k: jax.Array  # [B, H, N, D]
    v: jax.Array  # [B, H, N, D]
    start: jax.Array  # [B, H, N] int32
    until: jax.Array | None = None  # [B, H, N] int32; None: visible for ever
    bias: jax.Array | None = None  # [B, H, N] float32; None: zero


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockRanges:
    """What the queries of block i (positions [i*bq, (i+1)*bq)) visit."""

    prefix_end: jax.Array  # [B, H, nq] int32: prefix entries [0, prefix_end) are visible to some
    band_start: jax.Array  # [B, H, nq] int32: first band entry still visible to the block
    band_end: jax.Array  # [B, H, nq] int32: one past the last band entry visible to the block


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key block sizes of the blockwise walk (clamped to the problem size)."""

    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")


def block_ranges(
    prefix: Entries, band: Entries | None, block_q: int, num_blocks: int
) -> BlockRanges:
    """Per query block: visible prefix length and band window (searchsorted, no sort)."""
    first = jnp.arange(num_blocks, dtype=jnp.int32) * block_q
    last = first + block_q - 1
    per_head = jax.vmap(jax.vmap(_count_at_most, (0, None)), (0, None))
    prefix_end = per_head(prefix.start, last)
    if band is None:
        empty = jnp.zeros_like(prefix_end)
        return BlockRanges(prefix_end, empty, empty)
    until = jnp.full(band.start.shape, NEVER, jnp.int32) if band.until is None else band.until
    return BlockRanges(prefix_end, per_head(until, first), per_head(band.start, last))


def _count_at_most(sorted_values: jax.Array, queries: jax.Array) -> jax.Array:
    return jnp.searchsorted(sorted_values, queries, side="right").astype(jnp.int32)


def interval_attention(
    q: jax.Array,
    prefix: Entries,
    band: Entries | None = None,
    *,
    scale: float,
    block_sizes: BlockSizes = BlockSizes(),
    band_lag: int = 0,
) -> jax.Array:
    """Attention of q [B, L, Hq, D] over prefix (and band) entries [B, Hkv, N, D] -> [B, L, Hq, D].

    Query position t = row index. Query heads h use KV head h // (Hq // Hkv).
    """
    b, seq_len, hq, d = q.shape
    hkv = prefix.k.shape[1]
    g = hq // hkv
    bq = min(block_sizes.block_q, _round_up(seq_len, 8))
    bk = min(block_sizes.block_k, _round_up(max(prefix.k.shape[2], 1), 8))
    nq = -(-seq_len // bq)
    width = _round_up(bq + band_lag, 8)
    spec = _Spec(scale=scale, block_q=bq, block_k=bk, band_width=width, groups=g)

    ranges = block_ranges(prefix, band, bq, nq)
    prefix_end = ranges.prefix_end.reshape(b * hkv, nq)
    n_prefix_blocks = -(-jnp.max(prefix_end, axis=0) // bk)  # [nq]: the walk covers every head
    prefix = _flatten(prefix, _round_up(max(prefix.k.shape[2], 1), bk))
    band_start = None
    if band is not None:
        band = _flatten(band, max(_round_up(band.k.shape[2], 8), width))
        band_start = jnp.minimum(ranges.band_start.reshape(b * hkv, nq), band.k.shape[1] - width).T

    # [nq, B*Hkv, bq*G, D]: row r of block i is position i*bq + r // G, query head r % G.
    qb = q.reshape(b, seq_len, hkv, g, d)
    qb = jnp.pad(qb, ((0, 0), (0, nq * bq - seq_len), (0, 0), (0, 0), (0, 0)))
    qb = (
        qb.reshape(b, nq, bq, hkv, g, d).transpose(1, 0, 3, 2, 4, 5).reshape(nq, b * hkv, bq * g, d)
    )
    out = _attend(spec, qb, prefix, band, n_prefix_blocks, band_start)
    out = out.reshape(nq, b, hkv, bq, g, d).transpose(1, 0, 3, 2, 4, 5)
    return out.reshape(b, nq * bq, hq, d)[:, :seq_len]


@dataclasses.dataclass(frozen=True)
class _Spec:
    scale: float
    block_q: int
    block_k: int
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


def _positions(spec: _Spec, i: jax.Array) -> jax.Array:
    rows = spec.block_q * spec.groups
    return i * spec.block_q + jnp.arange(rows, dtype=jnp.int32) // spec.groups  # [R]


def _prefix_block(prefix: Entries, j: jax.Array, size: int):
    def take(x):
        return None if x is None else jax.lax.dynamic_slice_in_dim(x, j * size, size, axis=1)

    return take(prefix.k), take(prefix.v), take(prefix.start), take(prefix.bias), None


def _band_block(band: Entries, starts: jax.Array, size: int):
    def take(x):
        return None if x is None else jax.vmap(_rows, (0, 0, None))(x, starts, size)

    return take(band.k), take(band.v), take(band.start), take(band.bias), take(band.until)


def _rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)


def _add_rows(x: jax.Array, start: jax.Array, delta: jax.Array) -> jax.Array:
    size = delta.shape[0]
    return jax.lax.dynamic_update_slice_in_dim(x, _rows(x, start, size) + delta, start, axis=0)


def _logits(spec, q, k, start, bias, until, t):
    """Scaled, biased logits [BH, R, N] and the visibility mask of a KV block."""
    s = jnp.einsum("brd,bnd->brn", q, k, preferred_element_type=jnp.float32) * spec.scale
    if bias is not None:
        s = s + bias[:, None, :]
    visible = start[:, None, :] <= t[None, :, None]
    if until is not None:
        visible &= t[None, :, None] < until[:, None, :]
    return s, visible


def _online_step(spec, state, q, t, block):
    k, v, start, bias, until = block
    mx, total, acc = state  # [BH, R], [BH, R], [BH, R, D] float32
    s, visible = _logits(spec, q, k, start, bias, until, t)
    m_new = jnp.maximum(mx, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row that has seen nothing yet
    p = jnp.where(visible, jnp.exp(s - m_safe[..., None]), 0.0)
    alpha = jnp.exp(mx - m_safe)
    pv = jnp.einsum("brn,bnd->brd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, alpha * total + p.sum(-1), alpha[..., None] * acc + pv


def _forward_block(spec, prefix, band, xs):
    i, q, n_blocks, band_start = xs
    t = _positions(spec, i)
    rows = (q.shape[0], q.shape[1])
    init = (jnp.full(rows, -jnp.inf), jnp.zeros(rows), jnp.zeros((*rows, q.shape[2])))

    def prefix_step(j, state):
        return _online_step(spec, state, q, t, _prefix_block(prefix, j, spec.block_k))

    mx, total, acc = jax.lax.fori_loop(0, n_blocks, prefix_step, init)
    if band is not None:
        mx, total, acc = _online_step(
            spec, (mx, total, acc), q, t, _band_block(band, band_start, spec.band_width)
        )
    seen = total > 0
    out = acc / jnp.where(seen, total, 1.0)[..., None]
    lse = jnp.where(seen, mx + jnp.log(jnp.where(seen, total, 1.0)), jnp.inf)
    return out.astype(q.dtype), lse


def _attend_fwd(spec, q, prefix, band, n_prefix_blocks, band_start):
    nq = q.shape[0]
    xs = (jnp.arange(nq, dtype=jnp.int32), q, n_prefix_blocks, band_start)
    out, lse = jax.lax.map(functools.partial(_forward_block, spec, prefix, band), xs)
    return out, (q, prefix, band, n_prefix_blocks, band_start, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec, q, prefix, band, n_prefix_blocks, band_start):
    return _attend_fwd(spec, q, prefix, band, n_prefix_blocks, band_start)[0]


def _grad_step(spec, q, do, lse, delta, t, block):
    """Gradients of one KV block: (dq [BH, R, D], dk [BH, N, D], dv [BH, N, D]) in float32."""
    k, v, start, bias, until = block
    s, visible = _logits(spec, q, k, start, bias, until, t)
    p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
    dp = jnp.einsum("brd,bnd->brn", do, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * spec.scale
    dq = jnp.einsum("brn,bnd->brd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("brn,brd->bnd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    dv = jnp.einsum("brn,brd->bnd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _backward_block(spec, prefix, band, carry, xs):
    i, q, do, lse, delta, n_blocks, band_start = xs
    t = _positions(spec, i)
    dk_prefix, dv_prefix, dk_band, dv_band = carry

    def prefix_step(j, state):
        dq, dk_all, dv_all = state
        dq_j, dk, dv = _grad_step(
            spec, q, do, lse, delta, t, _prefix_block(prefix, j, spec.block_k)
        )
        offset = j * spec.block_k
        dk_all = jax.lax.dynamic_update_slice_in_dim(
            dk_all, jax.lax.dynamic_slice_in_dim(dk_all, offset, spec.block_k, 1) + dk, offset, 1
        )
        dv_all = jax.lax.dynamic_update_slice_in_dim(
            dv_all, jax.lax.dynamic_slice_in_dim(dv_all, offset, spec.block_k, 1) + dv, offset, 1
        )
        return dq + dq_j, dk_all, dv_all

    init = (jnp.zeros(q.shape, jnp.float32), dk_prefix, dv_prefix)
    dq, dk_prefix, dv_prefix = jax.lax.fori_loop(0, n_blocks, prefix_step, init)
    if band is not None:
        block = _band_block(band, band_start, spec.band_width)
        dq_b, dk, dv = _grad_step(spec, q, do, lse, delta, t, block)
        dq = dq + dq_b
        dk_band = jax.vmap(_add_rows)(dk_band, band_start, dk)
        dv_band = jax.vmap(_add_rows)(dv_band, band_start, dv)
    return (dk_prefix, dv_prefix, dk_band, dv_band), dq


def _attend_bwd(spec, residuals, d_out):
    q, prefix, band, n_prefix_blocks, band_start, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq, BH, R]

    def zeros(x):
        return None if x is None else jnp.zeros(x.shape, jnp.float32)

    band_k, band_v = (None, None) if band is None else (band.k, band.v)
    init = (zeros(prefix.k), zeros(prefix.v), zeros(band_k), zeros(band_v))
    xs = (
        jnp.arange(q.shape[0], dtype=jnp.int32),
        q,
        d_out,
        lse,
        delta,
        n_prefix_blocks,
        band_start,
    )
    (dk_p, dv_p, dk_b, dv_b), dq = jax.lax.scan(
        functools.partial(_backward_block, spec, prefix, band), init, xs
    )
    d_prefix = Entries(dk_p.astype(prefix.k.dtype), dv_p.astype(prefix.v.dtype), None)
    d_band = (
        None
        if band is None
        else Entries(dk_b.astype(band.k.dtype), dv_b.astype(band.v.dtype), None)
    )
    return dq.astype(q.dtype), d_prefix, d_band, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple

"""The backward of `interval_attention`'s walk (its `jax.custom_vjp`, `dga_jax.ops.intervals`).

Each query block visits the tiles of its forward again (`dga_jax.ops.walk`) and recomputes the
probabilities from the saved log-sum-exp: its dq directly, the entries' dK and dV added across
blocks in the scan's carry (the prefix's as [BH, D, N], the fast layout on XLA:CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dga_jax.ops.ranges import Entries
from dga_jax.ops.tiles import (
    XLA_DOTS,
    Tile,
    add_slice,
    cotangent_like,
    tile_grads,
    tn_transposed,
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


def attend_bwd(spec: WalkSpec, residuals, d_out: jax.Array):
    """The walk's VJP: the forward's residuals and d_out [nq, BH, R, D] -> cotangents of q, the
    prefix queries (or None), the prefix and band entries' k, v; None for the trip counts."""
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


def _grad_step(spec: WalkSpec, q, do, lse, delta, t, tile: Tile):
    """Gradients of one tile: dq [..., R, D], and dk, dv transposed [..., D, N] (the fast dot
    on XLA:CPU, `tiles.tn_transposed`), all float32."""
    ds, p = tile_grads(XLA_DOTS, spec.scale, q, t, do, lse, delta, tile)
    dq = XLA_DOTS.nn(ds.astype(tile.k.dtype), tile.k)
    return dq, tn_transposed(ds, q), tn_transposed(p, do)


def _backward_block(spec: WalkSpec, prefix: Entries, band: Entries | None, carry, xs):
    """One query block's dq (and dqp: the prefix queries', or None) and its dk, dv added in."""
    i, q, qp, do, lse, delta, n_full, n_edge, band_start = xs
    t = positions(spec, i)
    dk_prefix, dv_prefix, dk_band, dv_band = carry
    q_prefix = q if qp is None else qp

    def visit(offset, masked, state):
        dq, dk_all, dv_all = state
        block = prefix_block(spec, prefix, offset, masked)
        dq_j, dk, dv = _grad_step(spec, q_prefix, do, lse, delta, t, block)
        return (
            dq + dq_j,
            add_slice(dk_all, offset, dk, axis=2),  # [BH, D, N] += [BH, D, W]
            add_slice(dv_all, offset, dv, axis=2),
        )

    state = (varying_like(jnp.zeros(q.shape, jnp.float32), dk_prefix), dk_prefix, dv_prefix)
    dq, dk_prefix, dv_prefix = walk_prefix(spec, n_full, n_edge, visit, state)
    dqp = None
    if qp is not None:
        dq, dqp = jnp.zeros(q.shape, jnp.float32), dq
    if band is not None:
        split = functools.partial(split_band, spec)
        rows = (split(q), split(do), split(lse), split(delta), band_positions(spec, t))

        def grads(state, tile, add):
            dq_b, dk_band, dv_band = state
            dq_c, dk, dv = _grad_step(spec, *rows, tile)
            return (
                dq_b + dq_c,
                add(dk_band, jnp.swapaxes(dk, -1, -2)),
                add(dv_band, jnp.swapaxes(dv, -1, -2)),
            )

        state = (split(dq), dk_band, dv_band)
        dq_b, dk_band, dv_band = band_chunks(spec, band, band_start, grads, state)
        dq = dq_b.reshape(dq.shape)
    return (dk_prefix, dv_prefix, dk_band, dv_band), (dq, dqp)

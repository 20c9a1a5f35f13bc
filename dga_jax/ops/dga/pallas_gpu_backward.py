"""The GPU backward kernels (Triton): dQ on the forward's walk, key-stationary dK'/dV'.

- dQ, grid (query block, batch, query head): the forward's walk, recomputing probabilities
  from the log-sum-exp;
- dK'/dV', grid (entry block, batch, KV head): loops over the query heads of the KV head and
  the query blocks that see the entry block (on-device `pallas_common.KeyBlocks` ranges).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dga_jax.ops.dga import pallas_common as common
from dga_jax.ops.dga.pallas_common import split_refs
from dga_jax.ops.dga.pallas_gpu_forward import (
    DOTS,
    block_args,
    compiler_params,
    entry_args,
    positions,
    query_grid,
    query_specs,
    walk,
)
from dga_jax.ops.tiles import Tile, tile_grads, varying_struct


def _dq_kernel(*refs, spec: common.KernelSpec, queries: int):
    """`queries` = 2: the prefix has its own queries (the last input) and gradient (output)."""
    block_refs, q_refs, prefix_refs, band_refs, dq_refs = split_refs(
        refs, 4, 3 + queries, 4, 4, queries
    )
    q_ref, do_ref, lse_ref, delta_ref = q_refs[:4]
    q, do, t = q_ref[...], do_ref[...], positions(spec, pl.program_id(0))
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def step(q, at: int):
        def update(acc, tile):
            ds, _ = tile_grads(DOTS, spec.scale, q, t, do, lse, delta, tile)
            grad = acc[at] + DOTS.nn(ds.astype(tile.k.dtype), tile.k)
            return (*acc[:at], grad, *acc[at + 1 :])

        return update

    steps = (step(q_refs[-1][...] if queries == 2 else q, queries - 1), step(q, 0))
    acc = (jnp.zeros(q.shape, jnp.float32),) * queries
    acc = walk(spec, block_refs, prefix_refs, band_refs, steps, acc)
    for ref, grad in zip(dq_refs, acc, strict=True):
        ref[...] = grad.astype(ref.dtype)


def _dkv_kernel(*refs, spec: common.KernelSpec, band: bool):
    (first_ref, second_ref), q_refs, entry_refs, (dk_ref, dv_ref) = split_refs(refs, 2, 4, 4, 2)
    q_ref, do_ref, lse_ref, delta_ref = q_refs
    j, bq = pl.program_id(0), spec.block_q
    nq = q_ref.shape[1] // bq
    k, v, start = entry_refs[0][...], entry_refs[1][...], entry_refs[2][...][None, :]
    last = entry_refs[3][...][None, :]  # band: until; prefix: bias

    def q_body(masked):
        def body(index, carry):
            g, i = index // nq, index % nq
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]
            lse, delta = lse_ref[g, rows][:, None], delta_ref[g, rows][:, None]
            if band:
                tile = Tile(k, v, start, last)
            else:
                tile = Tile(k, v, start if masked else None, None, last)
            ds, p = tile_grads(DOTS, spec.scale, q, positions(spec, i), do, lse, delta, tile)
            dk, dv = carry
            return dk + DOTS.tn(ds, q), dv + DOTS.tn(p, do)

        return body

    def loop(start_block, end_block, masked, carry):
        """Query blocks [start_block, end_block) of every query head of this KV head."""

        def per_head(g, carry):
            return jax.lax.fori_loop(
                g * nq + start_block, g * nq + end_block, q_body(masked), carry
            )

        return jax.lax.fori_loop(0, spec.groups, per_head, carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    first, second = first_ref[j], second_ref[j]
    carry = loop(first, second, True, carry)  # band: [first, end); prefix: [first, full)
    if not band:
        carry = loop(jnp.maximum(second, first), nq, False, carry)
    dk_ref[...] = carry[0].astype(dk_ref.dtype)
    dv_ref[...] = carry[1].astype(dv_ref.dtype)


def dq(spec, ops, blocks: common.QueryBlocks, do, lse, delta):
    """-> dq, and the prefix queries' dq (None without them), [B, Hq, Lp, D] in q's dtype."""
    query_block, query_row, ranges, prefix, band = query_specs(spec, ops)
    extra = common.query_args(ops)[1:]
    queries = 1 + len(extra)
    grads = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, queries=queries),
        grid=query_grid(spec, ops),
        in_specs=[
            *ranges,
            query_block,
            query_block,
            query_row,
            query_row,
            *[query_block] * len(extra),
            *prefix,
            *band,
        ],
        out_specs=[query_block] * queries,
        out_shape=[varying_struct(ops.q.shape, ops.q.dtype, ops.q)] * queries,
        compiler_params=compiler_params(ops.q.shape[-1], spec.launch),
        interpret=spec.interpret,
        name="interval_dq",
    )(*block_args(blocks), ops.q, do, lse, delta, *extra, *entry_args(ops))
    return grads[0], (grads[1] if queries == 2 else None)


def dkv(spec, ops, blocks: common.KeyBlocks, do, lse, delta):
    """-> (dk, dv) of the prefix entries and of the band entries, in their dtypes."""
    b, hq, lp, d = ops.q.shape
    hkv, g = hq // spec.groups, spec.groups
    per_kv = (b, hkv, g, lp)
    heads = [x.reshape(*per_kv, *x.shape[3:]) for x in (ops.q, do, lse, delta)]
    prefix_heads = [ops.prefix_queries.reshape(*per_kv, d), *heads[1:]]
    prefix = _dkv_call(
        spec,
        prefix_heads,
        (blocks.prefix_first, blocks.prefix_full),
        entry_args(ops)[:4],
        band=False,
    )
    band = _dkv_call(
        spec, heads, (blocks.band_first, blocks.band_end), entry_args(ops)[4:], band=True
    )
    return (*prefix, *band)


def _dkv_call(spec, heads, ranges, entries, band: bool):
    k = entries[0]
    b, hkv, n, d = k.shape
    nkb = n // spec.block_k
    bk = spec.block_k

    def whole(x):  # all query rows of this KV head's query heads
        shape = (None, None, *x.shape[2:])
        return pl.BlockSpec(shape, lambda j, b, h: (b, h) + (0,) * (x.ndim - 2))

    def block(x):  # this entry block
        shape = (None, None, bk, *x.shape[3:])
        return pl.BlockSpec(shape, lambda j, b, h: (b, h, j) + (0,) * (x.ndim - 3))

    range_spec = pl.BlockSpec((None, None, nkb), lambda j, b, h: (b, h, 0))
    out_spec = block(k)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, band=band),
        grid=(nkb, b, hkv),
        in_specs=[range_spec, range_spec, *[whole(x) for x in heads], *[block(x) for x in entries]],
        out_specs=[out_spec, out_spec],
        out_shape=[varying_struct(k.shape, k.dtype, k)] * 2,
        compiler_params=compiler_params(d, spec.launch),
        interpret=spec.interpret,
        name="interval_dkv_band" if band else "interval_dkv_prefix",
    )(*ranges, *heads, *entries)

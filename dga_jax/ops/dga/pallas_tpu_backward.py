"""The TPU backward kernels (Mosaic): dQ on the forward's query walk, key-stationary dK'/dV'.

- dQ, grid (batch, query head, query block, step): the forward's walk (`QueryWalk`);
- dK'/dV' of the prefix, grid (batch, KV head, entry block, query block, query head): only the
  first query block that sees each entry block and the first that sees it whole are prefetched,
  and earlier steps copy nothing;
- dK'/dV' of the band, grid (batch, KV head, step, query head) over a compressed on-device list
  of (entry block, query block) pairs, whose static length rests on DGA's structure (a band
  block is seen only until a few band blocks later, plus the leftovers'). If an input ever
  needed more steps, the result is NaN, never silently wrong.

The backward kernels read the log-sum-exp and delta as [1, bq] rows and turn them into columns
in VMEM, as splash attention does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dga_jax.ops.dga import pallas_common as common
from dga_jax.ops.dga.pallas_common import split_refs
from dga_jax.ops.dga.pallas_tpu_forward import (
    DOTS,
    QueryWalk,
    column,
    compiler_params,
    entry_args,
    flat_ranges,
    positions,
    query_rows,
    query_step,
)
from dga_jax.ops.tiles import Tile, tile_grads, varying_struct


def _dq_kernel(*refs, spec, walk, queries: int):
    """`queries` = 2: the prefix has its own queries (the last input), gradient (the last
    output) and accumulator."""
    range_refs, q_refs, prefix_refs, band_refs, dq_refs, acc_refs = split_refs(
        refs, 4, 3 + queries, 4, 4, queries, queries
    )
    _, do_ref, lse_ref, delta_ref = q_refs[:4]
    s = pl.program_id(3)

    @pl.when(s == 0)
    def _():
        _init_acc(acc_refs)

    def update(tile, t, part: int):
        q = q_refs[-1 if part == 0 and queries == 2 else 0][...]
        lse, delta = column(lse_ref), column(delta_ref)
        ds, _ = tile_grads(DOTS, spec.scale, q, t, do_ref[...], lse, delta, tile)
        acc_refs[-1 if part == 0 else 0][...] += DOTS.nn(ds.astype(tile.k.dtype), tile.k)

    query_step(walk, spec, range_refs, prefix_refs, band_refs, update)

    @pl.when(s == walk.steps - 1)
    def _():
        _write_acc(acc_refs, dq_refs)


def dq(spec, ops, blocks: common.QueryBlocks, do, lse, delta):
    """-> dq, and the prefix queries' dq (None without them), [B, Hq, Lp, D] in q's dtype."""
    walk = QueryWalk(spec, ops)
    specs = walk.specs(spec, ops)
    query, row = specs["query"], specs["row"]
    extra = common.query_args(ops)[1:]
    queries = 1 + len(extra)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(ops.q.shape[0], ops.q.shape[1], walk.nq, walk.steps),
        in_specs=[query, query, row, row, *[query] * len(extra), *specs["prefix"], *specs["band"]],
        out_specs=[query] * queries,
        scratch_shapes=[pltpu.VMEM((spec.block_q, ops.q.shape[-1]), jnp.float32)] * queries,
    )
    row_args = (query_rows(lse, spec.block_q), query_rows(delta, spec.block_q))
    grads = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, walk=walk, queries=queries),
        grid_spec=grid_spec,
        out_shape=[varying_struct(ops.q.shape, ops.q.dtype, ops.q)] * queries,
        compiler_params=compiler_params(),
        interpret=spec.interpret,
        name="interval_dq",
    )(*flat_ranges(blocks), ops.q, do, *row_args, *extra, *entry_args(ops))
    return grads[0], (grads[1] if queries == 2 else None)


# --- dK'/dV': key-stationary, one entry block accumulating over the queries that see it -------

_COMPUTE, _FIRST, _LAST = 1, 2, 4
_FLAG_BITS = 3


def step_list(first: jax.Array, end: jax.Array, num_steps: int):
    """The (entry block, query block << 3 | flags) of each step, for one head's band blocks.

    first, end: [nkb] int32. Entry block j is seen by query blocks [first_j, end_j). A block
    nobody sees still gets one step (to write its zero gradient). Steps past the total repeat
    the last one with no flags. Returns two [num_steps] int32 arrays and whether all fit.
    """
    count = jnp.maximum(end - first, 1)
    ends = jnp.cumsum(count)
    total = ends[-1]
    s = jnp.minimum(jnp.arange(num_steps, dtype=jnp.int32), total - 1)
    block = jnp.searchsorted(ends, s, side="right").astype(jnp.int32)
    offset = s - (ends[block] - count[block])
    query = jnp.minimum(first[block] + offset, end[block] - 1).clip(0)
    flags = (
        jnp.where(end[block] > first[block], _COMPUTE, 0)
        | jnp.where(offset == 0, _FIRST, 0)
        | jnp.where(offset == count[block] - 1, _LAST, 0)
    )
    flags = jnp.where(jnp.arange(num_steps) < total, flags, 0)
    return block, query << _FLAG_BITS | flags, total <= num_steps


def _accumulate(spec, i, q_refs, tile: Tile, acc_refs) -> None:
    """dK, dV scratch [bk, D] += this query block's contribution to the entry block."""
    q_ref, do_ref, lse_ref, delta_ref = q_refs
    q, do = q_ref[...], do_ref[...]
    lse, delta = column(lse_ref), column(delta_ref)
    ds, p = tile_grads(DOTS, spec.scale, q, positions(spec, i), do, lse, delta, tile)
    acc_refs[0][...] += DOTS.tn(ds, q)
    acc_refs[1][...] += DOTS.tn(p, do)


def _init_acc(acc_refs) -> None:
    for ref in acc_refs:
        ref[...] = jnp.zeros(ref.shape, jnp.float32)


def _write_acc(acc_refs, out_refs) -> None:
    for acc, out in zip(acc_refs, out_refs, strict=True):
        out[...] = acc[...].astype(out.dtype)


def _dkv_prefix_kernel(*refs, spec):
    """Grid (b, kv head, entry block j, query block i, query head g): every query block from
    the first that sees block j on; skipped steps map to that first block (no copy)."""
    (first_ref, full_ref), q_refs, entry_refs, outs, acc = split_refs(refs, 2, 4, 4, 2, 2)
    b, h, j, i, g = (pl.program_id(axis) for axis in range(5))
    r = (b * pl.num_programs(1) + h) * pl.num_programs(2) + j
    first, full = first_ref[r], full_ref[r]
    last_i, last_g = pl.num_programs(3) - 1, pl.num_programs(4) - 1
    k_ref, v_ref, start_ref, bias_ref = entry_refs

    @pl.when((i == 0) & (g == 0))
    def _():
        _init_acc(acc)

    @pl.when((i >= first) & (i < full))
    def _():
        tile = Tile(k_ref[...], v_ref[...], start_ref[...], None, bias_ref[...])
        _accumulate(spec, i, q_refs, tile, acc)

    @pl.when((i >= first) & (i >= full))
    def _():
        _accumulate(spec, i, q_refs, Tile(k_ref[...], v_ref[...], None, None, bias_ref[...]), acc)

    @pl.when((i == last_i) & (g == last_g))
    def _():
        _write_acc(acc, outs)


def _dkv_band_kernel(*refs, spec):
    """Grid (b, kv head, step, query head g) over the compressed (band block, query block) list."""
    (block_ref, packed_ref), q_refs, entry_refs, outs, acc = split_refs(refs, 2, 4, 4, 2, 2)
    b, h, s, g = (pl.program_id(axis) for axis in range(4))
    packed = packed_ref[(b * pl.num_programs(1) + h) * pl.num_programs(2) + s]
    flags = packed & ((1 << _FLAG_BITS) - 1)
    k_ref, v_ref, start_ref, until_ref = entry_refs

    @pl.when(((flags & _FIRST) != 0) & (g == 0))
    def _():
        _init_acc(acc)

    @pl.when((flags & _COMPUTE) != 0)
    def _():
        tile = Tile(k_ref[...], v_ref[...], start_ref[...], until_ref[...])
        _accumulate(spec, packed >> _FLAG_BITS, q_refs, tile, acc)

    @pl.when(((flags & _LAST) != 0) & (g == pl.num_programs(3) - 1))
    def _():
        _write_acc(acc, outs)


def dkv(spec, ops, blocks: common.KeyBlocks, do, lse, delta):
    """-> (dk, dv) of the prefix entries and of the band entries, in their dtypes."""
    q_args = (ops.q, do, query_rows(lse, spec.block_q), query_rows(delta, spec.block_q))
    entries = entry_args(ops)
    dpk, dpv = _dkv_prefix_call(spec, blocks, (ops.prefix_queries, *q_args[1:]), entries[:4])
    nq = spec.num_q_blocks(ops.q.shape[2])
    n_band = ops.band_k.shape[2] // spec.block_k
    # The band entries still visible at a query started at most band_lag entries earlier (one
    # group or chunk), so band block j is seen only by query blocks before the start of block
    # j + ahead, or to the end for the last blocks (leftovers): the counts telescope.
    ahead = 2 + spec.band_lag // spec.block_k
    num_steps = min(n_band * nq, ahead * nq + (ahead + 1) * n_band)
    per_head = jax.vmap(jax.vmap(functools.partial(step_list, num_steps=num_steps)))
    block, packed, fits = per_head(blocks.band_first, blocks.band_end)
    lists = (block.reshape(-1), packed.reshape(-1))
    dbk, dbv = _dkv_band_call(spec, lists, num_steps, q_args, entries[4:])
    fits = jnp.all(fits)  # never false for DGA layouts; NaN rather than a silently wrong gradient
    return dpk, dpv, jnp.where(fits, dbk, jnp.nan), jnp.where(fits, dbv, jnp.nan)


def _dkv_prefix_call(spec, blocks: common.KeyBlocks, q_args, entries):
    k = entries[0]
    b, hkv, n, d = k.shape
    g, bq, bk = spec.groups, spec.block_q, spec.block_k
    nkb, nq = n // bk, spec.num_q_blocks(q_args[0].shape[2])

    def query_block(b_, h, j, i, first_ref):
        return jnp.minimum(jnp.maximum(i, first_ref[(b_ * hkv + h) * nkb + j]), nq - 1)

    def query(b_, h, j, i, g_, first_ref, full_ref):
        return b_, h * g + g_, query_block(b_, h, j, i, first_ref), 0

    def row(b_, h, j, i, g_, first_ref, full_ref):
        return b_, h * g + g_, query_block(b_, h, j, i, first_ref), 0, 0

    def entry_kv(b_, h, j, i, g_, *_):
        return b_, h, j, 0

    def entry_row(b_, h, j, i, g_, *_):
        return b_, h, 0, j

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, nkb, nq, g),
        in_specs=_dkv_in_specs(bq, bk, d, query, row, entry_kv, entry_row),
        out_specs=[pl.BlockSpec((None, None, bk, d), entry_kv)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2,
    )
    ranges = (blocks.prefix_first.reshape(-1), blocks.prefix_full.reshape(-1))
    return pl.pallas_call(
        functools.partial(_dkv_prefix_kernel, spec=spec),
        grid_spec=grid_spec,
        out_shape=[varying_struct(k.shape, k.dtype, k)] * 2,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=spec.interpret,
        name="interval_dkv_prefix",
    )(*ranges, *q_args, *entries)


def _dkv_band_call(spec, lists, num_steps: int, q_args, entries):
    k = entries[0]
    b, hkv, n, d = k.shape
    g, bq, bk = spec.groups, spec.block_q, spec.block_k

    def at(b_, h, s):
        return (b_ * hkv + h) * num_steps + s

    def query(b_, h, s, g_, block_ref, packed_ref):
        return b_, h * g + g_, packed_ref[at(b_, h, s)] >> _FLAG_BITS, 0

    def row(b_, h, s, g_, block_ref, packed_ref):
        return b_, h * g + g_, packed_ref[at(b_, h, s)] >> _FLAG_BITS, 0, 0

    def entry_kv(b_, h, s, g_, block_ref, packed_ref):
        return b_, h, block_ref[at(b_, h, s)], 0

    def entry_row(b_, h, s, g_, block_ref, packed_ref):
        return b_, h, 0, block_ref[at(b_, h, s)]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, num_steps, g),
        in_specs=_dkv_in_specs(bq, bk, d, query, row, entry_kv, entry_row),
        out_specs=[pl.BlockSpec((None, None, bk, d), entry_kv)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2,
    )
    return pl.pallas_call(
        functools.partial(_dkv_band_kernel, spec=spec),
        grid_spec=grid_spec,
        out_shape=[varying_struct(k.shape, k.dtype, k)] * 2,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=spec.interpret,
        name="interval_dkv_band",
    )(*lists, *q_args, *entries)


def _dkv_in_specs(bq, bk, d, query, row, entry_kv, entry_row):
    """q, do [bq, D]; lse, delta rows [1, bq]; entries' k, v [bk, D] and two rows [1, bk]."""
    query_spec, row_spec = (
        pl.BlockSpec((None, None, bq, d), query),
        pl.BlockSpec((None, None, None, 1, bq), row),
    )
    kv_spec, entry_row_spec = (
        pl.BlockSpec((None, None, bk, d), entry_kv),
        pl.BlockSpec((None, None, 1, bk), entry_row),
    )
    return [
        query_spec,
        query_spec,
        row_spec,
        row_spec,
        kv_spec,
        kv_spec,
        entry_row_spec,
        entry_row_spec,
    ]

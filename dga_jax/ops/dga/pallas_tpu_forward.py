"""The TPU forward kernel (Mosaic): the query-stationary walk over scalar-prefetched ranges.

Grid (batch, query head, query block, step): steps `[0, NP/bk)` walk the prefix (unmasked
below `full`), then `band_steps` steps the band; accumulators live in VMEM scratch across steps.
A grid step a query block does not need maps to the block it already holds, so it copies
nothing, and `pl.when` skips its compute. The dQ kernel (`pallas_tpu_backward`) walks the same
grid with `QueryWalk` and `query_step`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dga_jax.ops.dga import pallas_common as common
from dga_jax.ops.dga.pallas_common import split_refs
from dga_jax.ops.tiles import (
    Dots,
    Tile,
    online_finish,
    online_init,
    online_step,
    varying_struct,
)

LANES = 128  # Mosaic's lane width
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _dot_nt(a, b):
    return jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return jax.lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    # Transpose in float32, then cast: packed (bf16) transposes are Mosaic's weakest spot.
    return jax.lax.dot_general(a.T.astype(b.dtype), b, _NN, preferred_element_type=jnp.float32)


DOTS = Dots(nt=_dot_nt, nn=_dot_nn, tn=_dot_tn)


# --- the query walk of the forward and dQ kernels: grid (b, h, i, s) ---------------------------


def _band_steps(spec: common.KernelSpec, n_band_blocks: int) -> int:
    """Band blocks one query block can touch: fewer than bq + lag entries, unaligned."""
    return min(n_band_blocks, -(-(spec.block_q + spec.band_lag) // spec.block_k) + 1)


class QueryWalk:
    """Where step s of query block i is: index maps and the step's kind, from prefetched ranges."""

    def __init__(self, spec: common.KernelSpec, ops: common.Operands):
        self.g = spec.groups
        self.hkv = ops.prefix_k.shape[1]
        self.nq = spec.num_q_blocks(ops.q.shape[2])
        self.n_prefix = ops.prefix_k.shape[2] // spec.block_k
        self.n_band = ops.band_k.shape[2] // spec.block_k
        self.steps = self.n_prefix + _band_steps(spec, self.n_band)

    def row(self, b, h, i):
        return (b * self.hkv + _kv_head(h, self.g)) * self.nq + i

    def prefix_block(self, b, h, i, s, full_ref, prefix_ref, first_ref, count_ref):
        return jnp.minimum(s, jnp.maximum(prefix_ref[self.row(b, h, i)] - 1, 0))

    def band_block(self, b, h, i, s, full_ref, prefix_ref, first_ref, count_ref):
        r = self.row(b, h, i)
        offset = jnp.clip(s - prefix_ref[r], 0, jnp.maximum(count_ref[r] - 1, 0))
        return jnp.minimum(first_ref[r] + offset, self.n_band - 1)

    def specs(self, spec: common.KernelSpec, ops: common.Operands):
        bq, bk, d = spec.block_q, spec.block_k, ops.q.shape[-1]
        g = self.g

        def query(b, h, i, s, *_):
            return b, h, i, 0

        def query_row(b, h, i, s, *_):
            return b, h, i, 0, 0

        def prefix_kv(b, h, i, s, *refs):
            return b, _kv_head(h, g), self.prefix_block(b, h, i, s, *refs), 0

        def prefix_row(b, h, i, s, *refs):
            return b, _kv_head(h, g), 0, self.prefix_block(b, h, i, s, *refs)

        def band_kv(b, h, i, s, *refs):
            return b, _kv_head(h, g), self.band_block(b, h, i, s, *refs), 0

        def band_row(b, h, i, s, *refs):
            return b, _kv_head(h, g), 0, self.band_block(b, h, i, s, *refs)

        entries_kv, entries_row = (bk, d), (1, bk)
        return dict(
            query=pl.BlockSpec((None, None, bq, d), query),
            lanes=pl.BlockSpec((None, None, bq, LANES), query),
            row=pl.BlockSpec((None, None, None, 1, bq), query_row),
            prefix=[
                pl.BlockSpec((None, None, *entries_kv), prefix_kv),
                pl.BlockSpec((None, None, *entries_kv), prefix_kv),
                pl.BlockSpec((None, None, *entries_row), prefix_row),
                pl.BlockSpec((None, None, *entries_row), prefix_row),
            ],
            band=[
                pl.BlockSpec((None, None, *entries_kv), band_kv),
                pl.BlockSpec((None, None, *entries_kv), band_kv),
                pl.BlockSpec((None, None, *entries_row), band_row),
                pl.BlockSpec((None, None, *entries_row), band_row),
            ],
        )


def _kv_head(h, groups: int):
    """h // groups for grid indices (non-negative), without a signed floor division on TPU.

    `groups` takes h's dtype: under jax_enable_x64 a Python int would be int64, which lax.div
    refuses beside the grid's int32 indices."""
    return jax.lax.div(h, jnp.asarray(groups, h.dtype))


def positions(spec: common.KernelSpec, i) -> jax.Array:
    shape = (spec.block_q, spec.block_k)
    return i * spec.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)  # [bq, bk]


def query_step(walk: QueryWalk, spec, range_refs, prefix_refs, band_refs, update):
    """Calls `update(tile, t, part)` for this grid step's tile (part 0: prefix, 1: band), if
    the query block needs one."""
    full_ref, prefix_ref, first_ref, count_ref = range_refs
    b, h, i, s = (pl.program_id(axis) for axis in range(4))
    r = walk.row(b, h, i)
    full, n_prefix = full_ref[r], prefix_ref[r]
    t = positions(spec, i)
    pk, pv, pstart, pbias = prefix_refs

    @pl.when(s < full)
    def _():
        update(Tile(pk[...], pv[...], None, None, pbias[...]), t, 0)

    @pl.when((s >= full) & (s < n_prefix))
    def _():
        update(Tile(pk[...], pv[...], pstart[...], None, pbias[...]), t, 0)

    @pl.when((s >= n_prefix) & (s < n_prefix + count_ref[r]))
    def _():
        bk_, bv, bstart, buntil = band_refs
        update(Tile(bk_[...], bv[...], bstart[...], buntil[...]), t, 1)


def _forward_kernel(*refs, spec, walk, queries: int):
    """`queries` refs: q, or q and the prefix's queries."""
    groups = split_refs(refs, 4, queries, 4, 4, 2, 3)
    range_refs, q_refs, prefix_refs, band_refs, outs, scratch = groups
    o_ref, lse_ref = outs
    m_ref, l_ref, acc_ref = scratch
    s = pl.program_id(3)

    @pl.when(s == 0)
    def _():
        init = online_init(q_refs[0].shape)
        for ref, value in zip(scratch, init, strict=True):
            ref[...] = value

    def update(tile, t, part: int):
        q = q_refs[-1 if part == 0 else 0][...]
        state = (m_ref[...], l_ref[...], acc_ref[...])
        state = online_step(DOTS, spec.scale, state, q, t, tile)
        for ref, value in zip(scratch, state, strict=True):
            ref[...] = value

    query_step(walk, spec, range_refs, prefix_refs, band_refs, update)

    @pl.when(s == walk.steps - 1)
    def _():
        out, lse = online_finish((m_ref[...], l_ref[...], acc_ref[...]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)  # lane-replicated, as splash does


def flat_ranges(blocks: common.QueryBlocks):
    return tuple(
        x.reshape(-1)
        for x in (blocks.full, blocks.prefix_blocks, blocks.band_first, blocks.band_blocks)
    )


def rows(x: jax.Array) -> jax.Array:
    """[B, H, N] per-entry values -> [B, H, 1, N]: one lane-major row per head."""
    return x[:, :, None, :]


def query_rows(x: jax.Array, block_q: int) -> jax.Array:
    """[B, H, Lp] per-query values -> [B, H, nq, 1, bq]: query block i's row, whole in its last
    two axes. Mosaic's blocks must span their array's last two axes or tile them by (8, 128):
    [1, bq] blocks of [B, H, 1, Lp] rows would need bq a multiple of 128."""
    return x.reshape(*x.shape[:2], -1, 1, block_q)


def column(row_ref) -> jax.Array:
    """A [1, bq] row block -> a [bq, 1] column (splash attention's relayout)."""
    return jnp.expand_dims(row_ref[0], -1)


def entry_args(ops: common.Operands):
    return (
        ops.prefix_k,
        ops.prefix_v,
        rows(ops.prefix_start),
        rows(ops.prefix_bias),
        ops.band_k,
        ops.band_v,
        rows(ops.band_start),
        rows(ops.band_until),
    )


def compiler_params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def forward(spec: common.KernelSpec, ops: common.Operands, blocks: common.QueryBlocks):
    """-> out [B, Hq, Lp, D] in q's dtype, log-sum-exp [B, Hq, Lp] float32."""
    walk = QueryWalk(spec, ops)
    specs = walk.specs(spec, ops)
    b, hq, lp, d = ops.q.shape
    queries = common.query_args(ops)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, hq, walk.nq, walk.steps),
        in_specs=[*[specs["query"]] * len(queries), *specs["prefix"], *specs["band"]],
        out_specs=[specs["query"], specs["lanes"]],
        scratch_shapes=[
            pltpu.VMEM((spec.block_q, 1), jnp.float32),
            pltpu.VMEM((spec.block_q, 1), jnp.float32),
            pltpu.VMEM((spec.block_q, d), jnp.float32),
        ],
    )
    # The static step count covers every band window of a DGA layout (`_band_steps`); a caller
    # whose band breaks the lag bound gets NaN rather than silently dropped entries.
    fits = jnp.max(blocks.band_blocks) <= walk.steps - walk.n_prefix
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec, walk=walk, queries=len(queries)),
        grid_spec=grid_spec,
        out_shape=[
            varying_struct(ops.q.shape, ops.q.dtype, ops.q),
            varying_struct((b, hq, lp, LANES), jnp.float32, ops.q),
        ],
        compiler_params=compiler_params(),
        interpret=spec.interpret,
        name="interval_forward",
    )(*flat_ranges(blocks), *queries, *entry_args(ops))
    return jnp.where(fits, out, jnp.nan).astype(out.dtype), lse[..., 0]

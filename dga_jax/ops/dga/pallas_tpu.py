"""DGA attention as Pallas kernels for TPUs (Mosaic), in the manner of splash attention.

The walk is the one `pallas_common` describes, laid out as grids whose block indices come from
scalar-prefetched, on-device block ranges. A grid step a query block does not need maps to the
block it already holds, so it copies nothing, and `pl.when` skips its compute:

- forward and dQ, grid (batch, query head, query block, step): steps `[0, NP/bk)` walk the
  prefix (unmasked below `full`), then `band_steps` steps the band; accumulators live in VMEM
  scratch across steps;
- dK'/dV', grid (batch, KV head, step, query head of the KV head), key-stationary: each step is
  one (entry block, query block) pair from a compressed on-device list, so consecutive steps of
  one entry block accumulate in scratch and the block is written once. The list is exact for the
  prefix; for the band its static length rests on DGA's structure (a band block is seen by the
  query blocks up to two band blocks later, plus the leftovers'); if an input ever needed more
  steps, the gradients come back NaN rather than silently wrong.

Mosaic tiles: block_q a multiple of 8, block_k a multiple of 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dga_jax.ops.dga import pallas_common as common
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.layout import dga_layout, gather_entries
from dga_jax.ops.intervals import BlockSizes

SUBLANES, LANES = 8, 128
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _dot_nt(a, b):
    return jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return jax.lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    return jax.lax.dot_general(a.T, b, _NN, preferred_element_type=jnp.float32)


DOTS = common.Dots(nt=_dot_nt, nn=_dot_nn, tn=_dot_tn)


def check_block_sizes(block_sizes: BlockSizes) -> None:
    """Mosaic tiles: query blocks in whole sublanes, entry blocks in whole lanes."""
    if block_sizes.block_q % SUBLANES:
        raise ValueError(
            f"implementation='pallas_tpu' needs BlockSizes.block_q to be a multiple of {SUBLANES}, "
            f"got {block_sizes.block_q}"
        )
    if block_sizes.block_k % LANES:
        raise ValueError(
            f"implementation='pallas_tpu' needs BlockSizes.block_k to be a multiple of {LANES}, "
            f"got {block_sizes.block_k}"
        )


def dga_attention_pallas_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: DGAConfig,
    scale: float,
    block_sizes: BlockSizes,
    interpret: object = False,
) -> jax.Array:
    """q [B, L, Hq, D], k/v [B, L, Hkv, D] -> [B, L, Hq, D]: the layout, then the kernels.

    `interpret`: False on a TPU; `pltpu.InterpretParams(...)` (or True) runs the kernels in the
    TPU interpreter on any backend.
    """
    layout = dga_layout(q, k, config, scale, block=block_sizes.block_importance)
    prefix, raw = gather_entries(layout, k, v)
    sizes = layout.sizes
    spec = common.KernelSpec(
        scale=scale,
        block_q=min(block_sizes.block_q, -(-q.shape[1] // SUBLANES) * SUBLANES),
        block_k=block_sizes.block_k,
        groups=q.shape[2] // k.shape[2],
        seq_len=q.shape[1],
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        band_lag=max(sizes.chunk, sizes.group_size) - 1,
    )
    band = raw if sizes.num_raw else None
    return common.kernel_attention(KERNELS, q, prefix, band, spec)


# --- forward and dQ: grid (b, h, i, s) ----------------------------------------------------------


def _band_steps(spec: common.KernelSpec, n_band_blocks: int) -> int:
    """Band blocks one query block can touch: fewer than bq + lag entries, unaligned."""
    return min(n_band_blocks, -(-(spec.block_q + spec.band_lag) // spec.block_k) + 1)


class _QueryWalk:
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
            column=pl.BlockSpec((None, None, bq, 1), query),
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
    """h // groups for grid indices (non-negative), without a signed floor division on TPU."""
    return jax.lax.div(h, groups)


def _positions(spec: common.KernelSpec, i) -> jax.Array:
    shape = (spec.block_q, spec.block_k)
    return i * spec.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)  # [bq, bk]


def _query_step(walk: _QueryWalk, spec, range_refs, prefix_refs, band_refs, update):
    """Calls `update(tile, t)` for this grid step's tile, if the query block needs one."""
    full_ref, prefix_ref, first_ref, count_ref = range_refs
    b, h, i, s = (pl.program_id(axis) for axis in range(4))
    r = walk.row(b, h, i)
    full, n_prefix = full_ref[r], prefix_ref[r]
    t = _positions(spec, i)
    pk, pv, pstart, pbias = prefix_refs

    @pl.when(s < full)
    def _():
        update(common.Tile(pk[...], pv[...], None, None, pbias[...]), t)

    @pl.when((s >= full) & (s < n_prefix))
    def _():
        update(common.Tile(pk[...], pv[...], pstart[...], None, pbias[...]), t)

    @pl.when((s >= n_prefix) & (s < n_prefix + count_ref[r]))
    def _():
        bk_, bv, bstart, buntil = band_refs
        update(common.Tile(bk_[...], bv[...], bstart[...], buntil[...]), t)


def _forward_kernel(*refs, spec, walk):
    range_refs, (q_ref,), prefix_refs, band_refs, outs, scratch = _split(refs, 4, 1, 4, 4, 2, 3)
    o_ref, lse_ref = outs
    m_ref, l_ref, acc_ref = scratch
    s = pl.program_id(3)

    @pl.when(s == 0)
    def _():
        init = common.online_init(spec.block_q, q_ref.shape[-1])
        for ref, value in zip(scratch, init, strict=True):
            ref[...] = value

    def update(tile, t):
        state = (m_ref[...], l_ref[...], acc_ref[...])
        state = common.online_step(DOTS, spec.scale, state, q_ref[...], t, tile)
        for ref, value in zip(scratch, state, strict=True):
            ref[...] = value

    _query_step(walk, spec, range_refs, prefix_refs, band_refs, update)

    @pl.when(s == walk.steps - 1)
    def _():
        out, lse = common.online_finish((m_ref[...], l_ref[...], acc_ref[...]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_kernel(*refs, spec, walk):
    range_refs, q_refs, prefix_refs, band_refs, (dq_ref,), (acc_ref,) = _split(
        refs, 4, 4, 4, 4, 1, 1
    )
    q_ref, do_ref, lse_ref, delta_ref = q_refs
    s = pl.program_id(3)

    @pl.when(s == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(tile, t):
        ds, _ = common.tile_grads(
            DOTS, spec.scale, q_ref[...], t, do_ref[...], lse_ref[...], delta_ref[...], tile
        )
        acc_ref[...] += DOTS.nn(ds.astype(tile.k.dtype), tile.k)

    _query_step(walk, spec, range_refs, prefix_refs, band_refs, update)

    @pl.when(s == walk.steps - 1)
    def _():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _split(refs, *sizes):
    out, offset = [], 0
    for size in sizes:
        out.append(refs[offset : offset + size])
        offset += size
    return out


def _flat_ranges(blocks: common.QueryBlocks):
    return tuple(
        x.reshape(-1)
        for x in (blocks.full, blocks.prefix_blocks, blocks.band_first, blocks.band_blocks)
    )


def _rows(x: jax.Array) -> jax.Array:
    """[B, H, N] per-entry values -> [B, H, 1, N]: one lane-major row per head."""
    return x[:, :, None, :]


def _entry_args(ops: common.Operands):
    return (
        ops.prefix_k,
        ops.prefix_v,
        _rows(ops.prefix_start),
        _rows(ops.prefix_bias),
        ops.band_k,
        ops.band_v,
        _rows(ops.band_start),
        _rows(ops.band_until),
    )


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def forward(spec: common.KernelSpec, ops: common.Operands, blocks: common.QueryBlocks):
    """-> out [B, Hq, Lp, D] in q's dtype, log-sum-exp [B, Hq, Lp, 1] float32."""
    walk = _QueryWalk(spec, ops)
    specs = walk.specs(spec, ops)
    b, hq, lp, d = ops.q.shape
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, hq, walk.nq, walk.steps),
        in_specs=[specs["query"], *specs["prefix"], *specs["band"]],
        out_specs=[specs["query"], specs["column"]],
        scratch_shapes=[
            pltpu.VMEM((spec.block_q, 1), jnp.float32),
            pltpu.VMEM((spec.block_q, 1), jnp.float32),
            pltpu.VMEM((spec.block_q, d), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec, walk=walk),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype),
            jax.ShapeDtypeStruct((b, hq, lp, 1), jnp.float32),
        ],
        compiler_params=_params(),
        interpret=spec.interpret,
        name="dga_forward",
    )(*_flat_ranges(blocks), ops.q, *_entry_args(ops))


def dq(spec, ops, blocks: common.QueryBlocks, do, lse, delta):
    """-> dq [B, Hq, Lp, D] in q's dtype."""
    walk = _QueryWalk(spec, ops)
    specs = walk.specs(spec, ops)
    query, column = specs["query"], specs["column"]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(ops.q.shape[0], ops.q.shape[1], walk.nq, walk.steps),
        in_specs=[query, query, column, column, *specs["prefix"], *specs["band"]],
        out_specs=query,
        scratch_shapes=[pltpu.VMEM((spec.block_q, ops.q.shape[-1]), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, walk=walk),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype),
        compiler_params=_params(),
        interpret=spec.interpret,
        name="dga_dq",
    )(*_flat_ranges(blocks), ops.q, do, lse, delta[..., None], *_entry_args(ops))


# --- dK'/dV': grid (b, kv head, step, query head of the kv head) --------------------------------

_COMPUTE, _FIRST, _LAST, _MASKED = 1, 2, 4, 8


def step_list(first: jax.Array, end: jax.Array, full: jax.Array, num_steps: int):
    """The (entry block, query block, flags) of each step, for one head's entry blocks.

    first, end, full: [nkb] int32. Entry block j is seen by query blocks [first_j, end_j), whole
    from full_j on. A block nobody sees still gets one step (to write its zero gradient). Steps
    past the total repeat the last one with no flags. Returns three [num_steps] int32 arrays and
    whether everything fit.
    """
    count = jnp.maximum(end - first, 1)
    ends = jnp.cumsum(count)
    total = ends[-1]
    s = jnp.minimum(jnp.arange(num_steps, dtype=jnp.int32), total - 1)
    block = jnp.searchsorted(ends, s, side="right").astype(jnp.int32)
    offset = s - (ends[block] - count[block])
    query = first[block] + offset
    live = jnp.arange(num_steps) < total
    flags = (
        jnp.where(end[block] > first[block], _COMPUTE, 0)
        | jnp.where(offset == 0, _FIRST, 0)
        | jnp.where(offset == count[block] - 1, _LAST, 0)
        | jnp.where(query < full[block], _MASKED, 0)
    )
    return (
        block,
        jnp.minimum(query, end[block] - 1).clip(0),
        jnp.where(live, flags, 0),
        total <= num_steps,
    )


def _dkv_kernel(*refs, spec, band: bool):
    (block_ref, query_ref, flags_ref), q_refs, entry_refs, outs, scratch = _split(
        refs, 3, 4, 4, 2, 2
    )
    q_ref, do_ref, lse_ref, delta_ref = q_refs
    k_ref, v_ref, start_ref, last_ref = entry_refs
    b, h, s, g = (pl.program_id(axis) for axis in range(4))
    n_steps, n_heads = pl.num_programs(2), pl.num_programs(3)
    flags = flags_ref[(b * pl.num_programs(1) + h) * n_steps + s]
    dk_acc, dv_acc = scratch

    @pl.when(((flags & _FIRST) != 0) & (g == 0))
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def update(tile):
        i = query_ref[(b * pl.num_programs(1) + h) * n_steps + s]
        t = i * spec.block_q + jax.lax.broadcasted_iota(jnp.int32, (spec.block_q, spec.block_k), 0)
        q, do = q_ref[...], do_ref[...]
        ds, p = common.tile_grads(DOTS, spec.scale, q, t, do, lse_ref[...], delta_ref[...], tile)
        dk_acc[...] += DOTS.tn(ds.astype(q.dtype), q)
        dv_acc[...] += DOTS.tn(p.astype(do.dtype), do)

    k, v = k_ref[...], v_ref[...]
    compute = (flags & _COMPUTE) != 0
    masked = (flags & _MASKED) != 0
    if band:

        @pl.when(compute)
        def _():
            update(common.Tile(k, v, start_ref[...], last_ref[...]))

    else:

        @pl.when(compute & masked)
        def _():
            update(common.Tile(k, v, start_ref[...], None, last_ref[...]))

        @pl.when(compute & ~masked)
        def _():
            update(common.Tile(k, v, None, None, last_ref[...]))

    @pl.when(((flags & _LAST) != 0) & (g == n_heads - 1))
    def _():
        outs[0][...] = dk_acc[...].astype(outs[0].dtype)
        outs[1][...] = dv_acc[...].astype(outs[1].dtype)


def dkv(spec, ops, blocks: common.KeyBlocks, do, lse, delta):
    """-> (dk, dv) of the prefix entries and of the band entries, in their dtypes."""
    nq = spec.num_q_blocks(ops.q.shape[2])
    n_prefix = ops.prefix_k.shape[2] // spec.block_k
    n_band = ops.band_k.shape[2] // spec.block_k
    prefix_lists = _step_lists(
        blocks.prefix_first,
        jnp.full_like(blocks.prefix_first, nq),
        blocks.prefix_full,
        n_prefix * nq,
    )
    # The band entries still visible at a query started fewer than band_lag + 1 entries earlier
    # (one group or chunk), so band block j is seen only by query blocks before the start of
    # block j + ahead, or to the end for the last blocks (leftovers): the counts telescope.
    ahead = 2 + spec.band_lag // spec.block_k
    band_steps = min(n_band * nq, ahead * nq + (ahead + 1) * n_band)
    band_lists = _step_lists(
        blocks.band_first, blocks.band_end, jnp.zeros_like(blocks.band_first), band_steps
    )
    entries = _entry_args(ops)
    q_args = (ops.q, do, lse, delta[..., None])
    dpk, dpv = _dkv_call(spec, prefix_lists[:3], q_args, entries[:4], band=False)
    dbk, dbv = _dkv_call(spec, band_lists[:3], q_args, entries[4:], band=True)
    fits = band_lists[3]
    return dpk, dpv, jnp.where(fits, dbk, jnp.nan), jnp.where(fits, dbv, jnp.nan)


def _step_lists(first, end, full, num_steps: int):
    per_head = jax.vmap(jax.vmap(functools.partial(step_list, num_steps=num_steps)))
    block, query, flags, fits = per_head(first, end, full)
    return block.reshape(-1), query.reshape(-1), flags.reshape(-1), jnp.all(fits)


def _dkv_call(spec, lists, q_args, entries, band: bool):
    k = entries[0]
    b, hkv, n, d = k.shape
    g, bq, bk = spec.groups, spec.block_q, spec.block_k
    num_steps = lists[0].shape[0] // (b * hkv)

    def at(b_, h, s):
        return (b_ * hkv + h) * num_steps + s

    def query(b_, h, s, g_, block_ref, query_ref, flags_ref):
        return b_, h * g + g_, query_ref[at(b_, h, s)], 0

    def entry_kv(b_, h, s, g_, block_ref, query_ref, flags_ref):
        return b_, h, block_ref[at(b_, h, s)], 0

    def entry_row(b_, h, s, g_, block_ref, query_ref, flags_ref):
        return b_, h, 0, block_ref[at(b_, h, s)]

    query_spec = pl.BlockSpec((None, None, bq, d), query)
    column_spec = pl.BlockSpec((None, None, bq, 1), query)
    kv_spec = pl.BlockSpec((None, None, bk, d), entry_kv)
    row_spec = pl.BlockSpec((None, None, 1, bk), entry_row)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, hkv, num_steps, g),
        in_specs=[
            query_spec,
            query_spec,
            column_spec,
            column_spec,
            kv_spec,
            kv_spec,
            row_spec,
            row_spec,
        ],
        out_specs=[kv_spec, kv_spec],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, band=band),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=spec.interpret,
        name="dga_dkv_band" if band else "dga_dkv_prefix",
    )(*lists, *q_args, *entries)


KERNELS = common.Kernels(forward=forward, dq=dq, dkv=dkv)

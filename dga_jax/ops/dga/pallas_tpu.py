"""DGA attention as Pallas kernels for TPUs (Mosaic), in the manner of splash attention.

The walk is the one `pallas_common` describes, laid out as grids whose block indices come from
scalar-prefetched, on-device block ranges. A grid step a query block does not need maps to the
block it already holds, so it copies nothing, and `pl.when` skips its compute:

- forward and dQ, grid (batch, query head, query block, step): steps `[0, NP/bk)` walk the
  prefix (unmasked below `full`), then `band_steps` steps the band; accumulators live in VMEM
  scratch across steps;
- dK'/dV', grid (batch, KV head, step, query head of the KV head), key-stationary: each step is
  for the prefix, grid (batch, KV head, entry block, query block, query head): only the first
  query block that sees each entry block and the first that sees it whole are prefetched, and
  earlier steps copy nothing; for the band, grid (batch, KV head, step, query head) over a
  compressed on-device list of (entry block, query block) pairs, whose static length rests on
  DGA's structure (a band block is seen only until a few band blocks later, plus the
  leftovers'). If an input ever needed more steps, the result is NaN, never silently wrong.

Mosaic tiles: block_q a multiple of 16, block_k a multiple of 128. The log-sum-exp leaves the
forward lane-replicated and is kept as one row per head; the backward kernels read [1, bq] rows
and turn them into columns in VMEM, as splash attention does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dga_jax.ops.context import WHOLE, ContextSplit
from dga_jax.ops.dga import pallas_common as common
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.intervals import BlockSizes
from dga_jax.ops.target import Target

SUBLANES, LANES = 16, 128  # bfloat16 packs two rows per 8-row sublane tile
DEFAULT_BLOCKS = BlockSizes(block_q=512, block_k=512)
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _dot_nt(a, b):
    return jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return jax.lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    # Transpose in float32, then cast: packed (bf16) transposes are Mosaic's weakest spot.
    return jax.lax.dot_general(a.T.astype(b.dtype), b, _NN, preferred_element_type=jnp.float32)


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


def check_fits(
    block_sizes: BlockSizes, q_shape: tuple[int, ...], dtype: np.dtype, target: Target
) -> None:
    """Rejects tiles whose buffers alone overflow the target's scoped VMEM (`vmem_floor`)."""
    limit = target.vmem_bytes
    if limit is None:
        return
    block_q = query_block(block_sizes, q_shape[1])
    need = vmem_floor(block_q, block_sizes.block_k, q_shape[-1], dtype.itemsize)
    if need > limit:
        raise ValueError(
            f"implementation='pallas_tpu' with {block_sizes} (D={q_shape[-1]}, {dtype.name}) "
            f"needs at least {need / 2**20:.1f} MiB of VMEM; {target.device_kind} kernels get "
            f"{limit / 2**20:.0f} MiB: use smaller blocks (the defaults are "
            f"{DEFAULT_BLOCKS.block_q}/{DEFAULT_BLOCKS.block_k})"
        )


def query_block(block_sizes: BlockSizes, seq_len: int) -> int:
    """The query block the kernels run: block_q, at most the length in whole sublane tiles."""
    return min(block_sizes.block_q, -(-seq_len // SUBLANES) * SUBLANES)


def vmem_floor(block_q: int, block_k: int, head_dim: int, itemsize: int) -> int:
    """Bytes of VMEM the largest kernel needs at least, in Mosaic's (8k, 128) tiles.

    Every block is double-buffered by the pipeline; scratch is single; one [bq, bk] float32
    score tile is live in each kernel. Other temporaries come on top (the compiler checks).
    The same tiles serve the forward and the backward kernels, so the largest of them counts.
    """

    def tile(rows, cols, size=4):
        sublanes = 8 * (4 // size)
        return -(-rows // sublanes) * sublanes * -(-cols // LANES) * LANES * size

    def row(cols):  # a [1, n] 32-bit block: Mosaic tiles one-row operands (1, 128)
        return -(-cols // LANES) * LANES * 4

    q, kv = tile(block_q, head_dim, itemsize), tile(block_k, head_dim, itemsize)
    q_rows, k_rows = row(block_q), row(block_k)
    scores = tile(block_q, block_k)
    forward = 2 * (2 * q + 4 * kv + 4 * k_rows + tile(block_q, LANES)) + 2 * tile(block_q, 1)
    dq = 2 * (3 * q + 2 * q_rows + 4 * kv + 4 * k_rows)
    query_accumulator = tile(block_q, head_dim)
    dkv = 2 * (2 * q + 2 * q_rows + 4 * kv + 2 * k_rows) + 2 * tile(block_k, head_dim)
    return scores + max(forward + query_accumulator, dq + query_accumulator, dkv)


def dga_attention_pallas_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: DGAConfig,
    scale: float,
    block_sizes: BlockSizes,
    interpret: object = False,
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """q [B, C, Hq, D], k/v [B, C, Hkv, D] -> [B, C, Hq, D]: the layout, then the kernels.

    C = L, or this device's part of the sequence under `split`; `lengths` [B]: the valid
    positions of each row of a right-padded batch (`dga_layout`).

    `interpret`: False on a TPU; `pltpu.InterpretParams(...)` (or True) runs the kernels in the
    TPU interpreter on any backend.
    """
    return common.dga_kernel_attention(
        KERNELS,
        q,
        k,
        v,
        config,
        scale,
        block_sizes,
        block_q=query_block(block_sizes, q.shape[1]),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        split=split,
        lengths=lengths,
    )


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

        def query_row(b, h, i, s, *_):
            return b, h, 0, i

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
            row=pl.BlockSpec((None, None, 1, bq), query_row),
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
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)  # lane-replicated, as splash does


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
        lse, delta = _column(lse_ref), _column(delta_ref)
        ds, _ = common.tile_grads(DOTS, spec.scale, q_ref[...], t, do_ref[...], lse, delta, tile)
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
    """[B, H, N] per-entry or per-query values -> [B, H, 1, N]: one lane-major row per head."""
    return x[:, :, None, :]


def _column(row_ref) -> jax.Array:
    """A [1, bq] row block -> a [bq, 1] column (splash attention's relayout)."""
    return jnp.expand_dims(row_ref[0], -1)


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
    """-> out [B, Hq, Lp, D] in q's dtype, log-sum-exp [B, Hq, Lp] float32."""
    walk = _QueryWalk(spec, ops)
    specs = walk.specs(spec, ops)
    b, hq, lp, d = ops.q.shape
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, hq, walk.nq, walk.steps),
        in_specs=[specs["query"], *specs["prefix"], *specs["band"]],
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
        functools.partial(_forward_kernel, spec=spec, walk=walk),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype),
            jax.ShapeDtypeStruct((b, hq, lp, LANES), jnp.float32),
        ],
        compiler_params=_params(),
        interpret=spec.interpret,
        name="dga_forward",
    )(*_flat_ranges(blocks), ops.q, *_entry_args(ops))
    return jnp.where(fits, out, jnp.nan).astype(out.dtype), lse[..., 0]


def dq(spec, ops, blocks: common.QueryBlocks, do, lse, delta):
    """-> dq [B, Hq, Lp, D] in q's dtype."""
    walk = _QueryWalk(spec, ops)
    specs = walk.specs(spec, ops)
    query, row = specs["query"], specs["row"]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(ops.q.shape[0], ops.q.shape[1], walk.nq, walk.steps),
        in_specs=[query, query, row, row, *specs["prefix"], *specs["band"]],
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
    )(*_flat_ranges(blocks), ops.q, do, _rows(lse), _rows(delta), *_entry_args(ops))


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


def _accumulate(spec, i, q_refs, tile: common.Tile, acc_refs) -> None:
    """dK, dV scratch [bk, D] += this query block's contribution to the entry block."""
    q_ref, do_ref, lse_ref, delta_ref = q_refs
    q, do = q_ref[...], do_ref[...]
    lse, delta = _column(lse_ref), _column(delta_ref)
    ds, p = common.tile_grads(DOTS, spec.scale, q, _positions(spec, i), do, lse, delta, tile)
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
    (first_ref, full_ref), q_refs, entry_refs, outs, acc = _split(refs, 2, 4, 4, 2, 2)
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
        tile = common.Tile(k_ref[...], v_ref[...], start_ref[...], None, bias_ref[...])
        _accumulate(spec, i, q_refs, tile, acc)

    @pl.when((i >= first) & (i >= full))
    def _():
        _accumulate(
            spec, i, q_refs, common.Tile(k_ref[...], v_ref[...], None, None, bias_ref[...]), acc
        )

    @pl.when((i == last_i) & (g == last_g))
    def _():
        _write_acc(acc, outs)


def _dkv_band_kernel(*refs, spec):
    """Grid (b, kv head, step, query head g) over the compressed (band block, query block) list."""
    (block_ref, packed_ref), q_refs, entry_refs, outs, acc = _split(refs, 2, 4, 4, 2, 2)
    b, h, s, g = (pl.program_id(axis) for axis in range(4))
    packed = packed_ref[(b * pl.num_programs(1) + h) * pl.num_programs(2) + s]
    flags = packed & ((1 << _FLAG_BITS) - 1)
    k_ref, v_ref, start_ref, until_ref = entry_refs

    @pl.when(((flags & _FIRST) != 0) & (g == 0))
    def _():
        _init_acc(acc)

    @pl.when((flags & _COMPUTE) != 0)
    def _():
        tile = common.Tile(k_ref[...], v_ref[...], start_ref[...], until_ref[...])
        _accumulate(spec, packed >> _FLAG_BITS, q_refs, tile, acc)

    @pl.when(((flags & _LAST) != 0) & (g == pl.num_programs(3) - 1))
    def _():
        _write_acc(acc, outs)


def dkv(spec, ops, blocks: common.KeyBlocks, do, lse, delta):
    """-> (dk, dv) of the prefix entries and of the band entries, in their dtypes."""
    q_args = (ops.q, do, _rows(lse), _rows(delta))
    entries = _entry_args(ops)
    dpk, dpv = _dkv_prefix_call(spec, blocks, q_args, entries[:4])
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
        return b_, h * g + g_, 0, query_block(b_, h, j, i, first_ref)

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
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=spec.interpret,
        name="dga_dkv_prefix",
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
        return b_, h * g + g_, 0, packed_ref[at(b_, h, s)] >> _FLAG_BITS

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
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=spec.interpret,
        name="dga_dkv_band",
    )(*lists, *q_args, *entries)


def _dkv_in_specs(bq, bk, d, query, row, entry_kv, entry_row):
    """q, do [bq, D]; lse, delta rows [1, bq]; entries' k, v [bk, D] and two rows [1, bk]."""
    query_spec, row_spec = (
        pl.BlockSpec((None, None, bq, d), query),
        pl.BlockSpec((None, None, 1, bq), row),
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


KERNELS = common.Kernels(forward=forward, dq=dq, dkv=dkv)

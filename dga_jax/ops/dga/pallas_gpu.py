"""DGA attention as Pallas kernels for GPUs (the Triton backend).

Three kernels over the layout's compressed KV' (`pallas_common` describes the walk):

- forward, grid (query block, batch, query head): loops over the visible prefix blocks, the
  whole-visible ones without masks, then over the band blocks; float32 online softmax; saves the
  log-sum-exp;
- dQ, same grid and walk, recomputing probabilities from the log-sum-exp;
- dK'/dV', grid (entry block, batch, KV head), key-stationary: loops over the query heads of the
  KV head and the query blocks that see the entry block (on-device `KeyBlocks` ranges).

Every loop bound is read from on-device block ranges, so blocks nobody sees are never loaded.
Triton wants power-of-two tiles: block sizes must be powers of two (>= 16) and D is zero-padded
to one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from dga_jax.ops.context import WHOLE, ContextSplit
from dga_jax.ops.dga import pallas_common as common
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.intervals import BlockSizes
from dga_jax.ops.target import Target

MIN_BLOCK = 16  # tl.dot's smallest tile
# No register spill in any kernel on H100/H200 (benchmarks/RESULTS.md, "Compiled without
# hardware"): 128x64 is at the edge (252-254 of 255 registers), 64x128 and 128x128 spill.
DEFAULT_BLOCKS = BlockSizes(block_q=64, block_k=64)
STAGES = 2  # Triton's software pipeline depth (`_compiler_params`)


def _dot_nt(a, b):
    return pltriton.dot(a, b, trans_b=True)


def _dot_nn(a, b):
    return pltriton.dot(a, b)


def _dot_tn(a, b):
    return pltriton.dot(a.astype(b.dtype), b, trans_a=True)


DOTS = common.Dots(nt=_dot_nt, nn=_dot_nn, tn=_dot_tn)


def check_block_sizes(block_sizes: BlockSizes) -> None:
    """Triton tiles are powers of two of at least 16 rows."""
    for name in ("block_q", "block_k"):
        value = getattr(block_sizes, name)
        if value < MIN_BLOCK or value & (value - 1):
            raise ValueError(
                f"implementation='pallas_gpu' needs BlockSizes.{name} to be a power of two "
                f">= {MIN_BLOCK}, got {value}"
            )


def check_fits(
    block_sizes: BlockSizes, q_shape: tuple[int, ...], dtype: np.dtype, target: Target
) -> None:
    """Rejects tiles whose pipelined buffers alone overflow the target's shared memory.

    The walks stream `STAGES`-deep buffers of two [block, D'] tiles (k and v, [block_k, D'], in
    the forward and dQ kernels; q and dO, [block_q, D'], in dK'/dV'), D' = D rounded up to a
    power of two: a floor on what Triton allocates (it adds the resident tiles and masks; the
    compiler checks the rest). The same tiles serve the backward, so the larger block counts.
    """
    limit = target.shared_memory_bytes
    if limit is None:
        return
    block_q = query_block(block_sizes, q_shape[1])
    tile = max(block_q, block_sizes.block_k) * _next_power_of_2(q_shape[-1]) * dtype.itemsize
    need = STAGES * 2 * tile
    if need > limit:
        raise ValueError(
            f"implementation='pallas_gpu' with {block_sizes} (D={q_shape[-1]}, {dtype.name}) "
            f"needs at least {need:,} bytes of shared memory per block; {target.device_kind} "
            f"has {limit:,}: use smaller blocks (the defaults are "
            f"{DEFAULT_BLOCKS.block_q}/{DEFAULT_BLOCKS.block_k})"
        )


def dga_attention_pallas_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: DGAConfig,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool = False,
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """q [B, C, Hq, D], k/v [B, C, Hkv, D] -> [B, C, Hq, D]: the layout, then the kernels.

    C = L, or this device's part of the sequence under `split`; `lengths` [B]: the valid
    positions of each row of a right-padded batch (`dga_layout`).
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
        interpret=interpret,
        head_multiple=_next_power_of_2(q.shape[-1]),
        split=split,
        lengths=lengths,
    )


def query_block(block_sizes: BlockSizes, seq_len: int) -> int:
    """The query block the kernels run: block_q, at most the length's power of two."""
    return min(block_sizes.block_q, _next_power_of_2(seq_len))


def _next_power_of_2(x: int) -> int:
    return max(1 << (x - 1).bit_length(), MIN_BLOCK)


def _positions(spec: common.KernelSpec, i: jax.Array) -> jax.Array:
    return i * spec.block_q + jnp.arange(spec.block_q, dtype=jnp.int32)[:, None]  # [bq, 1]


def _row(ref, j: jax.Array, bk: int) -> jax.Array:
    return ref[pl.ds(j * bk, bk)][None, :]  # [1, bk]


def _prefix_tile(refs, j: jax.Array, bk: int, masked: bool) -> common.Tile:
    k_ref, v_ref, start_ref, bias_ref = refs
    rows = pl.ds(j * bk, bk)
    start = _row(start_ref, j, bk) if masked else None
    return common.Tile(k_ref[rows, :], v_ref[rows, :], start, None, _row(bias_ref, j, bk))


def _band_tile(refs, j: jax.Array, bk: int) -> common.Tile:
    k_ref, v_ref, start_ref, until_ref = refs
    rows = pl.ds(j * bk, bk)
    return common.Tile(
        k_ref[rows, :], v_ref[rows, :], _row(start_ref, j, bk), _row(until_ref, j, bk)
    )


def _walk(spec: common.KernelSpec, block_refs, prefix_refs, band_refs, step, state):
    """Runs `step(state, tile)` over the entry blocks query block `program_id(0)` sees."""
    full_ref, prefix_ref, band_first_ref, band_blocks_ref = block_refs
    i, bk = pl.program_id(0), spec.block_k

    def prefix_body(masked):
        def body(j, state):
            return step(state, _prefix_tile(prefix_refs, j, bk, masked))

        return body

    def band_body(j, state):
        return step(state, _band_tile(band_refs, j, bk))

    full, first = full_ref[i], band_first_ref[i]
    state = jax.lax.fori_loop(0, full, prefix_body(False), state)
    state = jax.lax.fori_loop(full, prefix_ref[i], prefix_body(True), state)
    return jax.lax.fori_loop(first, first + band_blocks_ref[i], band_body, state)


def _forward_kernel(*refs, spec: common.KernelSpec):
    block_refs, (q_ref,), prefix_refs, band_refs, (o_ref, lse_ref) = _split(refs, 4, 1, 4, 4, 2)
    q, t = q_ref[...], _positions(spec, pl.program_id(0))

    def step(state, tile):
        return common.online_step(DOTS, spec.scale, state, q, t, tile)

    state = common.online_init(spec.block_q, q.shape[-1])
    out, lse = common.online_finish(_walk(spec, block_refs, prefix_refs, band_refs, step, state))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(lse_ref.shape)


def _dq_kernel(*refs, spec: common.KernelSpec):
    block_refs, q_refs, prefix_refs, band_refs, (dq_ref,) = _split(refs, 4, 4, 4, 4, 1)
    q_ref, do_ref, lse_ref, delta_ref = q_refs
    q, do, t = q_ref[...], do_ref[...], _positions(spec, pl.program_id(0))
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def step(dq, tile):
        ds, _ = common.tile_grads(DOTS, spec.scale, q, t, do, lse, delta, tile)
        return dq + DOTS.nn(ds.astype(tile.k.dtype), tile.k)

    dq = _walk(spec, block_refs, prefix_refs, band_refs, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(*refs, spec: common.KernelSpec, band: bool):
    (first_ref, second_ref), q_refs, entry_refs, (dk_ref, dv_ref) = _split(refs, 2, 4, 4, 2)
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
                tile = common.Tile(k, v, start, last)
            else:
                tile = common.Tile(k, v, start if masked else None, None, last)
            ds, p = common.tile_grads(
                DOTS, spec.scale, q, _positions(spec, i), do, lse, delta, tile
            )
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


def _split(refs, *sizes):
    out, offset = [], 0
    for size in sizes:
        out.append(refs[offset : offset + size])
        offset += size
    return out


# --- pallas_call wrappers -----------------------------------------------------------------------


def _specs(spec: common.KernelSpec, ops: common.Operands):
    """BlockSpecs for grid (i, b, h): this query block, and all entries of h's KV head."""
    g, bq, d = spec.groups, spec.block_q, ops.q.shape[-1]
    nq = spec.num_q_blocks(ops.q.shape[2])

    def entries(x):
        shape = (None, None, *x.shape[2:])
        return pl.BlockSpec(shape, lambda i, b, h: (b, h // g) + (0,) * (x.ndim - 2))

    query_block = pl.BlockSpec((None, None, bq, d), lambda i, b, h: (b, h, i, 0))
    query_row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    ranges = pl.BlockSpec((None, None, nq), lambda i, b, h: (b, h // g, 0))
    prefix = [entries(x) for x in (ops.prefix_k, ops.prefix_v, ops.prefix_start, ops.prefix_bias)]
    band = [entries(x) for x in (ops.band_k, ops.band_v, ops.band_start, ops.band_until)]
    return query_block, query_row, [ranges] * 4, prefix, band


def _entry_args(ops: common.Operands):
    return (
        ops.prefix_k,
        ops.prefix_v,
        ops.prefix_start,
        ops.prefix_bias,
        ops.band_k,
        ops.band_v,
        ops.band_start,
        ops.band_until,
    )


def _query_grid(spec: common.KernelSpec, ops: common.Operands):
    b, hq, lp, _ = ops.q.shape
    return (spec.num_q_blocks(lp), b, hq)


def _compiler_params(d: int):
    return pltriton.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=STAGES)


def forward(spec: common.KernelSpec, ops: common.Operands, blocks: common.QueryBlocks):
    """-> out [B, Hq, Lp, D] in q's dtype, log-sum-exp [B, Hq, Lp] float32."""
    query_block, query_row, ranges, prefix, band = _specs(spec, ops)
    b, hq, lp, d = ops.q.shape
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec),
        grid=_query_grid(spec, ops),
        in_specs=[*ranges, query_block, *prefix, *band],
        out_specs=[query_block, query_row],
        out_shape=[
            jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype),
            jax.ShapeDtypeStruct((b, hq, lp), jnp.float32),
        ],
        compiler_params=_compiler_params(d),
        interpret=spec.interpret,
        name="dga_forward",
    )(*_block_args(blocks), ops.q, *_entry_args(ops))


def dq(spec, ops, blocks: common.QueryBlocks, do, lse, delta):
    """-> dq [B, Hq, Lp, D] in q's dtype."""
    query_block, query_row, ranges, prefix, band = _specs(spec, ops)
    return pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec),
        grid=_query_grid(spec, ops),
        in_specs=[*ranges, query_block, query_block, query_row, query_row, *prefix, *band],
        out_specs=query_block,
        out_shape=jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype),
        compiler_params=_compiler_params(ops.q.shape[-1]),
        interpret=spec.interpret,
        name="dga_dq",
    )(*_block_args(blocks), ops.q, do, lse, delta, *_entry_args(ops))


def _block_args(blocks: common.QueryBlocks):
    return blocks.full, blocks.prefix_blocks, blocks.band_first, blocks.band_blocks


def dkv(spec, ops, blocks: common.KeyBlocks, do, lse, delta):
    """-> (dk, dv) of the prefix entries and of the band entries, in their dtypes."""
    b, hq, lp, d = ops.q.shape
    hkv, g = hq // spec.groups, spec.groups
    per_kv = (b, hkv, g, lp)
    heads = [x.reshape(*per_kv, *x.shape[3:]) for x in (ops.q, do, lse, delta)]
    prefix = _dkv_call(
        spec, heads, (blocks.prefix_first, blocks.prefix_full), _entry_args(ops)[:4], band=False
    )
    band = _dkv_call(
        spec, heads, (blocks.band_first, blocks.band_end), _entry_args(ops)[4:], band=True
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
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=_compiler_params(d),
        interpret=spec.interpret,
        name="dga_dkv_band" if band else "dga_dkv_prefix",
    )(*ranges, *heads, *entries)


KERNELS = common.Kernels(forward=forward, dq=dq, dkv=dkv)

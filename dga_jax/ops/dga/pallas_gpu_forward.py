"""The GPU forward kernel (Triton): the query-stationary walk over the compressed KV'.

Grid (query block, batch, query head): loops over the visible prefix blocks, the whole-visible
ones without masks, then over the band blocks; float32 online softmax; saves the log-sum-exp.
Every loop bound is read from on-device block ranges (`pallas_common.QueryBlocks`), so blocks
nobody sees are never loaded. The dQ kernel (`pallas_gpu_backward`) reuses `walk`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Pallas' Triton backend: deprecated in JAX 0.11, "removed in a future version"
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # a JAX without it: `pallas_gpu.check_available` refuses the kernels
    pltriton = None

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

STAGES = 2  # Triton's software pipeline depth (`compiler_params`)


def _dot_nt(a, b):
    return pltriton.dot(a, b, trans_b=True)


def _dot_nn(a, b):
    return pltriton.dot(a, b)


def _dot_tn(a, b):
    return pltriton.dot(a.astype(b.dtype), b, trans_a=True)


DOTS = Dots(nt=_dot_nt, nn=_dot_nn, tn=_dot_tn)


def positions(spec: common.KernelSpec, i: jax.Array) -> jax.Array:
    return i * spec.block_q + jnp.arange(spec.block_q, dtype=jnp.int32)[:, None]  # [bq, 1]


def _row(ref, j: jax.Array, bk: int) -> jax.Array:
    return ref[pl.ds(j * bk, bk)][None, :]  # [1, bk]


def _prefix_tile(refs, j: jax.Array, bk: int, masked: bool) -> Tile:
    k_ref, v_ref, start_ref, bias_ref = refs
    rows = pl.ds(j * bk, bk)
    start = _row(start_ref, j, bk) if masked else None
    return Tile(k_ref[rows, :], v_ref[rows, :], start, None, _row(bias_ref, j, bk))


def _band_tile(refs, j: jax.Array, bk: int) -> Tile:
    k_ref, v_ref, start_ref, until_ref = refs
    rows = pl.ds(j * bk, bk)
    return Tile(k_ref[rows, :], v_ref[rows, :], _row(start_ref, j, bk), _row(until_ref, j, bk))


def walk(spec: common.KernelSpec, block_refs, prefix_refs, band_refs, steps, state):
    """Runs `prefix_step(state, tile)`, then `band_step(state, tile)` (`steps`) over the entry
    blocks query block `program_id(0)` sees."""
    prefix_step, band_step = steps
    full_ref, prefix_ref, band_first_ref, band_blocks_ref = block_refs
    i, bk = pl.program_id(0), spec.block_k

    def prefix_body(masked):
        def body(j, state):
            return prefix_step(state, _prefix_tile(prefix_refs, j, bk, masked))

        return body

    def band_body(j, state):
        return band_step(state, _band_tile(band_refs, j, bk))

    full, first = full_ref[i], band_first_ref[i]
    state = jax.lax.fori_loop(0, full, prefix_body(False), state)
    state = jax.lax.fori_loop(full, prefix_ref[i], prefix_body(True), state)
    return jax.lax.fori_loop(first, first + band_blocks_ref[i], band_body, state)


def _forward_kernel(*refs, spec: common.KernelSpec, queries: int):
    """`queries` refs: q, or q and the prefix's queries."""
    block_refs, q_refs, prefix_refs, band_refs, (o_ref, lse_ref) = split_refs(
        refs, 4, queries, 4, 4, 2
    )
    q, qp, t = q_refs[0][...], q_refs[-1][...], positions(spec, pl.program_id(0))

    def step(q):
        def update(state, tile):
            return online_step(DOTS, spec.scale, state, q, t, tile)

        return update

    state = online_init((spec.block_q, q.shape[-1]))
    state = walk(spec, block_refs, prefix_refs, band_refs, (step(qp), step(q)), state)
    out, lse = online_finish(state)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(lse_ref.shape)


# --- pallas_call wrappers -----------------------------------------------------------------------


def query_specs(spec: common.KernelSpec, ops: common.Operands):
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


def entry_args(ops: common.Operands):
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


def query_grid(spec: common.KernelSpec, ops: common.Operands):
    b, hq, lp, _ = ops.q.shape
    return (spec.num_q_blocks(lp), b, hq)


def compiler_params(d: int, launch: tuple[tuple[str, int], ...] = ()):
    """Triton's launch for head size d: 8 warps above 64 else 4, `STAGES` stages, or what
    `launch` (`KernelSpec.launch`) sets."""
    params = {"num_warps": 4 if d <= 64 else 8, "num_stages": STAGES, **dict(launch)}
    return pltriton.CompilerParams(**params)


def forward(spec: common.KernelSpec, ops: common.Operands, blocks: common.QueryBlocks):
    """-> out [B, Hq, Lp, D] in q's dtype, log-sum-exp [B, Hq, Lp] float32."""
    query_block, query_row, ranges, prefix, band = query_specs(spec, ops)
    b, hq, lp, d = ops.q.shape
    queries = common.query_args(ops)
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec, queries=len(queries)),
        grid=query_grid(spec, ops),
        in_specs=[*ranges, *[query_block] * len(queries), *prefix, *band],
        out_specs=[query_block, query_row],
        out_shape=[
            varying_struct(ops.q.shape, ops.q.dtype, ops.q),
            varying_struct((b, hq, lp), jnp.float32, ops.q),
        ],
        compiler_params=compiler_params(d, spec.launch),
        interpret=spec.interpret,
        name="interval_forward",
    )(*block_args(blocks), *queries, *entry_args(ops))


def block_args(blocks: common.QueryBlocks):
    return blocks.full, blocks.prefix_blocks, blocks.band_first, blocks.band_blocks

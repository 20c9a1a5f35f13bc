"""DGA attention as Pallas kernels for TPUs (Mosaic), in the manner of splash attention.

The walk is the one `pallas_common` describes, laid out as grids whose block indices come from
scalar-prefetched, on-device block ranges: the forward kernel in `pallas_tpu_forward`, dQ and
the key-stationary dK'/dV' in `pallas_tpu_backward`. This module is the backend's entry point:
its tile rules, its VMEM check, and the kernels' call.

Mosaic tiles: block_q a multiple of 16, block_k a multiple of 128.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from dga_jax.ops.dga import pallas_common as common
from dga_jax.ops.dga import pallas_tpu_backward, pallas_tpu_forward
from dga_jax.ops.dga.pallas_tpu_forward import LANES
from dga_jax.ops.intervals import Entries
from dga_jax.ops.target import Target
from dga_jax.ops.tiles import BlockSizes

SUBLANES = 16  # bfloat16 packs two rows per 8-row sublane tile
DEFAULT_BLOCKS = BlockSizes(block_q=512, block_k=512)


def default_blocks(q_shape: tuple[int, ...], dtype: np.dtype, target: Target) -> BlockSizes:
    """The kernels' tiles when none are given: `DEFAULT_BLOCKS` for every shape, dtype, chip."""
    del q_shape, dtype, target
    return DEFAULT_BLOCKS


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


def check_available() -> None:
    """Mosaic TPU ships with every JAX: nothing to check (`pallas_gpu.check_available`)."""


def check_interpret(interpret: object) -> None:
    """Mosaic kernels run on a TPU or in the TPU interpreter (True, or its settings)."""
    if not isinstance(interpret, bool | pltpu.InterpretParams):
        raise ValueError(
            "interpret for implementation='pallas_tpu' must be a bool or a "
            f"pltpu.InterpretParams, got {interpret!r}"
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


def interval_attention(
    q: jax.Array,
    prefix: Entries,
    band: Entries | None = None,
    *,
    scale: float,
    block_sizes: BlockSizes,
    band_lag: int = 0,
    q_prefix: jax.Array | None = None,
    band_period: int = 0,
    interpret: object = False,
) -> jax.Array:
    """`dga_jax.ops.intervals.interval_attention` by the Mosaic kernels: q [B, L, Hq, D] ->
    [B, L, Hq, D]. `interpret`: False on a TPU; `pltpu.InterpretParams(...)` (or True) runs
    them in the TPU interpreter on any backend. Band entries past the lag bound are dropped
    (`pallas_common.bound_lag`): the grids' static step counts rest on it. The band's
    `band_period` is not used (`band_lag` stays valid with it)."""
    if band is not None:
        band = common.bound_lag(band, band_lag)
    return common.kernel_attention(
        KERNELS,
        q,
        prefix,
        band,
        scale=scale,
        block_q=query_block(block_sizes, q.shape[1]),
        block_k=block_sizes.block_k,
        band_lag=band_lag,
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        q_prefix=q_prefix,
    )


KERNELS = common.Kernels(
    forward=pallas_tpu_forward.forward, dq=pallas_tpu_backward.dq, dkv=pallas_tpu_backward.dkv
)

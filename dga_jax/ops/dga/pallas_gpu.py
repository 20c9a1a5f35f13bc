"""DGA attention as Pallas kernels for GPUs (the Triton backend).

The walk is the one `pallas_common` describes: the forward kernel in `pallas_gpu_forward`, dQ
and the key-stationary dK'/dV' in `pallas_gpu_backward`. This module is the backend's entry
point: its tile rules, its shared-memory check, and the kernels' call.
Triton wants power-of-two tiles: block sizes must be powers of two (>= 16) and D is zero-padded
to one.
"""

from __future__ import annotations

import jax
import numpy as np

from dga_jax.ops.dga import pallas_common as common
from dga_jax.ops.dga import pallas_gpu_backward, pallas_gpu_forward
from dga_jax.ops.dga.pallas_gpu_forward import STAGES
from dga_jax.ops.intervals import Entries
from dga_jax.ops.target import Target
from dga_jax.ops.tiles import BlockSizes

MIN_BLOCK = 16  # tl.dot's smallest tile
# No register spill in any kernel on H100/H200 at D=128 (benchmarks/RESULTS.md, "Compiled
# without hardware"): 128x64 in 16-bit dtypes is at the edge (252-254 of 255 registers) and was
# the fastest tile on an H100 (0.61-0.89x 64x64's time, 4K-64K, "GPU"); 64x128 and 128x128
# spill, and so does 128x64 at D <= 64 (4 warps; the tiny model's D = 32). In float32, or for
# D above 128, 128-row tiles overflow shared memory (`check_fits`).
DEFAULT_BLOCKS = BlockSizes(block_q=128, block_k=64)
SMALL_BLOCKS = BlockSizes(block_q=64, block_k=64)
# What DEFAULT_BLOCKS' largest kernels (dK'/dV') took on an H100, bfloat16, D = 128.
DEFAULT_BLOCKS_SHARED_BYTES = 181_248


def default_blocks(q_shape: tuple[int, ...], dtype: np.dtype, target: Target) -> BlockSizes:
    """The kernels' tiles when none are given: `DEFAULT_BLOCKS` for 16-bit inputs with D' = 128
    (64 < D <= 128: what was compiled and measured) on GPUs with the shared memory its kernels
    took on an H100 (Hopper's 227 KiB; not an A100's 163) and in interpret mode elsewhere; else
    `SMALL_BLOCKS`."""
    if np.dtype(dtype).itemsize != 2 or next_power_of_2(q_shape[-1]) != 128:
        return SMALL_BLOCKS  # at D <= 64 (4 warps) the dK'/dV' kernel spills at 128 x 64
    limit = target.shared_memory_bytes
    if target.platform != "gpu" or (limit or 0) >= DEFAULT_BLOCKS_SHARED_BYTES:
        return DEFAULT_BLOCKS
    return SMALL_BLOCKS


def check_block_sizes(block_sizes: BlockSizes) -> None:
    """Triton tiles are powers of two of at least 16 rows."""
    for name in ("block_q", "block_k"):
        value = getattr(block_sizes, name)
        if value < MIN_BLOCK or value & (value - 1):
            raise ValueError(
                f"implementation='pallas_gpu' needs BlockSizes.{name} to be a power of two "
                f">= {MIN_BLOCK}, got {value}"
            )


def check_available() -> None:
    """The kernels need Pallas' Triton backend (`jax.experimental.pallas.triton`), which JAX
    deprecated in 0.11 and will remove: without it they are refused, and implementation=None
    runs "xla" (`backends.default_for`)."""
    if pallas_gpu_forward.pltriton is None:
        raise ValueError(
            "implementation='pallas_gpu' needs Pallas' Triton backend "
            f"(jax.experimental.pallas.triton), which JAX {jax.__version__} does not have: use "
            "implementation='xla'"
        )


def check_interpret(interpret: object) -> None:
    """Triton kernels run on a GPU or, with interpret=True, in Pallas' interpreter."""
    if not isinstance(interpret, bool):
        raise ValueError(
            f"interpret for implementation='pallas_gpu' must be a bool, got {interpret!r}"
        )


def check_fits(
    block_sizes: BlockSizes, q_shape: tuple[int, ...], dtype: np.dtype, target: Target
) -> None:
    """Rejects tiles whose pipelined buffers alone overflow the target's shared memory.

    The walks stream num_stages-deep (default `STAGES`) buffers of two [block, D'] tiles (k and
    v, [block_k, D'], in the forward and dQ kernels; q and dO, [block_q, D'], in dK'/dV'),
    D' = D rounded up to a power of two: a floor on what Triton allocates (it adds the resident
    tiles and masks; the compiler checks the rest). The same tiles serve the backward, so the
    larger block counts.
    """
    limit = target.shared_memory_bytes
    if limit is None:
        return
    block_q = query_block(block_sizes, q_shape[1])
    tile = max(block_q, block_sizes.block_k) * next_power_of_2(q_shape[-1]) * dtype.itemsize
    need = (block_sizes.num_stages or STAGES) * 2 * tile
    if need > limit:
        raise ValueError(
            f"implementation='pallas_gpu' with {block_sizes} (D={q_shape[-1]}, {dtype.name}) "
            f"needs at least {need:,} bytes of shared memory per block; {target.device_kind} "
            f"has {limit:,}: use smaller blocks (the default here is "
            f"{default_blocks(q_shape, dtype, target)})"
        )


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
    interpret: bool = False,
) -> jax.Array:
    """`dga_jax.ops.intervals.interval_attention` by the Triton kernels: q [B, L, Hq, D] ->
    [B, L, Hq, D]. `interpret=True` runs them in Pallas' interpreter (any backend). The band's
    `band_period` is not used: the kernels' band tiles rest on `band_lag`, which stays valid."""
    return common.kernel_attention(
        KERNELS,
        q,
        prefix,
        band,
        scale=scale,
        block_q=query_block(block_sizes, q.shape[1]),
        block_k=block_sizes.block_k,
        band_lag=band_lag,
        interpret=interpret,
        head_multiple=next_power_of_2(q.shape[-1]),
        q_prefix=q_prefix,
        launch=block_sizes.launch,
    )


def query_block(block_sizes: BlockSizes, seq_len: int) -> int:
    """The query block the kernels run: block_q, at most the length's power of two."""
    return min(block_sizes.block_q, next_power_of_2(seq_len))


def next_power_of_2(x: int) -> int:
    """The smallest power of two >= x, at least Triton's smallest tile."""
    return max(1 << (x - 1).bit_length(), MIN_BLOCK)


KERNELS = common.Kernels(
    forward=pallas_gpu_forward.forward, dq=pallas_gpu_backward.dq, dkv=pallas_gpu_backward.dkv
)

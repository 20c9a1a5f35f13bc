"""`dga_attention`: the public entry point, dispatching on `implementation=`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from dga_jax.ops.checks import check_block_sizes, check_qkv
from dga_jax.ops.context import WHOLE, ContextSplit
from dga_jax.ops.dga import pallas_gpu, pallas_tpu
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.reference import dga_attention_reference
from dga_jax.ops.dga.xla import dga_attention_xla
from dga_jax.ops.intervals import BlockSizes
from dga_jax.ops.target import Target, placed_target

IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu")


class KernelBackend(NamedTuple):
    """A kernel backend: its platform, default tiles, tile rules and on-chip memory check."""

    platform: str
    default_blocks: BlockSizes
    check_tiles: Callable[[BlockSizes], None]
    check_fits: Callable[[BlockSizes, tuple, np.dtype, Target], None]


KERNEL_BACKENDS = {
    "pallas_gpu": KernelBackend(
        "gpu", pallas_gpu.DEFAULT_BLOCKS, pallas_gpu.check_block_sizes, pallas_gpu.check_fits
    ),
    "pallas_tpu": KernelBackend(
        "tpu", pallas_tpu.DEFAULT_BLOCKS, pallas_tpu.check_block_sizes, pallas_tpu.check_fits
    ),
}


def dga_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    group_size: int = 16,
    focal_ratio: float = 0.1,
    selection: str = "global",
    scale: float | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: object = False,
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """Dynamic Group Attention (`shared/DGA_SPEC.md`), causal.

    Args:
      q: [B, L, Hq, D] queries; k, v: [B, L, Hkv, D], Hq a multiple of Hkv (GQA).
      group_size: m, tokens folded into one group entry.
      focal_ratio: gamma in [0, 1], the share of tokens kept individually ("focal").
      selection: "global" (the paper's prefill rule) or "streaming" (strictly causal).
      scale: logit scale, 1/sqrt(D) by default.
      implementation: "reference" (O(L^2), for tests), "xla" (any backend), "pallas_gpu"
        (Triton kernels), "pallas_tpu" (Mosaic kernels). None picks "xla": the kernels are
        opt-in until they have been measured on the hardware (benchmarks/RESULTS.md).
      block_sizes: query/key block sizes of the blockwise implementations (the kernels have
        their own defaults and tile rules: powers of two >= 16 on GPU; block_q a multiple of 16
        and block_k of 128 on TPU).
      interpret: run a Pallas implementation in interpret mode (any backend, for tests): True,
        or for "pallas_tpu" a `pltpu.InterpretParams` (race and out-of-bounds detection).

      split: inside a `jax.shard_map` whose inputs hold contiguous parts of the sequence, the
        mesh axis and part count (`ContextSplit`): q, k, v are then [B, L / parts, H, D], and
        only compressed KV', sampled queries and statistics cross devices ("dga" context
        parallelism, `dga_jax.ops.dga.sharded`). Not for "reference".
      lengths: [B] ints in [1, L], the valid positions of each row of a right-padded batch:
        outputs at row b's first lengths[b] positions are those of that prefix alone (its own
        r, sampled queries and groups; padding is never attended), later positions are finite
        and meaningless. One compile serves every mix of lengths. Not for "reference", nor
        under a split.

    Returns:
      [B, L, Hq, D] in q's dtype ([B, L / parts, Hq, D] under a split).
    """
    config = DGAConfig(group_size, focal_ratio, selection)
    scale = check_qkv(q, k, v, scale)
    if implementation is None:
        implementation = "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if implementation in KERNEL_BACKENDS:
        block_sizes = _check_kernel(implementation, block_sizes, interpret, q, k, v)
    elif interpret is not False:
        raise ValueError(f"interpret applies to the Pallas implementations, not {implementation!r}")
    if implementation == "reference" and split.shards > 1:
        raise ValueError("implementation='reference' needs whole sequences, not a ContextSplit")
    lengths = _check_lengths(lengths, q.shape[0], implementation, split)
    return _dga(
        q,
        k,
        v,
        lengths=lengths,
        config=config,
        scale=scale,
        implementation=implementation,
        block_sizes=check_block_sizes(block_sizes),
        interpret=interpret,
        split=split,
    )


def _check_lengths(lengths, batch: int, implementation: str, split: ContextSplit):
    """-> lengths as an int32 array [batch] (or None); errors name the problem."""
    if lengths is None:
        return None
    if implementation == "reference" or split.shards > 1:
        where = "a ContextSplit" if split.shards > 1 else "implementation='reference'"
        raise ValueError(f"per-row lengths are not supported with {where}")
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer) or jnp.shape(lengths) != (batch,):
        raise ValueError(
            f"lengths must be integers of shape ({batch},), one per row; got "
            f"{jnp.result_type(lengths)} {jnp.shape(lengths)}"
        )
    return jnp.asarray(lengths, jnp.int32)


def _check_kernel(
    implementation: str,
    block_sizes: BlockSizes | None,
    interpret: object,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
) -> BlockSizes:
    """-> the block sizes; errors for a platform mismatch, bad tiles, or tiles that cannot fit.

    The platform is where q, k, v are placed (`placed_target`), not the host's: a kernel
    compiles for compile-only TPU/GPU devices of a topology on a CPU host.
    """
    backend = KERNEL_BACKENDS[implementation]
    target = placed_target(q, k, v)
    if interpret is False and target.platform != backend.platform:
        raise ValueError(
            f"implementation={implementation!r} compiles for {backend.platform.upper()} but the "
            f"inputs are placed on {target.platform!r} devices ({target.device_kind}): place "
            "them on a matching mesh, or pass interpret=True to run it in interpret mode"
        )
    tpu_params = implementation == "pallas_tpu" and isinstance(interpret, pltpu.InterpretParams)
    if not isinstance(interpret, bool) and not tpu_params:
        raise ValueError(
            f"interpret for implementation={implementation!r} must be a bool"
            + (" or a pltpu.InterpretParams" if implementation == "pallas_tpu" else "")
            + f", got {interpret!r}"
        )
    block_sizes = backend.default_blocks if block_sizes is None else check_block_sizes(block_sizes)
    backend.check_tiles(block_sizes)
    if interpret is False:
        backend.check_fits(block_sizes, q.shape, q.dtype, target)
    return block_sizes


@functools.partial(
    jax.jit,
    static_argnames=("config", "scale", "implementation", "block_sizes", "interpret", "split"),
)
def _dga(q, k, v, lengths=None, *, config, scale, implementation, block_sizes, interpret, split):
    if implementation == "reference":
        return dga_attention_reference(q, k, v, config, scale)
    if implementation == "pallas_gpu":
        return pallas_gpu.dga_attention_pallas_gpu(
            q, k, v, config, scale, block_sizes, interpret, split, lengths
        )
    if implementation == "pallas_tpu":
        return pallas_tpu.dga_attention_pallas_tpu(
            q, k, v, config, scale, block_sizes, interpret, split, lengths
        )
    return dga_attention_xla(q, k, v, config, scale, block_sizes, split, lengths)

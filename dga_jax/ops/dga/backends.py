"""The implementations of interval attention, and the checks a kernel backend makes.

Every implementation is a function with `interval_attention`'s signature,
`(q, prefix, band, *, scale, block_sizes, band_lag, q_prefix, band_period) -> out`: "xla" is
`dga_jax.ops.intervals.interval_attention`, "pallas_gpu" and "pallas_tpu" the Pallas kernels.
DGA (`compressed_attention`) and the sink baselines (`dga_jax.ops.sinks`) run on any of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from dga_jax.ops.checks import check_block_sizes, check_launch
from dga_jax.ops.dga import pallas_gpu, pallas_gpu_importance, pallas_tpu
from dga_jax.ops.dga.selection import ImportancePasses
from dga_jax.ops.intervals import interval_attention
from dga_jax.ops.target import Target, placed_target
from dga_jax.ops.tiles import BlockSizes

INTERVAL_IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu")
# What the kernels' float32 accumulators take in: float64 (jax_enable_x64) broke deep in tracing.
KERNEL_DTYPES = ("float32", "bfloat16", "float16")


class KernelBackend(NamedTuple):
    """A kernel backend: its platform, whether this JAX has it, default tiles, tile rules,
    on-chip memory check, the interpreter settings it accepts, and its interval attention."""

    platform: str
    check_available: Callable[[], None]
    default_blocks: Callable[[tuple, np.dtype, Target], BlockSizes]
    check_tiles: Callable[[BlockSizes], None]
    check_fits: Callable[[BlockSizes, tuple, np.dtype, Target], None]
    check_interpret: Callable[[object], None]
    attention: Callable


KERNEL_BACKENDS = {
    name: KernelBackend(
        platform,
        module.check_available,
        module.default_blocks,
        module.check_block_sizes,
        module.check_fits,
        module.check_interpret,
        module.interval_attention,
    )
    for name, platform, module in (
        ("pallas_gpu", "gpu", pallas_gpu),
        ("pallas_tpu", "tpu", pallas_tpu),
    )
}


def interval_implementation(implementation: str, interpret: object = False) -> Callable:
    """The interval attention of one of `INTERVAL_IMPLEMENTATIONS` (checked by the caller)."""
    if implementation == "xla":
        return interval_attention
    return functools.partial(KERNEL_BACKENDS[implementation].attention, interpret=interpret)


def importance_implementation(
    implementation: str | None, interpret: object = False
) -> ImportancePasses | None:
    """How global importance runs under an implementation: the Triton kernels for
    "pallas_gpu", else None (XLA's loops, `selection.XLA_PASSES`)."""
    if implementation == "pallas_gpu":
        return pallas_gpu_importance.passes(bool(interpret))
    return None


def check_kernel(
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
    backend.check_available()
    target = placed_target(q, k, v)
    if interpret is False and target.platform != backend.platform:
        raise ValueError(
            f"implementation={implementation!r} compiles for {backend.platform.upper()} but the "
            f"inputs are placed on {target.platform!r} devices ({target.device_kind}): place "
            "them on a matching mesh, or pass the op interpret=True to run it in interpret mode "
            "(a model on these devices: attention_impl=None or 'xla')"
        )
    backend.check_interpret(interpret)
    if q.dtype.name not in KERNEL_DTYPES:
        raise ValueError(
            f"implementation={implementation!r} takes q, k, v in {', '.join(KERNEL_DTYPES)}, got "
            f"{q.dtype.name}: cast them, or use implementation='xla'"
        )
    if block_sizes is None:
        block_sizes = backend.default_blocks(q.shape, q.dtype, target)
    else:
        block_sizes = check_block_sizes(block_sizes)
    check_launch(block_sizes, implementation)
    backend.check_tiles(block_sizes)
    if interpret is False:
        backend.check_fits(block_sizes, q.shape, q.dtype, target)
    return block_sizes


def default_for(q: jax.Array, k: jax.Array, v: jax.Array) -> str:
    """What `implementation=None` runs: "pallas_gpu" for bfloat16/float16 inputs placed on GPUs
    (on an H100 the Triton kernels ran 2.3-6.2x faster than "xla", forward and forward+backward
    at 4K-32K, and two 7B layers' train step at 16K 1.5x; benchmarks/RESULTS.md, "GPU"), else
    "xla" (the TPU kernels have not run on a TPU; float32 was not timed on a GPU), also where
    no default tile fits the card's shared memory (D = 512), so None never fails where "xla"
    runs, and where this JAX has no Pallas Triton backend (`pallas_gpu.check_available`)."""
    target = placed_target(q, k, v)
    if target.platform != "gpu" or q.dtype.name not in ("bfloat16", "float16"):
        return "xla"
    try:
        pallas_gpu.check_available()
        blocks = pallas_gpu.default_blocks(q.shape, q.dtype, target)
        pallas_gpu.check_fits(blocks, q.shape, q.dtype, target)
    except ValueError:
        return "xla"
    return "pallas_gpu"


def check_implementation(
    implementation: str | None,
    block_sizes: BlockSizes | None,
    interpret: object,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: tuple[str, ...] = INTERVAL_IMPLEMENTATIONS,
) -> tuple[str, BlockSizes]:
    """-> (implementation, block sizes); errors name the argument. None picks `default_for`."""
    if implementation is None:
        implementation = default_for(q, k, v)
    if implementation not in allowed:
        raise ValueError(f"implementation must be one of {allowed} or None, got {implementation!r}")
    if implementation in KERNEL_BACKENDS:
        return implementation, check_kernel(implementation, block_sizes, interpret, q, k, v)
    if interpret is not False:
        raise ValueError(f"interpret applies to the Pallas implementations, not {implementation!r}")
    if implementation == "reference" and block_sizes is not None:  # they were ignored
        raise ValueError(
            "block_sizes are the tiles of the blockwise implementations ('xla' and the Pallas "
            "ones); implementation='reference' has none"
        )
    return implementation, check_launch(check_block_sizes(block_sizes), implementation)

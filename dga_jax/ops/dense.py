"""Dense causal attention: the baseline DGA is measured against.

- "xla": `jax.nn.dot_product_attention`, what a user would pick instead (materialises L x L);
- "blockwise": flash-style in XLA with causal block skipping, memory linear in L: the fair dense
  reference for long L on CPU (the same code DGA's XLA path runs, over all L tokens);
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, on NVIDIA GPUs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dga_jax.ops.checks import check_block_sizes, check_qkv
from dga_jax.ops.intervals import BlockSizes, Entries, interval_attention
from dga_jax.ops.target import placed_target

DENSE_IMPLEMENTATIONS = ("xla", "blockwise", "cudnn")


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Causal softmax attention. q [B, L, Hq, D], k/v [B, L, Hkv, D] -> [B, L, Hq, D].

    `implementation=None` picks "cudnn" for float16/bfloat16 inputs placed on GPUs (all cuDNN
    supports) and "xla" otherwise.
    """
    scale = check_qkv(q, k, v, scale)
    platform = placed_target(q, k, v).platform
    if implementation is None:
        half = q.dtype in (jnp.float16, jnp.bfloat16)
        implementation = "cudnn" if platform == "gpu" and half else "xla"
    if implementation not in DENSE_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {DENSE_IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if implementation == "cudnn" and platform != "gpu":
        raise ValueError(f"implementation='cudnn' needs GPU devices; inputs are on {platform!r}")
    return _dense(
        q,
        k,
        v,
        scale=scale,
        implementation=implementation,
        block_sizes=check_block_sizes(block_sizes),
    )


@functools.partial(jax.jit, static_argnames=("scale", "implementation", "block_sizes"))
def _dense(q, k, v, *, scale, implementation, block_sizes):
    if implementation != "blockwise":
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation=implementation
        )
    b, seq_len, hkv, _ = k.shape
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, hkv, seq_len))
    tokens = Entries(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions)
    return interval_attention(q, tokens, scale=scale, block_sizes=block_sizes)

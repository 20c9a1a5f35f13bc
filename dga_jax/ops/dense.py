"""Dense causal attention: the baseline DGA is measured against.

- "xla": `jax.nn.dot_product_attention`, what a user would pick instead (materialises L x L);
- "blockwise": flash-style in XLA with causal block skipping, memory linear in L: the fair dense
  reference for long L on CPU (the same code DGA's XLA path runs, over all L tokens);
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, on NVIDIA GPUs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dga_jax.ops.checks import check_block_sizes, check_launch, check_qkv, check_split
from dga_jax.ops.context import WHOLE, ContextSplit
from dga_jax.ops.intervals import Entries, interval_attention
from dga_jax.ops.target import placed_target
from dga_jax.ops.tiles import BlockSizes
from dga_jax.sharding import with_auto_axes

DENSE_IMPLEMENTATIONS = ("xla", "blockwise", "cudnn")
# What runs over a sequence split by a ContextSplit (K and V gathered): None there is "blockwise".
SPLIT_IMPLEMENTATIONS = (None, "blockwise")
# "blockwise" tiles: over the whole past, 512 x 512 ran its forward+backward 1-4% faster than
# DGA's default 1024 x 256 (tiny model's shapes, 16K, CPU; benchmarks/RESULTS.md).
DENSE_BLOCKS = BlockSizes(block_q=512, block_k=512)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    split: ContextSplit = WHOLE,
) -> jax.Array:
    """Causal softmax attention. q [B, L, Hq, D], k/v [B, L, Hkv, D] -> [B, L, Hq, D].

    `implementation=None` picks "cudnn" for float16/bfloat16 inputs placed on GPUs (all cuDNN
    supports) and "xla" otherwise. Under a `split` (inside `shard_map` over its mesh axes, each
    device holding C = L / parts positions: contiguous, or two zig-zag pieces), K and V are
    all-gathered and the local queries attend blockwise: "blockwise" only, [B, C, ...] in and
    out. `block_sizes`: the tiles of "blockwise" (None: `DENSE_BLOCKS`), refused for the others
    (under a split None is "blockwise"). "blockwise" is differentiable in reverse mode, as
    `dga_attention` under "xla" is (a custom VJP; forward mode is not).
    """
    scale = check_qkv(q, k, v, scale)
    platform = placed_target(q, k, v).platform
    if not isinstance(split, ContextSplit):
        raise ValueError(f"split must be a dga_jax ContextSplit, got {split!r}")
    check_split(split, "dense_attention")
    if split.shards > 1:
        if implementation not in SPLIT_IMPLEMENTATIONS:
            raise ValueError(
                f"dense attention over a split sequence runs 'blockwise', not {implementation!r}"
                " (or use context_parallel='ulysses', which keeps sequences whole)"
            )
        implementation = "blockwise"
    if implementation is None:
        half = q.dtype in (jnp.float16, jnp.bfloat16)
        implementation = "cudnn" if platform == "gpu" and half else "xla"
    if implementation not in DENSE_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {DENSE_IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if implementation == "cudnn" and platform != "gpu":
        raise ValueError(f"implementation='cudnn' needs GPU devices; inputs are on {platform!r}")
    if block_sizes is not None and implementation != "blockwise":
        raise ValueError(
            f"block_sizes are the tiles of implementation='blockwise'; {implementation!r} has "
            "none (it was ignored)"
        )
    run = functools.partial(
        _dense,
        scale=scale,
        implementation=implementation,
        block_sizes=check_launch(check_block_sizes(block_sizes, DENSE_BLOCKS), implementation),
        split=split,
        upcast=implementation == "xla" and platform == "cpu" and q.dtype == jnp.float16,
    )
    return with_auto_axes(run, q, k, v)


@functools.partial(
    jax.jit, static_argnames=("scale", "implementation", "block_sizes", "split", "upcast")
)
def _dense(q, k, v, *, scale, implementation, block_sizes, split, upcast):
    if implementation != "blockwise":
        # XLA:CPU has no float16 dot accumulating in float32 (it raises "precision
        # 'F16_F16_F32' is not supported"): `upcast` runs float16 in float32 there.
        qkv = [x.astype(jnp.float32) for x in (q, k, v)] if upcast else (q, k, v)
        out = jax.nn.dot_product_attention(
            *qkv, scale=scale, is_causal=True, implementation=implementation
        )
        return out.astype(q.dtype)
    k, v = split.gather_sequence(k, axis=1), split.gather_sequence(v, axis=1)
    b, seq_len, hkv, _ = k.shape
    keys = Entries(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), None)
    out = []
    for rows, first in zip(split.piece_rows(q), split.firsts(q.shape[1]), strict=True):
        positions = jnp.arange(seq_len, dtype=jnp.int32) - first  # query row r: position first + r
        tokens = dataclasses.replace(keys, start=jnp.broadcast_to(positions, (b, hkv, seq_len)))
        out.append(interval_attention(rows, tokens, scale=scale, block_sizes=block_sizes))
    return jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]

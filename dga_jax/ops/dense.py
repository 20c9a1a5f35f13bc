"""Dense causal attention: the baseline DGA is measured against.

- "xla": `jax.nn.dot_product_attention`, what a user would pick instead (materialises L x L);
- "blockwise": flash-style in XLA with causal block skipping, memory linear in L: the fair dense
  reference for long L on CPU (the same code DGA's XLA path runs, over all L tokens);
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, on NVIDIA GPUs.

Each takes a sliding `window` (Mistral's `sliding_window`): query t sees keys t - window + 1 .. t.
"blockwise" then walks each query block's window only (the keys as a band of intervals
[j, j + window)), so its work is O(L window), not O(L^2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dga_jax.ops.checks import check_block_sizes, check_launch, check_qkv, is_int
from dga_jax.ops.context import WHOLE, ContextSplit, check_split
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
    window: int | None = None,
) -> jax.Array:
    """Causal softmax attention. q [B, L, Hq, D], k/v [B, L, Hkv, D] -> [B, L, Hq, D].

    `window`: a sliding window of that many keys, the query's own included (key j is seen by
    queries j .. j + window - 1, as transformers' Mistral `sliding_window`); None: all the past.

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
    check_split(split, "dense_attention")
    window = check_window(window)
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
        window=window,
        upcast=implementation == "xla" and platform == "cpu" and q.dtype == jnp.float16,
    )
    return with_auto_axes(run, q, k, v)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "implementation", "block_sizes", "split", "window", "upcast"),
)
def _dense(q, k, v, *, scale, implementation, block_sizes, split, window, upcast):
    if window is not None and window >= k.shape[1] * split.shards:
        window = None  # every query sees its whole past anyway
    if implementation != "blockwise":
        # XLA:CPU has no float16 dot accumulating in float32 (it raises "precision
        # 'F16_F16_F32' is not supported"): `upcast` runs float16 in float32 there.
        qkv = [x.astype(jnp.float32) for x in (q, k, v)] if upcast else (q, k, v)
        out = jax.nn.dot_product_attention(
            *qkv,
            scale=scale,
            is_causal=True,
            local_window_size=None if window is None else (window - 1, 0),
            implementation=implementation,
        )
        return out.astype(q.dtype)
    k, v = split.gather_sequence(k, axis=1), split.gather_sequence(v, axis=1)
    b, seq_len, hkv, _ = k.shape
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = []
    for rows, first in zip(split.piece_rows(q), split.firsts(q.shape[1]), strict=True):
        positions = jnp.arange(seq_len, dtype=jnp.int32) - first  # query row r: position first + r
        start = jnp.broadcast_to(positions, (b, hkv, seq_len))
        if window is None:  # every key a prefix entry: visible for ever
            attend = functools.partial(interval_attention, rows, Entries(kt, vt, start))
        else:  # every key in the band, visible for `window` positions; no prefix
            empty = Entries(kt[:, :, :0], vt[:, :, :0], start[:, :, :0])
            band = Entries(kt, vt, start, start + window)
            attend = functools.partial(interval_attention, rows, empty, band, band_lag=window - 1)
        out.append(attend(scale=scale, block_sizes=block_sizes))
    return jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]


def check_window(window) -> int | None:
    """A sliding window: a number of keys >= 1 (a Python int: NumPy's too), or None (none)."""
    if window is not None and (not is_int(window) or window < 1):
        raise ValueError(
            f"window must be an int >= 1 (keys, the query's own included) or None, got {window!r}"
        )
    return None if window is None else int(window)

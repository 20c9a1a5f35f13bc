"""Input validation shared by every attention entry point: errors name the argument and shapes."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.tiles import BlockSizes


def check_qkv(q, k, v, scale: float | None) -> float:
    """Validates q [B, L, Hq, D], k/v [B, L, Hkv, D]; returns the softmax scale (1/sqrt(D))."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):  # a list: AttributeError before
            raise ValueError(f"{name} must be an array [B, L, H, D], got {type(x).__name__}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [B, L, H, D], got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, L, Hkv, D]; got {shapes}")
    for axis, name in ((0, "batch B"), (1, "length L"), (3, "head_dim D")):
        if q.shape[axis] != k.shape[axis]:
            raise ValueError(f"q and k/v must agree on {name} (axis {axis}); got {shapes}")
    sizes = {
        "batch B": q.shape[0],
        "sequence length L": q.shape[1],
        "query heads Hq": q.shape[2],
        "KV heads Hkv": k.shape[2],
        "head_dim D": q.shape[3],
    }
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{name} must be >= 1; got {shapes}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads Hq={q.shape[2]} must be a multiple of KV heads Hkv={k.shape[2]}; "
            f"got {shapes}"
        )
    if scale is None:
        return 1.0 / math.sqrt(q.shape[3])
    scale = _concrete_scalar(scale)
    if not is_real(scale) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def _concrete_scalar(x):
    """A concrete 0-d array as its Python number (a scale read from a config array was refused as
    not a number); a traced one is an error: the scale is static to every kernel."""
    if isinstance(x, jax.core.Tracer):
        raise ValueError("scale must be a concrete number (static to the kernels), got a tracer")
    if (
        isinstance(x, jax.Array | np.ndarray)
        and x.shape == ()
        and not jnp.issubdtype(x.dtype, jnp.bool_)
    ):
        return x.item()
    return x


def check_lengths(lengths, batch: int, seq_len: int) -> jax.Array | None:
    """Row lengths of a right-padded batch: None, or [batch] integers in [1, seq_len] (the range
    is checked where concrete: traced lengths are clipped by their users) -> int32 [batch]."""
    if lengths is None:
        return None
    if isinstance(lengths, list | tuple):
        lengths = np.asarray(lengths)
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer) or jnp.shape(lengths) != (batch,):
        raise ValueError(
            f"lengths must be integers of shape ({batch},), one per row; got "
            f"{jnp.result_type(lengths)} {jnp.shape(lengths)}"
        )
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        bad = (values < 1) | (values > seq_len)
        if bad.any():
            raise ValueError(
                f"lengths must lie in [1, L] = [1, {seq_len}]; rows {np.flatnonzero(bad).tolist()} "
                f"have {values[bad].tolist()}"
            )
    return jnp.asarray(lengths, jnp.int32)


def is_real(x) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def is_int(x) -> bool:
    """An integer (Python or NumPy scalar), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


def check_block_sizes(block_sizes, default: BlockSizes = BlockSizes()) -> BlockSizes:
    """`None` -> `default`; anything but a `BlockSizes` is an error."""
    if block_sizes is None:
        return default
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(
            f"block_sizes must be a dga_jax.BlockSizes or None, got {type(block_sizes).__name__}"
        )
    return block_sizes


def check_launch(block_sizes: BlockSizes, implementation: str) -> BlockSizes:
    """Triton launch settings (num_warps, num_stages) apply to "pallas_gpu" only."""
    if block_sizes.launch and implementation != "pallas_gpu":
        raise ValueError(
            f"BlockSizes {', '.join(block_sizes.launch)} set the Triton kernels' launch "
            f"(implementation='pallas_gpu'); implementation={implementation!r} takes none: "
            "leave them None"
        )
    return block_sizes

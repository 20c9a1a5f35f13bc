"""The tile engine: the per-tile attention math every walk shares, and the tile sizes.

A tile is a block of KV entries with visibility intervals: a query at position t sees entry e
iff `start_e <= t < until_e`, with an additive logit bias. The same functions serve the XLA
walk (`dga_jax.ops.intervals`, tiles with leading batch axes) and both Pallas backends (one
[bq, D] tile per program); a backend only says how it multiplies (`Dots`). Global importance's
two passes (`mass_stats_step`, `probability_mass`) serve its XLA loops and its Triton kernels
alike.

Shapes: queries q [..., R, D] at positions t [..., R, 1] (or [..., R, N]); a tile's k, v
[..., N, D], its start, until, bias [..., 1, N]. Softmax statistics are float32 columns
[..., R, 1]; a row that has seen nothing keeps max -inf, and finishes with output 0 and
log-sum-exp +inf.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the blockwise walks (XLA and kernels), clamped to the problem size.

    block_q queries walk the prefix block_k entries at a time; the XLA walk visits the band by
    sub-blocks of at most block_band queries (`band.band_rows`), and the prefix entries only
    some queries of a block see block_edge at a time (a divisor of block_k is used), so the walk
    stops closer to the last entry they see. block_importance is the key tile of DGA's
    importance pass (block_importance / m sampled queries per tile). Under streaming selection
    the XLA walk rounds block_q up to whole chunks of m' (`interval_attention`'s band_period:
    1026 = 57 x 18 queries at m = 16, gamma = 0.1).

    The defaults are DGA's XLA walk's: 1024 x 256 tiles ran its forward+backward 5-8% faster
    than 512 x 512 at D=32 with 2 query heads per KV head, and as fast at D=128 (CPU,
    benchmarks/RESULTS.md). Dense causal attention, whose prefix is the whole past, keeps
    512 x 512 (`dga_jax.ops.dense.DENSE_BLOCKS`); the kernels have their own. DGA's band lag
    sets its sub-blocks below block_band (32 queries at m=16; at a lag of 128 or more, m or
    m' >= 129, 256 or more, where block_band was 128 until stop 50); a sliding window of
    thousands of keys gets whole query blocks (fewer, wider windows: a 4K window at 16K ran
    1.6x faster forward+backward than in 128-query sub-blocks, `dense_attention(window=)`).

    num_warps and num_stages are the Triton walks' launch (implementation="pallas_gpu": the
    forward, dQ and dK'/dV' kernels; global importance keeps its own; None: 8 warps at D > 64
    else 4, and 2 pipeline stages); the other implementations refuse them
    (`checks.check_launch`). Set alone, they come with these defaults' tiles (1024 x 256), not
    the kernels' default ones: name the tiles too (`BlockSizes(128, 64, num_warps=4)`).
    """

    block_q: int = 1024
    block_k: int = 256
    block_band: int = 1024
    block_importance: int = 1024
    block_edge: int = 256
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        names = ("block_q", "block_k", "block_band", "block_importance", "block_edge")
        for name in (*names, *LAUNCH):
            value = getattr(self, name)
            if value is None and name in LAUNCH:
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        warps = self.num_warps
        if warps is not None and (warps & (warps - 1) or warps > MAX_WARPS):
            raise ValueError(
                f"BlockSizes.num_warps must be a power of two <= {MAX_WARPS} (a GPU block's "
                f"1,024 threads), got {warps}"
            )

    @property
    def launch(self) -> dict[str, int]:
        """The launch settings given (not None), by name."""
        return {name: getattr(self, name) for name in LAUNCH if getattr(self, name) is not None}


LAUNCH = ("num_warps", "num_stages")  # BlockSizes' Triton launch settings
MAX_WARPS = 32


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= x."""
    return -(-x // multiple) * multiple


def add_slice(x: jax.Array, offset: jax.Array, delta: jax.Array, axis: int) -> jax.Array:
    """x += delta at [offset, offset + delta.shape[axis]) along `axis` (a walk's gradients of
    the entries it read as one slice)."""
    current = jax.lax.dynamic_slice_in_dim(x, offset, delta.shape[axis], axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(x, current + delta, offset, axis=axis)


@dataclasses.dataclass(frozen=True)
class Dots:
    """A backend's matmuls with float32 results over the last two axes: a @ b.T, a @ b, and
    a.T @ b with a float32 (cast to b's dtype)."""

    nt: Callable
    nn: Callable
    tn: Callable


def _einsum(spec: str):
    def dot(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    return dot


def tn_transposed(a: jax.Array, b: jax.Array) -> jax.Array:
    """(a.T @ b).T in XLA: a [..., R, N] float32 (cast to b's dtype), b [..., R, D] -> [..., D, N].

    a.T @ b contracts the rows, the major axis of both operands. XLA:CPU runs it about twice as
    fast when the result is [D, N] (at D=32, N=512: the walk's backward 1.3-1.6x faster), so the
    XLA walk accumulates dK.T and dV.T; a transpose after the dot is folded back into it.
    """
    return jnp.einsum(
        "...rn,...rd->...dn", a.astype(b.dtype), b, preferred_element_type=jnp.float32
    )


XLA_DOTS = Dots(
    nt=_einsum("...rd,...nd->...rn"),
    nn=_einsum("...rn,...nd->...rd"),
    tn=lambda a, b: jnp.swapaxes(tn_transposed(a, b), -1, -2),
)


class Tile(NamedTuple):
    """One block of entries: k, v [..., N, D]; start, until, bias [..., 1, N] (None: absent)."""

    k: jax.Array
    v: jax.Array
    start: jax.Array | None  # None: every entry is visible to every query of the tile
    until: jax.Array | None = None  # None: visible for ever
    bias: jax.Array | None = None  # >= 0 (`online_step`); None: zero


State = tuple[jax.Array, jax.Array, jax.Array]  # running max, normaliser [..., R, 1]; acc


def tile_visible(t: jax.Array, tile: Tile) -> jax.Array | None:
    """Which entries each query at positions t sees [..., R, N] (None: the whole tile)."""
    if tile.start is None:
        return None
    visible = tile.start <= t
    if tile.until is not None:
        visible = visible & (t < tile.until)
    return visible


def _biased(raw: jax.Array, scale: float, tile: Tile) -> jax.Array:
    """Products q @ k.T [..., R, N] -> logits: scaled, plus the tile's bias."""
    return raw * scale if tile.bias is None else raw * scale + tile.bias


def tile_logits(dots: Dots, scale: float, q: jax.Array, t: jax.Array, tile: Tile):
    """Scaled, biased logits [..., R, N] of q [..., R, D] at positions t, and the visibility
    mask (None for a tile every query sees whole)."""
    return _biased(dots.nt(q, tile.k), scale, tile), tile_visible(t, tile)


def online_init(q_shape: tuple[int, ...]) -> State:
    """The state of queries [..., R, D] that have seen nothing, all float32."""
    column = (*q_shape[:-1], 1)
    return (
        jnp.full(column, -jnp.inf, jnp.float32),
        jnp.zeros(column, jnp.float32),
        jnp.zeros(q_shape, jnp.float32),
    )


def varying_like(x, *like):
    """x (a pytree) typed as varying over every manual mesh axis some array of `like` varies
    over: a loop's initial carry, whose body mixes in `like`. Inside a `jax.shard_map` that
    checks types (check_vma) a carry must vary as the body's outputs do; the cast is free (it
    lowers to nothing) and outside `jax.shard_map` x comes back as it is."""
    axes = frozenset().union(*(_varying_axes(a) for a in jax.tree.leaves(like)))

    def cast(leaf):
        missing = _ordered(axes - _varying_axes(leaf))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, x)


def varying_struct(shape: tuple[int, ...], dtype, *like) -> jax.ShapeDtypeStruct:
    """A kernel's output shape, typed as varying over every manual mesh axis some array of
    `like` varies over: inside a `jax.shard_map` that checks types (check_vma, its default) a
    `pallas_call` must be told (JAX 0.10 names it `manual_axis_type`, earlier JAX `vma`)."""
    axes = frozenset().union(*(_varying_axes(a) for a in like))
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    aval = jax.typeof(varying_like(like[0], *like))
    axis_type = getattr(aval, "manual_axis_type", None)
    if axis_type is None:
        return jax.ShapeDtypeStruct(shape, dtype, vma=aval.vma)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=axis_type)


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """The cotangent of `primal` from this device's share ct, typed as primal's (as a custom
    VJP's must be): summed over the manual mesh axes ct varies over and primal does not (every
    device there used the same primal), cast to vary where primal does. Outside a
    `jax.shard_map` that checks types (check_vma), ct as it is."""
    extra = _ordered(_varying_axes(ct) - _varying_axes(primal))
    return varying_like(jax.lax.psum(ct, extra) if extra else ct, primal)


def _ordered(axes: frozenset) -> tuple:
    return tuple(sorted(axes, key=str))


def _varying_axes(x: jax.Array) -> frozenset:
    """The manual mesh axes x varies over (JAX 0.10 renamed ShapedArray.vma)."""
    aval = jax.typeof(x)
    axis_type = getattr(aval, "manual_axis_type", None)
    return aval.vma if axis_type is None else axis_type.varying


def online_step(dots: Dots, scale: float, state: State, q, t, tile: Tile) -> State:
    """One online-softmax update of `state` by the tile's entries.

    On a tile every query sees whole, the running max is taken over the unscaled, unbiased
    products: the bias (DGA's log m) is >= 0, so the largest product's weight is >= 1 and none
    exceeds e^bias. The max then reads the matmul's output as it is, and the scale and bias join
    the exponential: one pass over the tile fewer under XLA. A masked tile's max is over its
    visible logits, bias included (the mask costs that pass anyway).
    """
    m, total, acc = state
    raw = dots.nt(q, tile.k)
    s = _biased(raw, scale, tile)
    visible = tile_visible(t, tile)
    if visible is None:
        tile_max = jnp.max(raw, axis=-1, keepdims=True) * scale
    else:
        s = jnp.where(visible, s, -jnp.inf)
        tile_max = jnp.max(s, axis=-1, keepdims=True)
    m_new = jnp.maximum(m, tile_max)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m - m_safe)
    total = alpha * total + jnp.sum(p, axis=-1, keepdims=True)
    return m_new, total, alpha * acc + dots.nn(p.astype(tile.v.dtype), tile.v)


def online_finish(state: State) -> tuple[jax.Array, jax.Array]:
    """-> (out [..., R, D] float32, log-sum-exp [..., R, 1])."""
    m, total, acc = state
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    return acc / safe, jnp.where(seen, m + jnp.log(safe), jnp.inf)


def mass_stats_step(scale: float, state, raw: jax.Array, visible: jax.Array | None):
    """Importance's first pass on one tile: the running max and normaliser [..., R] of
    exp(scale * raw) over the visible entries of raw [..., R, N] (products q @ k.T; visible None:
    all). No values.

    The max is of the products, unscaled, and each exponent (raw - max) * scale: a query's
    largest product gives exp(0) = 1 exactly. Taken as scale * raw - max, XLA fuses a
    multiply-subtract that skips raw * scale's rounding, so one-hot queries scored their key
    1 - 1e-6 at logits ~40 and near-ties fell by the fusion (the log-sum-exp: `raw_log_sum_exp`)."""
    mx, total = state
    if visible is not None:
        raw = jnp.where(visible, raw, -jnp.inf)
    new = jnp.maximum(mx, jnp.max(raw, axis=-1))
    safe = jnp.where(new == -jnp.inf, 0.0, new)
    p = jnp.exp((raw - safe[..., None]) * scale)
    return new, total * jnp.exp((mx - safe) * scale) + jnp.sum(p, axis=-1)


def raw_log_sum_exp(mx: jax.Array, total: jax.Array, scale: float) -> jax.Array:
    """The log-sum-exp of `mass_stats_step`'s (max, normaliser), in its unscaled units: max +
    log(total) / scale (inf where nothing was visible), which `probability_mass` takes."""
    seen = total > 0
    return jnp.where(seen, mx + jnp.log(jnp.where(seen, total, 1.0)) / scale, jnp.inf)


def probability_mass(scale: float, raw: jax.Array, lse: jax.Array, visible: jax.Array | None):
    """Importance's second pass on one tile: the softmax probabilities exp((raw - lse) * scale)
    of raw [..., R, N] summed over the visible rows -> [..., N]; lse [..., R] in raw's units
    (`raw_log_sum_exp`).

    A probability is at most 1: the exponent is capped at 0. At logits past ~1e8 (an absurd
    scale) the pass's products differ from the first pass's by more than float32's exp takes,
    and the scores overflowed to inf, every output then NaN; there they stay finite, though
    not meaningful (the passes disagree by more than the logits' spread)."""
    p = jnp.exp(jnp.minimum((raw - lse[..., None]) * scale, 0.0))
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    return jnp.sum(p, axis=-2)


def tile_grads(dots: Dots, scale: float, q, t, do, lse, delta, tile: Tile):
    """Float32 (ds [..., R, N] for dQ = ds @ k and dK = ds.T @ q, p [..., R, N] for
    dV = p.T @ do), from the saved log-sum-exp and delta = rowsum(dO * O) [..., R, 1]."""
    s, visible = tile_logits(dots, scale, q, t, tile)
    p = jnp.exp(s - lse)
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    dp = dots.nt(do, tile.v)
    return p * (dp - delta) * scale, p

"""MInference's vertical-slash sparse attention for prefill (microsoft/MInference v0.1.6).

Per query head, the pattern is estimated from the last 64 queries (`estimate_pattern`): their
causal softmax over all keys, summed per key column ("vertical") and per diagonal, offset
d = t - j ("slash"). The first 30 columns and the diagonals d < 100 are always kept; then the
top max(vertical_size, 30) columns and max(slash_size, 50) diagonals, both clamped to the
length. `vertical_slash_attention` attends exactly as the reference's kernels
(`convert_vertical_slash_indexes` + the Triton sparse kernel) do, which is not the exact
union of lines: per block of 64 query rows [s, e), each kept diagonal d < e names the 64-key
window [w - 64, w), w = max(e - d, 64); walking them by increasing w, a window past the current
range's end by more than 64 starts a new range, one past its end by at most 64 extends the
range by 64 keys (it can overshoot), and the rest are inside. Every range is a run of 64-key
blocks; a kept column outside the row block's ranges is attended alone. All under the causal
mask. Decoding is dense over the whole cache (MInference does that too), and there is no
backward: MInference is training-free.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.checks import check_lengths, check_qkv, is_int
from dga_jax.ops.intervals import NEVER
from dga_jax.ops.tiles import (
    XLA_DOTS,
    Tile,
    online_finish,
    online_init,
    online_step,
    varying_like,
)
from dga_jax.sharding import with_auto_axes

LAST_Q = 64  # queries that estimate the pattern
BLOCK = 64  # rows per pattern block, keys per attended block (the reference's BLOCK_M, _N)
FORCED_COLUMNS = 30
FORCED_DIAGONALS = 100
MIN_VERTICAL, MIN_SLASH = 30, 50
ROW_BLOCKS_PER_STEP = 4  # pattern blocks walked together (256 queries)
BLOCKS_PER_TILE = 8  # 64-key blocks attended together (512 keys)


@dataclasses.dataclass(frozen=True)
class MInferenceConfig:
    """Kept key columns and diagonals per head. Defaults: MInference's (`vertical_size=1000,
    slash_size=6096`); the reference raises them to at least 30 and 50."""

    vertical_size: int = 1000
    slash_size: int = 6096

    def __post_init__(self):
        for name in ("vertical_size", "slash_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"minference.{name} must be an int >= 1, got {value!r}")

    def check_fits(self, max_position: int) -> None:
        """A budget above the longest sequence means nothing: an error naming the field."""
        for name in ("vertical_size", "slash_size"):
            if getattr(self, name) > max_position:
                raise ValueError(
                    f"minference.{name}={getattr(self, name)} exceeds the model's "
                    f"max_position={max_position}: lower it"
                )

    def counts(self, seq_len: int) -> tuple[int, int]:
        """(columns, diagonals) kept for a sequence of seq_len tokens."""
        vertical = min(seq_len, max(self.vertical_size, MIN_VERTICAL))
        return vertical, min(seq_len, max(self.slash_size, MIN_SLASH))


def _check_config(config) -> None:
    if not isinstance(config, MInferenceConfig):
        raise ValueError(f"config must be a MInferenceConfig, got {type(config).__name__}")


def minference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: MInferenceConfig,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """MInference prefill attention (module docstring): q [B, L, Hq, D] and k, v [B, L, Hkv, D]
    (RoPE applied) -> [B, L, Hq, D]. `lengths` [B] ints in [1, L] (checked where concrete,
    clipped where traced): row b valid up to lengths[b] (right padding), estimated from its own
    last queries, so it equals the row alone."""
    scale = check_qkv(q, k, v, None)
    _check_config(config)
    run = functools.partial(_pattern_attention, config, scale)
    return with_auto_axes(run, q, k, v, _clipped_lengths(lengths, q))


def _pattern_attention(config, scale, q, k, v, length):
    columns, offsets = _estimate(q, k, length, config)
    return _no_backward(q, k, v, columns, offsets, scale)


def estimate_pattern(
    q: jax.Array, k: jax.Array, config: MInferenceConfig, lengths: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """-> (columns [B, Hq, nv] ascending, diagonal offsets [B, Hq, ns] descending), int32,
    with (nv, ns) = config.counts(L). Ties go to the lower column and the shorter offset.
    `lengths`: as `minference_attention`'s."""
    check_qkv(q, k, k, None)
    _check_config(config)
    return _estimate(q, k, _clipped_lengths(lengths, q), config)


def _clipped_lengths(lengths: jax.Array | None, q: jax.Array) -> jax.Array:
    """lengths checked (`check_lengths`), clipped to [0, L]; None: every row whole. -> [B] int32"""
    b, seq_len = q.shape[:2]
    length = check_lengths(lengths, b, seq_len)
    if length is None:
        length = jnp.full((b,), seq_len, jnp.int32)
    return jnp.clip(length, 0, seq_len)


@functools.partial(jax.jit, static_argnames="config")
def _estimate(q, k, length, config):
    b, seq_len, hq, d = q.shape
    hkv = k.shape[2]
    last = min(LAST_Q, seq_len)
    rows = jnp.maximum(length - last, 0)[:, None] + jnp.arange(last)  # [B, R] positions
    qs = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
    qs = qs.reshape(b, last, hkv, hq // hkv, d)
    s = jnp.einsum("brhgd,bjhd->bhgrj", qs, k, preferred_element_type=jnp.float32)
    s = s.reshape(b, hq, last, seq_len) * d**-0.5
    j = jnp.arange(seq_len)
    visible = (j <= rows[:, :, None]) & (rows < length[:, None])[:, :, None]  # [B, R, L]
    visible = visible[:, None]
    # A row past the length sees nothing: its NaN softmax is zeroed.
    p = jnp.where(visible, jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1), 0.0)
    key = rows[:, None, :, None] - j  # [B, 1, R, L]: the key of row r on diagonal d = j
    on_diagonal = jnp.take_along_axis(p, jnp.clip(key, 0, seq_len - 1), axis=-1)
    by_offset = jnp.where(key >= 0, on_diagonal, 0.0).sum(axis=2)  # [B, Hq, L], index d
    n_vertical, n_slash = config.counts(seq_len)
    columns = _top(p.sum(axis=2), FORCED_COLUMNS, length, n_vertical)
    offsets = _top(by_offset, FORCED_DIAGONALS, length, n_slash)
    return jnp.sort(columns, axis=-1), -jnp.sort(-offsets, axis=-1)


def _top(score: jax.Array, forced: int, length: jax.Array, count: int) -> jax.Array:
    """Indices of the `count` largest of score [B, H, L]: the first `forced` always, nothing
    at or past the row's length before any index inside it."""
    i = jnp.arange(score.shape[-1])
    inside = i < length[:, None, None]
    score = jnp.where(i < jnp.minimum(forced, length)[:, None, None], jnp.inf, score)
    return jax.lax.top_k(jnp.where(inside, score, -1.0), count)[1].astype(jnp.int32)


def slash_blocks(offsets: jax.Array, num_blocks: int) -> tuple[jax.Array, jax.Array]:
    """The reference's `convert_vertical_slash_indexes` for the diagonals: offsets [N, ns]
    (descending) -> (first keys of the 64-key blocks of each row block [N, num_blocks, n],
    ascending, NEVER past the count; counts [N, num_blocks])."""
    end = (jnp.arange(num_blocks, dtype=jnp.int32) + 1) * BLOCK

    def step(carry, d):
        started, range_end = carry  # [N, num_blocks]
        active = d[:, None] < end
        w = jnp.maximum(end - d[:, None], BLOCK)
        opened = active & (~started | (w > range_end + BLOCK))
        extended = active & started & ~opened & (w > range_end)
        first = jnp.where(opened, w - BLOCK, jnp.where(extended, range_end, NEVER))
        range_end = jnp.where(opened, w, jnp.where(extended, range_end + BLOCK, range_end))
        return (started | active, range_end), first

    zeros = varying_like(jnp.zeros((offsets.shape[0], num_blocks), jnp.int32), offsets)
    _, firsts = jax.lax.scan(step, (zeros.astype(bool), zeros), offsets.T)  # [ns, N, nb]
    firsts = jnp.sort(jnp.moveaxis(firsts, 0, -1), axis=-1)[..., : num_blocks + 1]
    width = -(-firsts.shape[-1] // BLOCKS_PER_TILE) * BLOCKS_PER_TILE
    firsts = jnp.pad(firsts, ((0, 0), (0, 0), (0, width - firsts.shape[-1])), constant_values=NEVER)
    return firsts, jnp.sum(firsts < NEVER, axis=-1, dtype=jnp.int32)


def vertical_slash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, columns: jax.Array, offsets: jax.Array
) -> jax.Array:
    """Attention of q [B, L, Hq, D] over k, v [B, L, Hkv, D] with the pattern of
    `estimate_pattern` (columns [B, Hq, nv], offsets [B, Hq, ns]) -> [B, L, Hq, D]. The walk
    reads columns ascending and offsets descending, all distinct in [0, L) (checked where
    concrete): any other order attends to other keys, silently."""
    scale = check_qkv(q, k, v, None)
    _check_pattern(q, columns=columns, offsets=offsets)
    return _vertical_slash(q, k, v, columns, offsets, scale=scale)


def _check_pattern(q: jax.Array, **lines: jax.Array) -> None:
    """columns / offsets: integers [B, Hq, n >= 1], in [0, L), strictly ascending / descending."""
    b, seq_len, hq, _ = q.shape
    for name, x in lines.items():
        shape, dtype = jnp.shape(x), jnp.result_type(x)
        if len(shape) != 3 or shape[:2] != (b, hq) or shape[2] < 1:
            raise ValueError(f"{name} must have shape ({b}, {hq}, n >= 1) [B, Hq, n]; got {shape}")
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {dtype}")
        if isinstance(x, jax.core.Tracer):
            continue
        x = np.asarray(x)
        step = np.diff(x, axis=-1) * (1 if name == "columns" else -1)
        if x.min() < 0 or x.max() >= seq_len or (step <= 0).any():
            order = "ascending" if name == "columns" else "descending"
            raise ValueError(
                f"{name} must be distinct, {order}, in [0, L) = [0, {seq_len}); got values in "
                f"[{x.min()}, {x.max()}]{'' if (step > 0).all() else ', out of order'}"
            )


@functools.partial(jax.jit, static_argnames="scale")
def _vertical_slash(q, k, v, columns, offsets, *, scale):
    b, seq_len, hq, d = q.shape
    hkv, n_blocks = k.shape[2], -(-seq_len // BLOCK)
    per_step = min(ROW_BLOCKS_PER_STEP, n_blocks)
    n_steps = -(-n_blocks // per_step)
    padded = n_steps * per_step * BLOCK
    firsts, counts = slash_blocks(offsets.reshape(b * hq, -1), n_steps * per_step)
    lanes = _kv_lanes(b, hq, hkv)
    keys, values = (_flat_keys(x, padded + BLOCK) for x in (k, v))  # [B*Hkv, L', D]
    cols = _columns(keys, values, columns.reshape(b * hq, -1), lanes)
    qt = jnp.pad(q, ((0, 0), (0, padded - seq_len), (0, 0), (0, 0)))
    qt = qt.reshape(b, n_steps, per_step, BLOCK, hq, d).transpose(1, 0, 4, 2, 3, 5)
    qt = qt.reshape(n_steps, b * hq, per_step, BLOCK, d)
    split = functools.partial(_by_step, n_steps, per_step)
    walk = functools.partial(_walk_step, scale, keys, values, lanes, cols)
    xs = (jnp.arange(n_steps, dtype=jnp.int32), qt, split(firsts), split(counts))
    out = jax.lax.map(walk, xs)  # [n_steps, B*Hq, per_step, BLOCK, D]
    out = out.reshape(n_steps, b, hq, per_step * BLOCK, d).transpose(1, 0, 3, 2, 4)
    return out.reshape(b, padded, hq, d)[:, :seq_len].astype(q.dtype)


def _kv_lanes(b: int, hq: int, hkv: int) -> jax.Array:
    """The [B*Hkv] row of each [B*Hq] query lane."""
    lane = jnp.arange(b * hq, dtype=jnp.int32)
    return lane // hq * hkv + lane % hq // (hq // hkv)


def _flat_keys(x: jax.Array, size: int) -> jax.Array:
    """[B, L, H, D] -> [B*H, size, D], zero-padded."""
    b, seq_len, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, size - seq_len), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3).reshape(b * h, size, d)


def _columns(keys, values, columns, lanes):
    """Each query lane's kept columns [N, nv'] (nv' a multiple of BLOCK, padding never seen)
    -> (k, v [N, nv', D], start [N, nv'])."""
    width = -(-columns.shape[1] // BLOCK) * BLOCK
    start = jnp.pad(columns, ((0, 0), (0, width - columns.shape[1])), constant_values=NEVER)
    index = jnp.minimum(start, keys.shape[1] - 1)
    k, v = (x[lanes[:, None], index] for x in (keys, values))
    return k, v, start


def _by_step(n_steps: int, per_step: int, x: jax.Array) -> jax.Array:
    """[N, n_steps * per_step, ...] -> [n_steps, N, per_step, ...]."""
    x = x.reshape(x.shape[0], n_steps, per_step, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _walk_step(scale, keys, values, lanes, cols, xs):
    """One step's row blocks: their slash blocks, then the kept columns outside them."""
    i, q, firsts, counts = xs  # q [N, P, BLOCK, D]; firsts [N, P, n]; counts [N, P]
    per_step = q.shape[1]
    t = (i * per_step + jnp.arange(per_step)[:, None]) * BLOCK + jnp.arange(BLOCK)  # [P, BLOCK]
    t = t[..., None]  # [P, BLOCK, 1]
    offs = jnp.arange(BLOCK, dtype=jnp.int32)

    def block_step(n, state):
        first = jax.lax.dynamic_slice_in_dim(firsts, n * BLOCKS_PER_TILE, BLOCKS_PER_TILE, 2)
        first = jnp.where(first < NEVER, first, -BLOCK)  # padding: a block never seen
        k, v = (_take_blocks(x, lanes, jnp.maximum(first, 0)) for x in (keys, values))
        start = (first[..., None] + offs).reshape(*first.shape[:2], -1)
        start = jnp.where(start < 0, NEVER, start)[..., None, :]
        return online_step(XLA_DOTS, scale, state, q, t, Tile(k, v, start))

    n_tiles = -(-jnp.max(counts) // BLOCKS_PER_TILE)
    state = varying_like(online_init(q.shape), q, keys, values, firsts)
    state = jax.lax.fori_loop(0, n_tiles, block_step, state)
    covered = _covered(firsts, cols[2])  # [N, P, nv']
    seen = jnp.max(jnp.sum(cols[2] <= t[-1, -1, 0], axis=-1))
    state = jax.lax.fori_loop(
        0, -(-seen // BLOCK), functools.partial(_column_step, scale, q, t, cols, covered), state
    )
    return online_finish(state)[0]


def _take_blocks(x: jax.Array, lanes: jax.Array, first: jax.Array) -> jax.Array:
    """The BLOCK rows from each of first [N, P, T] of x [M, L', D], row lanes[n] of x
    -> [N, P, T * BLOCK, D] (slices, not a gather per row)."""

    def one(lane, at):
        return jax.lax.dynamic_slice(x, (lane, at, 0), (1, BLOCK, x.shape[-1]))[0]

    blocks = jax.vmap(jax.vmap(jax.vmap(one, (None, 0)), (None, 0)))(lanes, first)
    return blocks.reshape(*first.shape[:2], -1, x.shape[-1])


def _column_step(scale, q, t, cols, covered, c, state):
    """The c-th BLOCK of kept columns (k, v [N, nv', D], start [N, nv']), each seen alone by
    the row blocks whose slash blocks do not cover it."""
    n, per_step = q.shape[:2]
    at = c * BLOCK
    k, v = (jax.lax.dynamic_slice_in_dim(x, at, BLOCK, axis=1) for x in cols[:2])
    k, v = (jnp.broadcast_to(x[:, None], (n, per_step, *x.shape[1:])) for x in (k, v))
    start = jax.lax.dynamic_slice_in_dim(cols[2], at, BLOCK, axis=1)[:, None]  # [N, 1, BLOCK]
    hidden = jax.lax.dynamic_slice_in_dim(covered, at, BLOCK, axis=2)  # [N, P, BLOCK]
    start = jnp.where(hidden, NEVER, start)[..., None, :]
    return online_step(XLA_DOTS, scale, state, q, t, Tile(k, v, start))


def _covered(firsts: jax.Array, columns: jax.Array) -> jax.Array:
    """Whether each column [N, nv] lies in one of the 64-key blocks firsts [N, P, n] (sorted)."""

    def lane(blocks, cols):  # [n], [nv]
        i = jnp.searchsorted(blocks, cols, side="right") - 1
        return (i >= 0) & (cols < blocks[jnp.maximum(i, 0)] + BLOCK)

    return jax.vmap(jax.vmap(lane, (0, None)))(firsts, columns)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _no_backward(q, k, v, columns, offsets, scale):
    return _vertical_slash(q, k, v, columns, offsets, scale=scale)


def _forward(q, k, v, columns, offsets, scale):
    return _no_backward(q, k, v, columns, offsets, scale), None


def _backward(scale, residuals, d_out):
    raise NotImplementedError(
        "attention 'minference' has no gradient: MInference is a training-free prefill method; "
        "train with attention 'dense' or 'dga' and evaluate under 'minference'"
    )


_no_backward.defvjp(_forward, _backward)

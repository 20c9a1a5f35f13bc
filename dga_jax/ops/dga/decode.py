"""DGA decoding: a per-layer KV cache of focal entries, group entries and a raw tail.

The rule is `docs/DGA_SPEC.md`, "Streaming selection and decoding". Per batch row and KV head
the cache holds

- the *prefix*: focal tokens and group entries (bias log m), all visible to every later token;
- the *tail*: the raw tokens not yet decided, at most m' = m + r' of them.

Each step appends one token to the tail, attends over prefix + tail with one float32 softmax, and
flushes the tail when it holds m' tokens: the top r' (scored by the new token's query) become
focal, the other m fold into one group. Shapes are static: buffers have capacities fixed by the
longest sequence the cache is built for (`prefix_capacity`), and per-row counts say which slots
are valid, so rows at different lengths share one batch.

`prefill` without a DGA config builds the dense cache (`dga_jax.ops.dense_decode.DenseCache`).
Every cache kind reads with its `attend` method and writes with `apply`: `decode_step` runs both
on a DGA or dense cache, `apply_update` writes into any cache, the bounded `SinkCache` of the
StreamingLLM / LM-Infinite baselines included.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.checks import check_lengths, check_qkv, is_int
from dga_jax.ops.dense_decode import (
    DenseCache,
    DenseUpdate,
    attend_entries,
    check_token,
    dense_prefill,
    write_slot,
)
from dga_jax.ops.dga.capacity import check_capacity, check_fits, flush_shape, prefix_capacity
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.entries import gather_entries
from dga_jax.ops.dga.layout import (
    DGALayout,
    RowCounts,
    dga_layout,
    fold_members,
    group_weights,
)
from dga_jax.ops.dga.selection import pairwise_top_mask, scaled_exp
from dga_jax.ops.sinks_decode import SinkCache, SinkUpdate


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DGACache:
    """One layer's DGA cache. B rows, H KV heads, C prefix slots, m' tail slots, D head dim."""

    prefix_k: jax.Array  # [B, H, C, D] focal tokens and group entries
    prefix_v: jax.Array  # [B, H, C, D]
    prefix_bias: jax.Array  # [B, H, C] f32: 0 for focal, log m for groups
    prefix_count: jax.Array  # [B] int32: valid prefix slots
    tail_k: jax.Array  # [B, H, m', D] raw tokens in position order
    tail_v: jax.Array  # [B, H, m', D]
    tail_count: jax.Array  # [B] int32: valid tail slots
    length: jax.Array  # [B] int32: tokens seen, i.e. the position of the next token
    config: DGAConfig = dataclasses.field(metadata=dict(static=True))
    scale: float = dataclasses.field(metadata=dict(static=True))
    max_len: int = dataclasses.field(metadata=dict(static=True))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, DGAUpdate]:
        """The new token's output over prefix, tail and itself, and what it writes; reads only.

        q: [B, Hq, D], k/v: [B, Hkv, D] of the token at position `length` (RoPE applied) ->
        (output [B, Hq, D] in q's dtype, the update: the token, and the entries of the flush
        its tail would make).
        """
        check_token(q, k, v, *self.tail_k.shape[:2], self.tail_k.shape[3])
        tail_k = write_slot(self.tail_k, self.tail_count, k)  # [B, H, m', D]: small copies
        tail_v = write_slot(self.tail_v, self.tail_count, v)
        tail_count = self.tail_count + 1
        prefix_valid = jnp.arange(self.prefix_k.shape[2]) < self.prefix_count[:, None]
        tail_valid = jnp.arange(tail_k.shape[2]) < tail_count[:, None]
        parts = [
            (self.prefix_k, self.prefix_v, prefix_valid, self.prefix_bias),
            (tail_k, tail_v, tail_valid, None),
        ]
        # No room: a full cache, or a prefix that overflowed (a capacity too small for traced
        # prompt lengths, which prefill cannot check): NaN, not entries silently dropped.
        overflow = self.prefix_count > self.prefix_k.shape[2]
        out = attend_entries(q, parts, self.scale, (self.length >= self.max_len) | overflow)
        entries = _flush_entries(q, tail_k, tail_v, self.config, self.scale)
        flush = tail_count == tail_k.shape[2]
        return out, DGAUpdate(k, v, flush, *entries)

    def apply(self, update: DGAUpdate) -> DGACache:
        """Appends the token to the tail; where the tail is full, moves it into the prefix.

        Flush entries are written for every row, at an out-of-range slot (dropped) where the
        tail is not full, so shapes stay static.
        """
        capacity, num_entries = self.prefix_k.shape[2], update.entries_k.shape[2]
        slots = self.prefix_count[:, None] + jnp.arange(num_entries)  # [B, E]
        slots = jnp.where(update.flush[:, None], slots, capacity)
        rows = jnp.arange(slots.shape[0])[:, None]

        def write(buffer, entries):  # buffer [B, H, C, ...], entries [B, H, E, ...]
            return buffer.at[rows, :, slots].set(jnp.moveaxis(entries, 2, 1), mode="drop")

        return dataclasses.replace(
            self,
            prefix_k=write(self.prefix_k, update.entries_k),
            prefix_v=write(self.prefix_v, update.entries_v),
            prefix_bias=write(self.prefix_bias, update.entries_bias),
            prefix_count=self.prefix_count + jnp.where(update.flush, num_entries, 0),
            tail_k=write_slot(self.tail_k, self.tail_count, update.k),
            tail_v=write_slot(self.tail_v, self.tail_count, update.v),
            tail_count=jnp.where(update.flush, 0, self.tail_count + 1),
            length=self.length + 1,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DGAUpdate:
    """What one step writes into a `DGACache`: the new token, and the flush of a full tail."""

    k: jax.Array  # [B, H, D] the new token, appended to the tail
    v: jax.Array  # [B, H, D]
    flush: jax.Array  # [B] bool: the tail is full and moves into the prefix
    entries_k: jax.Array  # [B, H, E, D] r' focal tokens and the group entry of the flush
    entries_v: jax.Array  # [B, H, E, D]
    entries_bias: jax.Array  # [B, H, E] f32


def prefill(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    max_len: int,
    config: DGAConfig | None = None,
    scale: float | None = None,
    capacity: int | None = None,
    lengths: jax.Array | None = None,
    layout: DGALayout | None = None,
    window: int | None = None,
) -> DGACache | DenseCache:
    """The cache after the P prompt tokens: DGA's (`config`) or, with `config=None`, dense
    (with a sliding `window`, `dense_attention`'s, if given).

    q: [B, P, Hq, D], k/v: [B, P, Hkv, D] (RoPE applied, checked as `dga_attention`'s), P may
    be 0. `max_len` is the most tokens the cache will ever hold; `capacity` overrides the DGA
    prefix capacity (the batch's `prefix_capacity` when rows prefilled at different lengths are
    concatenated). A given `layout` must be of the same config (checked by its sizes).

    `lengths` [B]: right-padded prompts, row b holding lengths[b] tokens (integers in [1, P],
    checked where concrete); its cache then equals that prompt's prefilled alone. With a
    `layout`, the lengths it was built with (`dga_layout(lengths=)`) when left out; given, they
    must be the layout's (compared where concrete). Without `capacity`, room for any length up
    to P; a given `capacity` must be at least `prefix_capacity(config, max_len, lengths)`:
    checked here for concrete lengths; a row whose prefix overflows a capacity too small for
    traced lengths decodes NaN.

    `layout`: the prompt's `dga_layout` (same config, scale and lengths) if the caller already
    built it for the prompt's attention (`dga_attention(layout=)`): selection runs once.
    """
    scale = _check_prefill(q, k, v, max_len, config, scale, capacity, layout)
    prompt_len = q.shape[1]
    if config is None:
        length = prompt_len if lengths is None else lengths
        return dense_prefill(k, v, scale, max_len, length, window)
    if window is not None:
        raise ValueError(f"window={window!r} is dense attention's sliding window; DGA has none")
    lengths = _layout_lengths(layout, check_lengths(lengths, q.shape[0], prompt_len))
    if capacity is None:
        every = [prompt_len] if lengths is None else np.arange(1, max(prompt_len, 1) + 1)
        capacity = prefix_capacity(config, max_len, every)
    elif not isinstance(lengths, jax.core.Tracer):
        check_capacity(config, max_len, capacity, [prompt_len] if lengths is None else lengths)
    rows = RowCounts.of(config, prompt_len, q.shape[0], lengths)
    return _dga_prefill(q, k, v, config, scale, max_len, capacity, rows, lengths, layout)


def _layout_lengths(layout: DGALayout | None, lengths: jax.Array | None) -> jax.Array | None:
    """The rows' lengths: a given layout's own where `lengths` is None; given both, they must
    agree (a cache counted for other lengths than its layout's entries is silently wrong)."""
    if layout is None:
        return lengths
    built = None if layout.length is None else layout.length[:, 0]
    if lengths is None:
        return built
    if built is None:
        raise ValueError(
            "lengths= given, but the layout was built without them: build it with "
            "dga_layout(lengths=) for right-padded rows, or leave lengths out"
        )
    concrete = not any(isinstance(x, jax.core.Tracer) for x in (lengths, built))
    if concrete and not np.array_equal(lengths, built):
        raise ValueError(
            f"lengths={np.asarray(lengths).tolist()}, but the layout was built with "
            f"lengths={np.asarray(built).tolist()}: pass the layout's lengths (or none)"
        )
    return lengths


def _check_prefill(q, k, v, max_len, config, scale, capacity, layout) -> float:
    """Validates `prefill`'s arguments; returns the softmax scale. A zero-length prompt is
    checked as a one-token one would be (`check_qkv` asks for L >= 1)."""
    if config is not None and not isinstance(config, DGAConfig):
        raise ValueError(f"config must be a DGAConfig or None (dense), got {config!r}")
    if layout is not None and not isinstance(layout, DGALayout):
        raise ValueError(f"layout must be a DGALayout (dga_layout's) or None, got {layout!r}")
    if layout is not None and config is None:
        raise ValueError("layout= is DGA's selection, but config=None builds a dense cache")
    if capacity is not None and (not is_int(capacity) or capacity < 0):
        raise ValueError(f"capacity must be an int >= 0 (prefix slots) or None, got {capacity!r}")
    if all(x.ndim == 4 and x.shape[1] == 0 for x in (q, k, v)):
        shapes = (jax.ShapeDtypeStruct((x.shape[0], 1, *x.shape[2:]), x.dtype) for x in (q, k, v))
        try:
            scale = check_qkv(*shapes, scale)
        except ValueError as e:
            raise ValueError(f"{e} (an empty prompt, checked as a one-token one)") from None
    else:
        scale = check_qkv(q, k, v, scale)
    check_fits(q.shape[1], max_len)
    if layout is not None and config is not None and layout.sizes != config.sizes(q.shape[1]):
        raise ValueError(
            f"layout was built for {layout.sizes}, but config={config} over the prompt's "
            f"{q.shape[1]} positions gives {config.sizes(q.shape[1])}: build the layout with "
            "the same config"
        )
    return scale


def decode_step(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: DGACache | DenseCache
) -> tuple[jax.Array, DGACache | DenseCache]:
    """Appends one token per row and attends over the cache: `cache.attend`, then `apply_update`.

    q: [B, Hq, D], k/v: [B, Hkv, D] of the token at position `cache.length` (RoPE applied) ->
    (output [B, Hq, D] in q's dtype, the updated cache); a token of other rows, KV heads or head
    dim than the cache's is refused (`check_token`). A model calls the two halves apart, to
    read every layer's cache first and write all of them after (in place; XLA copies a buffer
    that one step both reads and updates). A row already holding `max_len` tokens has no room:
    its output is NaN (`prefix_capacity` and `check_fits` catch this on the host before running).
    """
    if not isinstance(cache, DGACache | DenseCache | SinkCache):
        raise ValueError(f"cache must be a cache from prefill or sink_prefill, got {cache!r}")
    out, update = cache.attend(q, k, v)
    return out, apply_update(cache, update)


def apply_update(
    cache: DGACache | DenseCache | SinkCache, update: DGAUpdate | DenseUpdate | SinkUpdate
) -> DGACache | DenseCache | SinkCache:
    """Writes one step's `update` into `cache` (vmap it over a leading layers axis)."""
    kinds = {DGACache: DGAUpdate, DenseCache: DenseUpdate, SinkCache: SinkUpdate}
    if kinds.get(type(cache)) is not type(update):  # another kind's: an AttributeError inside
        raise ValueError(
            f"apply_update writes into a {type(cache).__name__} only its own kind of update "
            f"({kinds.get(type(cache), object).__name__}), got a {type(update).__name__}"
        )
    return cache.apply(update)


def _dga_prefill(q, k, v, config, scale, max_len, capacity, rows: RowCounts, lengths, layout):
    """Each row's prefix (its focal tokens and groups, position-sorted) and its leftovers as the
    tail; `rows` holds its counts (`lengths` [B] or None: all P); `layout` None: built here."""
    b, prompt_len, hkv, d = k.shape
    focal, fold = flush_shape(config)
    members = rows.num_groups * config.group_size
    if prompt_len:
        if layout is None:
            layout = dga_layout(q, k, config, scale, lengths=lengths)
        prefix, raw = gather_entries(layout, k, v)
        pk, pv, bias = prefix.k, prefix.v, prefix.bias
        tk, tv = (_slots_from(x, members, focal + fold) for x in (raw.k, raw.v))
    else:
        pk = pv = jnp.zeros((b, hkv, 0, d), k.dtype)
        bias = jnp.zeros((b, hkv, 0), jnp.float32)
        tk = tv = jnp.zeros((b, hkv, focal + fold, d), k.dtype)
    return DGACache(
        _fit(pk, capacity),
        _fit(pv, capacity),
        _fit(bias, capacity),
        rows.num_focal + rows.num_groups,
        tk,
        tv,
        rows.length - rows.num_focal - members,
        rows.length,
        config,
        scale,
        max_len,
    )


def _slots_from(x: jax.Array, first: jax.Array, size: int) -> jax.Array:
    """x [B, H, N, D] -> [B, H, size, D]: slots first[b], first[b] + 1, ... of each row (zeros
    past N)."""
    if x.shape[2] == 0:
        return jnp.zeros(x.shape[:2] + (size,) + x.shape[3:], x.dtype)
    index = first[:, None, None, None] + jnp.arange(size)[None, None, :, None]
    out = jnp.take_along_axis(x, jnp.minimum(index, x.shape[2] - 1), axis=2)
    return jnp.where(index < x.shape[2], out, 0)


def _fit(x: jax.Array, size: int) -> jax.Array:
    """x [B, H, N, ...] padded with zeros or cut to `size` slots along axis 2 (a padded row's
    prefix list ends with unused slots: cutting drops only those)."""
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, max(size - x.shape[2], 0))
    return jnp.pad(x, widths)[:, :, :size]


def _flush_entries(q, tail_k, tail_v, config: DGAConfig, scale: float):
    """The entries a full tail becomes: ([B, H, E, D] keys, values, [B, H, E] f32 bias).

    Tail token i scores Σ_{query heads} softmax_i(q · k_i * scale); the top r' (ties: lower
    position) are focal, in position order; the rest fold with weights ∝ score (uniform 1/m if
    the scores sum to 0) into one entry with bias log m.
    """
    focal, fold = flush_shape(config)
    b, hq, d = q.shape
    hkv = tail_k.shape[1]
    qg = jax.lax.stop_gradient(q).reshape(b, hkv, hq // hkv, d)
    raw = jnp.einsum("bhgd,bhnd->bhgn", qg, tail_k, preferred_element_type=jnp.float32)
    p = scaled_exp(raw, jnp.max(raw, axis=-1, keepdims=True), scale)
    score = (p / jnp.sum(p, axis=-1, keepdims=True)).sum(axis=2)  # [B, H, m']
    is_focal = pairwise_top_mask(score, focal)
    # Stable sorts put focal (resp. non-focal) positions first, each in position order.
    focal_idx = jnp.argsort(~is_focal, axis=-1, stable=True)[..., :focal]
    keys = jnp.take_along_axis(tail_k, focal_idx[..., None], axis=2)
    values = jnp.take_along_axis(tail_v, focal_idx[..., None], axis=2)
    bias = jnp.zeros((b, hkv, focal), jnp.float32)
    if fold:
        member_idx = jnp.argsort(is_focal, axis=-1, stable=True)[..., :fold]
        w = group_weights(jnp.take_along_axis(score, member_idx, axis=-1))
        keys = jnp.concatenate([keys, _fold(tail_k, member_idx, w)], axis=2)
        values = jnp.concatenate([values, _fold(tail_v, member_idx, w)], axis=2)
        group_bias = jnp.full((b, hkv, 1), math.log(config.group_size), jnp.float32)
        bias = jnp.concatenate([bias, group_bias], axis=2)
    return keys, values, bias


def _fold(x: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
    """Σ_i w_i x[idx_i]: x [B, H, N, D], idx/w [B, H, m] -> [B, H, 1, D] in x's dtype."""
    members = jnp.take_along_axis(x, idx[..., None], axis=2)
    return fold_members(w, members)[:, :, None, :]


def cache_bytes(cache) -> int:
    """Bytes of every array in a cache (or a pytree of caches)."""
    return sum(x.nbytes for x in jax.tree.leaves(cache))

"""DGA decoding: a per-layer KV cache of focal entries, group entries and a raw tail.

The rule is `shared/DGA_SPEC.md`, "Streaming selection and decoding". Per batch row and KV head
the cache holds

- the *prefix*: focal tokens and group entries (bias log m), all visible to every later token;
- the *tail*: the raw tokens not yet decided, at most m' = m + r' of them.

Each step appends one token to the tail, attends over prefix + tail with one float32 softmax, and
flushes the tail when it holds m' tokens: the top r' (scored by the new token's query) become
focal, the other m fold into one group. Shapes are static: buffers have capacities fixed by the
longest sequence the cache is built for (`prefix_capacity`), and per-row counts say which slots
are valid, so rows at different lengths share one batch.

`DenseCache` is the dense KV cache with the same `prefill` / `decode_step` interface.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.layout import RowCounts, dga_layout, gather_entries
from dga_jax.ops.sinks_decode import SinkCache, sink_apply


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseCache:
    """One layer's dense KV cache: every token, in position order."""

    k: jax.Array  # [B, H, max_len, D]
    v: jax.Array  # [B, H, max_len, D]
    length: jax.Array  # [B] int32: tokens seen, i.e. the position (and slot) of the next token
    scale: float = dataclasses.field(metadata=dict(static=True))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseUpdate:
    """What one step writes into a `DenseCache`: the new token."""

    k: jax.Array  # [B, H, D]
    v: jax.Array  # [B, H, D]


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


def flush_shape(config: DGAConfig) -> tuple[int, int]:
    """(r', m_fold): tail tokens made focal and tail tokens folded into one group per flush.

    gamma >= 1 keeps every token focal: the tail flushes each token straight to the prefix.
    """
    if config.focal_ratio >= 1.0:
        return 1, 0
    return config.chunk_focal, config.group_size


def entries_per_flush(config: DGAConfig) -> int:
    """Prefix entries one flush adds: r' focal tokens and, if anything is folded, one group."""
    focal, fold = flush_shape(config)
    return focal + (fold > 0)


def prefill_counts(config: DGAConfig, prompt_lengths) -> tuple[np.ndarray, np.ndarray]:
    """(prefix entries, tail tokens) after a prefill of `prompt_lengths` tokens (elementwise).

    Global: r = ceil(gamma P) focal and (P - r) // m groups, the (P - r) mod m leftovers in the
    tail; streaming: r' focal and one group per complete chunk of m', the rest in the tail.
    """
    lengths = np.asarray(prompt_lengths, np.int64)
    focal, groups = config.counts(lengths)
    return focal + groups, lengths - focal - groups * config.group_size


def prefix_capacity(config: DGAConfig, max_len: int, prompt_lengths: Sequence[int]) -> int:
    """Prefix slots for rows prefilled at `prompt_lengths` and decoded up to `max_len` tokens.

    A row prefilled at P holds `prefill_counts` entries and tokens; each of the next max_len - P
    tokens joins the tail, and every m'-th flushes `entries_per_flush` entries into the prefix.
    """
    lengths = np.asarray(prompt_lengths, np.int64)
    check_fits(int(lengths.max()), max_len)
    focal, fold = flush_shape(config)
    prefix, tail = prefill_counts(config, lengths)
    flushes = (tail + max_len - lengths) // (focal + fold)
    return int(np.max(prefix + flushes * entries_per_flush(config)))


def check_fits(num_tokens: int, max_len: int) -> None:
    """Raises if a cache built for `max_len` tokens would have to hold `num_tokens`."""
    if num_tokens > max_len:
        raise ValueError(
            f"the KV cache is built for max_len={max_len} tokens but {num_tokens} are needed; "
            "build it with a larger max_len"
        )


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
) -> DGACache | DenseCache:
    """The cache after the P prompt tokens: DGA's (`config`) or, with `config=None`, dense.

    q: [B, P, Hq, D], k/v: [B, P, Hkv, D] (RoPE applied), P may be 0. `max_len` is the most
    tokens the cache will ever hold; `capacity` overrides the DGA prefix capacity (the batch's
    `prefix_capacity` when rows prefilled at different lengths are concatenated).

    `lengths` [B]: right-padded prompts, row b holding lengths[b] tokens; its cache then equals
    that prompt's prefilled alone. Without `capacity`, room for any length up to P; a given
    `capacity` must be at least `prefix_capacity(config, max_len, lengths)` (checked on the
    host by `dga_jax.generate`; traced lengths cannot be).
    """
    prompt_len = q.shape[1]
    check_fits(prompt_len, max_len)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if config is None:
        length = prompt_len if lengths is None else jnp.asarray(lengths, jnp.int32)
        return _dense_prefill(k, v, scale, max_len, length)
    if lengths is None:
        needed = prefix_capacity(config, max_len, [prompt_len])
        if capacity is not None and capacity < needed:
            raise ValueError(
                f"capacity={capacity} prefix slots are too few: a prompt of {prompt_len} tokens "
                f"decoded up to max_len={max_len} needs {needed}"
            )
        capacity = needed if capacity is None else capacity
    elif capacity is None:
        capacity = prefix_capacity(config, max_len, np.arange(1, max(prompt_len, 1) + 1))
    rows = RowCounts.of(config, prompt_len, q.shape[0], lengths)
    return _dga_prefill(q, k, v, config, scale, max_len, capacity, rows, lengths)


def decode_step(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: DGACache | DenseCache
) -> tuple[jax.Array, DGACache | DenseCache]:
    """Appends one token per row and attends over the cache: `attend_step`, then `apply_update`.

    q: [B, Hq, D], k/v: [B, Hkv, D] of the token at position `cache.length` (RoPE applied) ->
    (output [B, Hq, D] in q's dtype, the updated cache).
    """
    out, update = attend_step(q, k, v, cache)
    return out, apply_update(cache, update)


def attend_step(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: DGACache | DenseCache
) -> tuple[jax.Array, DGAUpdate | DenseUpdate]:
    """The new token's output over the cache and itself, and what it writes; reads only.

    Kept apart from the writes so that a model can read every layer's cache first and write
    all of them after (in place; XLA copies a buffer that one step both reads and updates).
    A row already holding `max_len` tokens has no room: its output is NaN (`prefix_capacity`
    and `check_fits` catch this on the host before running).
    """
    if isinstance(cache, DenseCache):
        out, update = _dense_attend(q, k, v, cache)
    else:
        out, update = _dga_attend(q, k, v, cache)
    overflow = cache.length >= cache.max_len
    return jnp.where(overflow[:, None, None], jnp.nan, out).astype(q.dtype), update


def apply_update(
    cache: DGACache | DenseCache, update: DGAUpdate | DenseUpdate
) -> DGACache | DenseCache:
    """Writes one step's `update` into `cache` (vmap it over a leading layers axis)."""
    if isinstance(cache, SinkCache):
        return sink_apply(cache, update)
    if isinstance(cache, DenseCache):
        k = _write_slot(cache.k, cache.length, update.k)
        v = _write_slot(cache.v, cache.length, update.v)
        return DenseCache(k, v, cache.length + 1, cache.scale)
    return _dga_apply(cache, update)


def _dense_prefill(k, v, scale: float, max_len: int, length) -> DenseCache:
    """Slots past a row's `length` (int or [B]) hold padding; decoding overwrites them."""
    b, prompt_len = k.shape[:2]
    pad = ((0, 0), (0, 0), (0, max_len - prompt_len), (0, 0))
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, P, D]
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (b,))
    return DenseCache(jnp.pad(kt, pad), jnp.pad(vt, pad), length, scale)


def _dense_attend(q, k, v, cache: DenseCache) -> tuple[jax.Array, DenseUpdate]:
    new = (k[:, :, None], v[:, :, None], jnp.ones((k.shape[0], 1), bool), None)
    valid = jnp.arange(cache.max_len) < cache.length[:, None]  # [B, max_len]
    out = _attend(q, [(cache.k, cache.v, valid, None), new], cache.scale)
    return out, DenseUpdate(k, v)


def _dga_prefill(q, k, v, config, scale, max_len, capacity, rows: RowCounts, lengths):
    """Each row's prefix (its focal tokens and groups, position-sorted) and its leftovers as the
    tail; `rows` holds its counts (`lengths` [B] or None: all P)."""
    b, prompt_len, hkv, d = k.shape
    focal, fold = flush_shape(config)
    members = rows.num_groups * config.group_size
    if prompt_len:
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


def _dga_attend(q, k, v, cache: DGACache) -> tuple[jax.Array, DGAUpdate]:
    tail_k = _write_slot(cache.tail_k, cache.tail_count, k)  # [B, H, m', D]: small copies
    tail_v = _write_slot(cache.tail_v, cache.tail_count, v)
    tail_count = cache.tail_count + 1
    prefix_valid = jnp.arange(cache.prefix_k.shape[2]) < cache.prefix_count[:, None]
    tail_valid = jnp.arange(tail_k.shape[2]) < tail_count[:, None]
    out = _attend(
        q,
        [
            (cache.prefix_k, cache.prefix_v, prefix_valid, cache.prefix_bias),
            (tail_k, tail_v, tail_valid, None),
        ],
        cache.scale,
    )
    entries = _flush_entries(q, tail_k, tail_v, cache.config, cache.scale)
    flush = tail_count == tail_k.shape[2]
    return out, DGAUpdate(k, v, flush, *entries)


def _dga_apply(cache: DGACache, update: DGAUpdate) -> DGACache:
    """Appends the token to the tail; where the tail is full, moves it into the prefix.

    Flush entries are written for every row, at an out-of-range slot (dropped) where the tail
    is not full, so shapes stay static.
    """
    capacity, num_entries = cache.prefix_k.shape[2], update.entries_k.shape[2]
    slots = cache.prefix_count[:, None] + jnp.arange(num_entries)  # [B, E]
    slots = jnp.where(update.flush[:, None], slots, capacity)
    rows = jnp.arange(slots.shape[0])[:, None]

    def write(buffer, entries):  # buffer [B, H, C, ...], entries [B, H, E, ...]
        return buffer.at[rows, :, slots].set(jnp.moveaxis(entries, 2, 1), mode="drop")

    return dataclasses.replace(
        cache,
        prefix_k=write(cache.prefix_k, update.entries_k),
        prefix_v=write(cache.prefix_v, update.entries_v),
        prefix_bias=write(cache.prefix_bias, update.entries_bias),
        prefix_count=cache.prefix_count + jnp.where(update.flush, num_entries, 0),
        tail_k=_write_slot(cache.tail_k, cache.tail_count, update.k),
        tail_v=_write_slot(cache.tail_v, cache.tail_count, update.v),
        tail_count=jnp.where(update.flush, 0, cache.tail_count + 1),
        length=cache.length + 1,
    )


def _write_slot(buffer: jax.Array, slot: jax.Array, x: jax.Array) -> jax.Array:
    """buffer [B, H, N, D] with x [B, H, D] written at slot[b] of each row (dropped if >= N)."""
    rows = jnp.arange(buffer.shape[0])
    return buffer.at[rows, :, slot].set(x.astype(buffer.dtype), mode="drop")


def _attend(q: jax.Array, parts, scale: float) -> jax.Array:
    """One softmax over several entry lists. q [B, Hq, D] -> [B, Hq, D] float32.

    parts: (k [B, H, N, D], v [B, H, N, D], valid [B, N], bias [B, H, N] f32 or None) each.
    """
    b, hq, d = q.shape
    hkv = parts[0][0].shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    logits = []
    for k, _, valid, bias in parts:
        s = jnp.einsum("bhgd,bhnd->bhgn", qg, k, preferred_element_type=jnp.float32) * scale
        if bias is not None:
            s = s + bias[:, :, None, :]
        logits.append(jnp.where(valid[:, None, None, :], s, -jnp.inf))
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    out = jnp.zeros((b, hkv, hq // hkv, d), jnp.float32)
    start = 0
    for k, v, _, _ in parts:
        p = probs[..., start : start + k.shape[2]].astype(v.dtype)
        out = out + jnp.einsum("bhgn,bhnd->bhgd", p, v, preferred_element_type=jnp.float32)
        start += k.shape[2]
    return out.reshape(b, hq, d)


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
    logits = jnp.einsum("bhgd,bhnd->bhgn", qg, tail_k, preferred_element_type=jnp.float32)
    score = jax.nn.softmax(logits * scale, axis=-1).sum(axis=2)  # [B, H, m']
    is_focal = _top_mask(score, focal)
    # Stable sorts put focal (resp. non-focal) positions first, each in position order.
    focal_idx = jnp.argsort(~is_focal, axis=-1, stable=True)[..., :focal]
    keys = jnp.take_along_axis(tail_k, focal_idx[..., None], axis=2)
    values = jnp.take_along_axis(tail_v, focal_idx[..., None], axis=2)
    bias = jnp.zeros((b, hkv, focal), jnp.float32)
    if fold:
        member_idx = jnp.argsort(is_focal, axis=-1, stable=True)[..., :fold]
        w = jnp.take_along_axis(score, member_idx, axis=-1)
        total = w.sum(axis=-1, keepdims=True)
        w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 1.0 / fold)
        keys = jnp.concatenate([keys, _fold(tail_k, member_idx, w)], axis=2)
        values = jnp.concatenate([values, _fold(tail_v, member_idx, w)], axis=2)
        group_bias = jnp.full((b, hkv, 1), math.log(config.group_size), jnp.float32)
        bias = jnp.concatenate([bias, group_bias], axis=2)
    return keys, values, bias


def _top_mask(score: jax.Array, r: int) -> jax.Array:
    """Mask [..., N] of the r largest scores along the last axis; ties: lower position wins."""
    n = score.shape[-1]
    earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # [i, j]: j before i
    ahead = (score[..., None, :] > score[..., :, None]) | (
        (score[..., None, :] == score[..., :, None]) & earlier
    )
    return jnp.sum(ahead, axis=-1) < r


def _fold(x: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
    """Σ_i w_i x[idx_i]: x [B, H, N, D], idx/w [B, H, m] -> [B, H, 1, D] in x's dtype."""
    members = jnp.take_along_axis(x, idx[..., None], axis=2)
    out = jnp.einsum("bhm,bhmd->bhd", w, members, preferred_element_type=jnp.float32)
    return out[:, :, None, :].astype(x.dtype)


def cache_bytes(cache) -> int:
    """Bytes of every array in a cache (or a pytree of caches)."""
    return sum(x.nbytes for x in jax.tree.leaves(cache))

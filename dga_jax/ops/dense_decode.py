"""Dense decoding: a per-layer KV cache of every token in position order, or, under a sliding
window, a ring of the window's last tokens.

`dga_jax.ops.dga.decode.prefill` builds it when given no DGA config (dense models, and
MInference, which decodes densely); `decode_step` and `apply_update` there drive it as they do
the DGA cache. The one-query softmax over several entry lists (`attend_entries`) and the slot
writes are shared with the DGA cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dga_jax.ops.checks import check_lengths, is_int
from dga_jax.ops.dense import check_window


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseCache:
    """One layer's dense KV cache: every token, in position order (slot = position).

    With a sliding `window` (`dense_attention`'s: a token attends to the last `window` keys, its
    own included) the cache is a ring of `window` slots, position p in slot p % window: the new
    token overwrites the one that leaves its window, so memory and each step's work stay
    O(window) however long decoding runs, also past max_len (a window of max_len included).
    A window over max_len never binds within max_len tokens: prefill builds the plain cache of
    max_len slots then (window None), which refuses a step past it.
    """

    k: jax.Array  # [B, H, slots, D]
    v: jax.Array  # [B, H, slots, D]
    length: jax.Array  # [B] int32: tokens seen, i.e. the position of the next token
    scale: float = dataclasses.field(metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def max_len(self) -> int | None:
        """Tokens the cache can hold (`check_next_position` refuses a step past it); None for
        a ring, which is never full."""
        return None if self.window is not None else self.slots

    @property
    def slots(self) -> int:
        """Slots per row (max_len, or the window's ring): k's next-to-last axis, also on a
        model's caches stacked over layers ([num_layers, B, H, slots, D])."""
        return self.k.shape[-2]

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, DenseUpdate]:
        """The new token's output over the cache and itself, and what it writes; reads only.

        q: [B, Hq, D], k/v: [B, Hkv, D] of the token at position `length` (RoPE applied) ->
        (output [B, Hq, D] in q's dtype, the update).
        """
        check_token(q, k, v, self.k.shape[0], self.k.shape[1], self.k.shape[3])
        new = (k[:, :, None], v[:, :, None], jnp.ones((k.shape[0], 1), bool), None)
        slots = jnp.arange(self.slots)
        # Written slots, less the one the new token takes: in a ring, the token leaving the window.
        valid = (slots < self.length[:, None]) & (slots != self._slot()[:, None])
        full = jnp.zeros_like(valid[:, 0]) if self.max_len is None else self.length >= self.max_len
        out = attend_entries(q, [(self.k, self.v, valid, None), new], self.scale, full)
        return out, DenseUpdate(k, v)

    def apply(self, update: DenseUpdate) -> DenseCache:
        """Writes the new token at its slot."""
        k = write_slot(self.k, self._slot(), update.k)
        v = write_slot(self.v, self._slot(), update.v)
        return dataclasses.replace(self, k=k, v=v, length=self.length + 1)

    def _slot(self) -> jax.Array:
        """[B] the new token's slot: its position, or in a ring that modulo the window."""
        return self.length if self.window is None else self.length % self.window


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseUpdate:
    """What one step writes into a `DenseCache`: the new token."""

    k: jax.Array  # [B, H, D]
    v: jax.Array  # [B, H, D]


def dense_prefill(
    k: jax.Array, v: jax.Array, scale: float, max_len: int, length, window: int | None = None
) -> DenseCache:
    """The cache after a prompt k, v [B, P, Hkv, D], rows valid up to `length`: the int P, or
    integers [B] in [1, P] (checked where concrete, clipped where traced); `window`: the
    sliding window decoding attends over (None: every token; one over max_len never binds
    within max_len tokens, and is dropped).

    Slots past a row's length hold padding; decoding overwrites them.
    """
    window = check_window(window)
    b, prompt_len = k.shape[:2]
    if not is_int(length):
        length = jnp.clip(check_lengths(length, b, prompt_len), 0, prompt_len)
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (b,))
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, P, D]
    if window is None or window > max_len:
        pad = ((0, 0), (0, 0), (0, max_len - prompt_len), (0, 0))
        return DenseCache(jnp.pad(kt, pad), jnp.pad(vt, pad), length, scale)
    if not prompt_len:  # nothing to place (a gather from no positions would read fill values)
        ring = [jnp.zeros((b, x.shape[1], window, x.shape[3]), x.dtype) for x in (kt, vt)]
    else:
        positions = _ring_positions(length, window, prompt_len)[:, None, :, None]
        ring = [jnp.take_along_axis(x, positions, axis=2) for x in (kt, vt)]
    return DenseCache(*ring, length, scale, window)


def _ring_positions(length: jax.Array, window: int, prompt_len: int) -> jax.Array:
    """[B, window] the prompt position each ring slot s holds after `length` [B] tokens: the
    last p < length with p % window == s (0 where none: such slots are never read)."""
    s = jnp.arange(window, dtype=jnp.int32)
    last = s + window * ((length[:, None] - 1 - s) // window)
    return jnp.clip(last, 0, prompt_len - 1)


def check_token(q, k, v, batch: int, kv_heads: int, head_dim: int) -> None:
    """Validates one decoding step's q [B, Hq, D], k/v [B, Hkv, D] against the cache's B, Hkv, D:
    a mismatched row or head count would broadcast (one token written to every row or head)
    or fail deep inside a reshape."""
    want = f"cache of B={batch} rows, Hkv={kv_heads} KV heads, head_dim D={head_dim}"
    got = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"decode step: {name} must be floating point, got dtype {x.dtype}")
    if k.shape != (batch, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"decode step: k and v must be [B, Hkv, D] of the {want}; got {got}")
    q_ok = q.ndim == 3 and (q.shape[0], q.shape[2]) == (batch, head_dim) and q.shape[1] >= 1
    if not q_ok or q.shape[1] % kv_heads:
        raise ValueError(
            f"decode step: q must be [B, Hq, D] with Hq a multiple of Hkv, for the {want}; "
            f"got {got}"
        )


def attend_entries(q: jax.Array, parts, scale: float, full: jax.Array) -> jax.Array:
    """One softmax over several entry lists: q [B, Hq, D] -> [B, Hq, D] in q's dtype.

    parts: (k [B, H, N, D], v [B, H, N, D], valid [B, N], bias [B, H, N] f32 or None) each.
    Rows where `full` [B] (their cache already holds max_len tokens: no room) get NaN; the host
    checks catch this before running (`dga_jax.ops.dga.capacity.check_fits`).
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
    out = out.reshape(b, hq, d)
    return jnp.where(full[:, None, None], jnp.nan, out).astype(q.dtype)


def write_slot(buffer: jax.Array, slot: jax.Array, x: jax.Array) -> jax.Array:
    """buffer [B, H, N, D] with x [B, H, D] written at slot[b] of each row (dropped if >= N)."""
    rows = jnp.arange(buffer.shape[0])
    return buffer.at[rows, :, slot].set(x.astype(buffer.dtype), mode="drop")

"""Decoding StreamingLLM and LM-Infinite with their bounded cache (`dga_jax.ops.sinks`).

Per layer, a `SinkCache` holds the first `sinks` tokens' far keys (`k_far`) and values, and a
ring of the last `window` tokens' keys (rotated at their positions) and values: slot i holds the
latest token whose position is i mod window. Its size never grows with the sequence; every step
attends over the first tokens, the ring and the new token itself, in one softmax, with the
visibility rules of `sink_attention`, so decoding equals the prefill at every position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dga_jax.ops.checks import check_lengths
from dga_jax.ops.dense_decode import check_token
from dga_jax.ops.sinks import SinkConfig, band_first_token


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SinkCache:
    """One layer's bounded cache (module docstring)."""

    sink_k: jax.Array  # [B, H, S, D] far keys of tokens 0..S-1 (slots past `length`: zeros)
    sink_v: jax.Array  # [B, H, S, D]
    ring_k: jax.Array  # [B, H, W, D] keys rotated at their positions; slot = position % W
    ring_v: jax.Array  # [B, H, W, D]
    length: jax.Array  # [B] int32: tokens seen, i.e. the position of the next token
    config: SinkConfig = dataclasses.field(metadata=dict(static=True))
    scale: float = dataclasses.field(metadata=dict(static=True))

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, q_far: jax.Array, k_far: jax.Array
    ) -> tuple[jax.Array, SinkUpdate]:
        """The new token's output over the cache and itself, and what it writes; reads only.

        q, q_far [B, Hq, D] (rotated at t = length and at `config.far_positions(t)`); k, k_far,
        v [B, Hkv, D] of the new token -> (output [B, Hq, D] in q's dtype, the update).
        """
        check_token(q, k, v, *self.ring_k.shape[:2], self.ring_k.shape[3])
        for name, far, near in (("q_far", q_far, q), ("k_far", k_far, k)):
            if far.shape != near.shape:
                raise ValueError(
                    f"decode step: {name} must have the shape of {name[0]} {tuple(near.shape)}, "
                    f"got {tuple(far.shape)}"
                )
        config, t = self.config, self.length  # [B]
        b, hq, d = q.shape
        hkv = k.shape[1]
        band_first = band_first_token(config)
        sink_pos = jnp.arange(config.sinks)[None, :]
        sink_ok = (sink_pos < t[:, None]) & (sink_pos + config.sink_delay <= t[:, None])
        ring_pos = _ring_positions(t - 1, config.window)
        ring_ok = (ring_pos >= band_first) & (t[:, None] - ring_pos < config.window)
        self_far = t < band_first  # the token is itself a sink, seen through q_far
        group = _grouped(q, hkv)
        group_far = _grouped(q_far, hkv)
        scores = jnp.concatenate(
            [
                _scores(group_far, self.sink_k, sink_ok),
                _scores(group, self.ring_k, ring_ok),
                jnp.where(
                    self_far[:, None, None, None],
                    _scores(group_far, k_far[:, :, None], None),
                    _scores(group, k[:, :, None], None),
                ),
            ],
            axis=-1,
        )  # [B, Hkv, G, S + W + 1]
        p = jax.nn.softmax(scores * self.scale, axis=-1)
        values = jnp.concatenate([self.sink_v, self.ring_v, v[:, :, None]], axis=2)
        out = jnp.einsum("bkgn,bknd->bkgd", p, values.astype(jnp.float32))
        return out.reshape(b, hq, d).astype(q.dtype), SinkUpdate(k, k_far, v)

    def apply(self, update: SinkUpdate) -> SinkCache:
        """Writes one step's `update`: the ring slot of its position, and its sink slot while it
        is one of the first tokens."""
        t = self.length
        slot = jnp.mod(t, self.config.window)
        ring_k = _write(self.ring_k, slot, update.k, jnp.ones_like(t, bool))
        ring_v = _write(self.ring_v, slot, update.v, jnp.ones_like(t, bool))
        is_sink = t < self.config.sinks
        sink_slot = jnp.minimum(t, self.config.sinks - 1)
        sink_k = _write(self.sink_k, sink_slot, update.k_far, is_sink)
        sink_v = _write(self.sink_v, sink_slot, update.v, is_sink)
        return dataclasses.replace(
            self, sink_k=sink_k, sink_v=sink_v, ring_k=ring_k, ring_v=ring_v, length=t + 1
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SinkUpdate:
    """What one step writes into a `SinkCache`: the new token."""

    k: jax.Array  # [B, H, D] rotated at its position
    k_far: jax.Array  # [B, H, D]
    v: jax.Array  # [B, H, D]


def sink_prefill(
    k: jax.Array,
    k_far: jax.Array,
    v: jax.Array,
    config: SinkConfig,
    scale: float,
    lengths: jax.Array | None = None,
) -> SinkCache:
    """The cache after a prompt: k, k_far, v [B, P, Hkv, D] (as `sink_attention` takes them),
    each row valid up to lengths[b] (None: all P; integers [B] in [1, P], checked where
    concrete, clipped where traced)."""
    if k.ndim != 4 or not k.shape == k_far.shape == v.shape:
        raise ValueError(
            "k, k_far and v must share one shape [B, P, Hkv, D]; got "
            f"k {tuple(k.shape)}, k_far {tuple(k_far.shape)}, v {tuple(v.shape)}"
        )
    b, prompt_len = k.shape[:2]
    length = check_lengths(lengths, b, prompt_len)
    if length is None:
        length = jnp.full((b,), prompt_len, jnp.int32)
    length = jnp.clip(length, 0, prompt_len)
    kt, kft, vt = (x.transpose(0, 2, 1, 3) for x in (k, k_far, v))  # [B, H, P, D]
    sinks = jnp.arange(config.sinks)
    sink_ok = sinks[None, :] < length[:, None]  # [B, S]
    ring = _ring_positions(length - 1, config.window)  # [B, W] latest position <= length - 1
    ring_ok = ring >= 0
    return SinkCache(
        _gather(kft, sinks, sink_ok),
        _gather(vt, sinks, sink_ok),
        _gather(kt, ring, ring_ok),
        _gather(vt, ring, ring_ok),
        length,
        config,
        scale,
    )


def _ring_positions(last: jax.Array, window: int) -> jax.Array:
    """[B] positions -> [B, W]: for slot i, the latest position <= last with position % W == i
    (negative when there is none)."""
    slots = jnp.arange(window)
    return last[:, None] - jnp.mod(last[:, None] - slots[None, :], window)


def _gather(x: jax.Array, idx: jax.Array, ok: jax.Array) -> jax.Array:
    """x [B, H, P, D] at positions idx ([N] or [B, N]) where ok [B, N], zeros elsewhere."""
    idx = jnp.broadcast_to(idx, ok.shape)
    safe = jnp.clip(idx, 0, x.shape[2] - 1)
    out = jnp.take_along_axis(x, safe[:, None, :, None], axis=2)
    return jnp.where(ok[:, None, :, None], out, 0).astype(x.dtype)


def _grouped(q: jax.Array, hkv: int) -> jax.Array:
    """[B, Hq, D] -> [B, Hkv, G, D] float32: query head h reads KV head h // G."""
    b, hq, d = q.shape
    return q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)


def _scores(q: jax.Array, keys: jax.Array, visible: jax.Array | None) -> jax.Array:
    """q [B, Hkv, G, D] against keys [B, Hkv, N, D] -> [B, Hkv, G, N], -inf where not visible."""
    s = jnp.einsum("bkgd,bknd->bkgn", q, keys.astype(jnp.float32))
    if visible is None:
        return s
    return jnp.where(visible[:, None, None, :], s, -jnp.inf)


def _write(buffer: jax.Array, slot: jax.Array, x: jax.Array, where: jax.Array) -> jax.Array:
    """buffer [B, H, N, D] with x [B, H, D] at slot [B] of the rows `where` [B]."""
    rows = jnp.arange(buffer.shape[0])
    current = buffer[rows, :, slot]  # [B, H, D]
    new = jnp.where(where[:, None, None], x.astype(buffer.dtype), current)
    return buffer.at[rows, :, slot].set(new)

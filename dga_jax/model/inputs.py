"""The model's input checks: token ids inside the vocabulary, positions inside max_position,
a decoded token inside its caches.

Concrete inputs are checked on the host and named in the error; traced ones cannot be, and the
model computes NaN for out-of-vocabulary ids instead of a plausible wrong number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.model.config import ModelConfig


def checked_tokens(tokens, config: ModelConfig) -> jax.Array:
    """`check_ids`, and T within the model's positions (`ModelConfig.positions_fit`)."""
    tokens = check_ids(tokens, "tokens", 2, config.vocab_size)
    if not config.positions_fit(tokens.shape[1]):
        raise ValueError(
            f"tokens {list(tokens.shape)}: {tokens.shape[1]} positions are past the model's "
            f"max_position={config.max_position}, where RoPE would extrapolate silently: "
            "shorten the sequence or build the model with max_position raised"
        )
    return tokens


def check_ids(ids, name: str, ndim: int, vocab_size: int) -> jax.Array:
    """`ids` as an array of `ndim` integer dimensions, none of size 0; a ValueError naming
    `name` otherwise, or, where the ids are concrete (not traced), if one is outside
    [0, vocab_size)."""
    ids = jnp.asarray(ids)
    if ids.ndim != ndim or not jnp.issubdtype(ids.dtype, jnp.integer) or 0 in ids.shape:
        raise ValueError(
            f"{name} must be {ndim}-d integer ids, no dimension of size 0; got "
            f"{ids.dtype}{list(ids.shape)}"
        )
    if isinstance(ids, jax.core.Tracer) or not ids.is_fully_addressable:
        return ids
    host = np.asarray(ids)
    outside = np.argwhere((host < 0) | (host >= vocab_size))
    if len(outside):
        at = tuple(int(i) for i in outside[0])
        raise ValueError(
            f"{name}{list(at)} = {host[at]} is outside the model's vocabulary [0, {vocab_size})"
        )
    return ids


def checked_positions(positions, shape: tuple[int, int], config: ModelConfig) -> jax.Array:
    """Integer positions [B, T] or [T] (every row's) broadcast to `shape`; a ValueError naming
    them otherwise, or, where they are concrete, if one is past the model's max_position (RoPE
    would extrapolate silently, as `hidden` refuses for T)."""
    positions = jnp.asarray(positions)
    if positions.ndim > 2 or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(
            f"positions must be integers [B, T] or [T] for tokens {list(shape)}; got "
            f"{positions.dtype}{list(positions.shape)}"
        )
    concrete = not isinstance(positions, jax.core.Tracer) and positions.is_fully_addressable
    # On the host: under a trace (a layer scan's) a jnp reduction of concrete positions is traced
    last = int(np.max(np.asarray(positions))) if concrete and positions.size else -1
    if not config.positions_fit(last + 1):
        raise ValueError(
            f"positions reach {last}, past the model's "
            f"max_position={config.max_position}, where RoPE would extrapolate silently: "
            "build the model with max_position raised to extrapolate knowingly"
        )
    return jnp.broadcast_to(positions, shape)


def check_next_position(caches, config: ModelConfig) -> None:
    """Caches [num_layers, ...] whose concrete length reaches their max_len (no room: NaN
    logits) or the model's max_position (RoPE would extrapolate silently, as `checked_tokens`
    refuses for T) are an error; traced lengths are the caller's (`generate`'s
    `check_context`)."""
    length = caches.length
    if isinstance(length, jax.core.Tracer) or not length.is_fully_addressable:
        return
    lengths = np.asarray(length).reshape(-1, length.shape[-1]).max(axis=0)  # [B], any layer's
    row, position = int(np.argmax(lengths)), int(lengths.max())
    max_len = getattr(caches, "max_len", None)  # none for a SinkCache: a window, never full
    if max_len is not None and position >= max_len:
        raise ValueError(
            f"decode_step would write row {row}'s position {position} into caches that hold "
            f"max_len={max_len} tokens (NaN logits; every row waits for it): prefill with a "
            "larger max_len"
        )
    if not config.positions_fit(position + 1):
        raise ValueError(
            f"decode_step would write position {position}, past the model's "
            f"max_position={config.max_position}, where RoPE would extrapolate "
            "silently: build the model with max_position raised to extrapolate knowingly"
        )

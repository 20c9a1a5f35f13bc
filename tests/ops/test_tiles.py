"""The tile engine's online softmax against a direct softmax over the same entries.

`online_step` takes a whole tile's running max over the unscaled, unbiased products and a
masked tile's over its visible biased logits; the result must not depend on that choice, even
with logits far from zero and the bias (DGA's log m) moving which entry is largest.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dga_jax.ops.tiles import XLA_DOTS, Tile, online_finish, online_init, online_step

R, N, D = 6, 8, 4


def _tiles(spread: float):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (R, D)) * spread
    k = jax.random.normal(keys[1], (2 * N, D)) * spread
    v = jax.random.normal(keys[2], (2 * N, D))
    bias = jnp.where(jnp.arange(2 * N) % 3 == 0, math.log(16.0), 0.0)[None, :]
    start = jnp.arange(2 * N, dtype=jnp.int32)[None, :]  # entry e visible from position e
    t = jnp.arange(R, dtype=jnp.int32)[:, None] + N  # sees the first tile whole, part of the second
    return q, k, v, bias, start, t


def _direct(q, k, v, bias, start, t, scale):
    logits = q @ k.T * scale + bias
    logits = jnp.where(start <= t, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1) @ v, jax.nn.logsumexp(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("spread", [1.0, 6.0], ids=["logits~1", "logits~100"])
@pytest.mark.parametrize("order", ["whole-first", "masked-first"])
def test_online_steps_equal_one_softmax(spread, order):
    q, k, v, bias, start, t = _tiles(spread)
    scale = 1 / math.sqrt(D)
    whole = Tile(k[:N], v[:N], None, None, bias[:, :N])  # every query sees it: no mask
    masked = Tile(k[N:], v[N:], start[:, N:], None, bias[:, N:])
    tiles = [whole, masked] if order == "whole-first" else [masked, whole]
    state = online_init(q.shape)
    for tile in tiles:
        state = online_step(XLA_DOTS, scale, state, q, t, tile)
    out, lse = online_finish(state)
    want, want_lse = _direct(q, k, v, bias, start, t, scale)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(q @ k.T * scale))) > (90 if spread > 1 else 0)


def test_a_row_that_sees_nothing_finishes_empty():
    q, k, v, bias, start, _ = _tiles(1.0)
    t = jnp.full((R, 1), -1, jnp.int32)  # before every entry
    state = online_step(XLA_DOTS, 0.5, online_init(q.shape), q, t, Tile(k, v, start, None, bias))
    out, lse = online_finish(state)
    np.testing.assert_array_equal(out, 0.0)
    assert bool(jnp.all(jnp.isposinf(lse)))

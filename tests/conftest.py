"""Shared test helpers: random inputs and the project's fixed tolerances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

# Fixed per dtype; never loosened to make a test pass.
FORWARD_TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=1e-2, rtol=1e-2)}
# Gradients see two more roundings (the p/ds casts and the output), hence 2x.
# The TPU interpreter with its checks on: data races between grid steps, out-of-bounds reads.
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise")
GRAD_TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def random_qkv(seed: int, b: int, seq_len: int, hq: int, hkv: int, d: int, dtype=jnp.float32):
    """q [B, L, Hq, D], k, v [B, L, Hkv, D] standard normal."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(kq, (b, seq_len, hq, d), dtype),
        jax.random.normal(kk, (b, seq_len, hkv, d), dtype),
        jax.random.normal(kv, (b, seq_len, hkv, d), dtype),
    )


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), **tol
    )

"""The shared input checks of every attention entry point (`dga_jax.ops.checks`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax.ops.checks import check_qkv


def qkv(length=8):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return [jax.random.normal(key, (1, length, 2, 8)) for key in keys]


def test_a_list_is_named_not_an_attribute_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must be an array \[B, L, H, D\], got list"):
        check_qkv(q, np.asarray(k).tolist(), v, None)


def test_a_concrete_zero_d_array_scale_is_its_number():
    # A scale held as a 0-d array (from a config array) was refused as "not a positive number".
    q, k, v = qkv()
    assert check_qkv(q, k, v, jnp.asarray(0.25)) == 0.25
    assert check_qkv(q, k, v, np.float32(0.5)) == 0.5
    expected = dga_jax.dga_attention(q, k, v, group_size=2, focal_ratio=0.25, scale=0.25)
    got = dga_jax.dga_attention(q, k, v, group_size=2, focal_ratio=0.25, scale=jnp.asarray(0.25))
    np.testing.assert_array_equal(got, expected)


def test_a_bad_or_traced_array_scale_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"scale must be a positive finite number"):
        check_qkv(q, k, v, jnp.asarray(-1.0))
    with pytest.raises(ValueError, match=r"scale must be a positive finite number"):
        check_qkv(q, k, v, jnp.asarray([0.5]))
    with pytest.raises(ValueError, match=r"scale must be a concrete number .* tracer"):
        jax.jit(lambda s: check_qkv(q, k, v, s))(0.5)

"""`per_shard`: attention under a mesh equals attention on one device, values and gradients.

Runs in a subprocess with 8 fake CPU devices (the flag must be set before JAX starts).
"""

from __future__ import annotations

import textwrap

import jax
import pytest

from dga_jax.ops.dga.sharded import per_shard
from tests.conftest import random_qkv, run_on_fake_devices

SCRIPT = textwrap.dedent(
    """
    import functools

    import jax
    import jax.numpy as jnp

    import dga_jax
    from dga_jax import BlockSizes
    from dga_jax.ops.dga.sharded import per_shard
    from dga_jax.sharding import make_mesh
    from tests.conftest import FORWARD_TOL, GRAD_TOL, assert_close, random_qkv

    assert jax.device_count() == 8
    q, k, v = random_qkv(0, 4, 40, 4, 2, 16)
    ct = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    gpu = dict(implementation="pallas_gpu", interpret=True, block_sizes=BlockSizes(16, 16))
    for kwargs in (dict(implementation="xla"), gpu):
        attention = functools.partial(dga_jax.dga_attention, group_size=4, **kwargs)

        def sharded(q, k, v):
            return per_shard(attention, q, k, v, batch=("data", "fsdp"), heads="tensor")

        def grads(fn):
            return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2))

        # batch over data x fsdp = 2, heads over tensor = 2; the seq axis (2) is gathered.
        with jax.set_mesh(make_mesh((2, 1, 2, 2))):
            out = jax.jit(sharded)(q, k, v)
            got = jax.jit(grads(sharded))(q, k, v)
        assert_close(out, attention(q, k, v), FORWARD_TOL[jnp.float32])
        for a, b in zip(got, grads(attention)(q, k, v), strict=True):
            assert_close(a, b, GRAD_TOL[jnp.float32])
    print("ok")
    """
)


def test_sharded_equals_single_device():
    run_on_fake_devices(SCRIPT)


def test_without_a_mesh_it_is_a_plain_call():
    q, k, v = random_qkv(1, 1, 8, 2, 1, 4)
    calls = []

    def attention(q, k, v):
        calls.append(q.shape)
        return q

    assert per_shard(attention, q, k, v, batch="data", heads="tensor") is q
    assert calls == [q.shape]


def test_heads_that_do_not_divide_the_mesh_raise():
    q, k, v = random_qkv(1, 2, 8, 2, 1, 4)  # one KV head cannot split over 2 devices
    abstract = jax.sharding.AbstractMesh((2,), ("tensor",))
    with jax.sharding.use_abstract_mesh(abstract), pytest.raises(ValueError, match="KV heads"):
        per_shard(_identity, q, k, v, batch=None, heads="tensor")


def _identity(q, k, v):
    return q


def test_unknown_mesh_axes_raise():
    q, k, v = random_qkv(1, 2, 8, 2, 1, 4)
    abstract = jax.sharding.AbstractMesh((2,), ("tensor",))
    with jax.sharding.use_abstract_mesh(abstract), pytest.raises(ValueError, match="'data'"):
        per_shard(_identity, q, k, v, batch="data", heads="tensor")

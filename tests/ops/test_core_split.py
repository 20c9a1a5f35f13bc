"""DGA under a `ContextSplit` at the edges of the layout (fake CPU devices, one subprocess)."""

from __future__ import annotations

import textwrap

from tests.conftest import run_on_fake_devices

EMPTY_PREFIX = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    import dga_jax
    from dga_jax import DGAConfig
    from dga_jax.ops.context import ContextSplit
    from tests.conftest import FORWARD_TOL, GRAD_TOL, assert_close, random_qkv

    def value_and_grads(attention, q, k, v):
        ct = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
        def loss(q, k, v):
            out = attention(q, k, v)
            return jnp.sum(out * ct), out
        grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        (_, out), grads = jax.jit(grad)(q, k, v)
        return (out, *grads)

    # No focal token and no complete group (L < m, or L < m' when streaming): the compressed
    # prefix is empty; its gradient through the split's scatter used to fail to trace.
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    for config, seq_len in ((DGAConfig(16, 0.0), 8), (DGAConfig(5, 0.0, "streaming"), 4)):
        q, k, v = random_qkv(0, 2, seq_len, 4, 2, 8)
        def whole(q, k, v):
            return dga_jax.dga_attention(q, k, v, config)
        def part(q, k, v):
            return dga_jax.dga_attention(q, k, v, config, split=ContextSplit("seq", 2))
        split = jax.shard_map(
            part, mesh=mesh, in_specs=(P(None, "seq"),) * 3, out_specs=P(None, "seq"),
            check_vma=False,
        )
        got, want = value_and_grads(split, q, k, v), value_and_grads(whole, q, k, v)
        assert_close(got[0], want[0], FORWARD_TOL[jnp.float32])
        for a, b in zip(got[1:], want[1:], strict=True):
            assert_close(a, b, GRAD_TOL[jnp.float32])
    print("ok")
    """
)


def test_split_gradients_with_an_empty_prefix():
    run_on_fake_devices(EMPTY_PREFIX, devices=2)

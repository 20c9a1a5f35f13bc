"""The public ops under a user's JAX transformations: vmap, checkpoint, second derivatives, and
hyper-parameters that arrive as arrays or tracers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax import DGAConfig
from dga_jax.ops.dga.reference import dga_attention_reference
from tests.conftest import FORWARD_TOL, GRAD_TOL, assert_close, random_qkv

CONFIG = DGAConfig(4, 0.1)
attention = functools.partial(dga_jax.dga_attention, config=CONFIG, implementation="xla")


def test_vmap_over_a_leading_axis_equals_a_loop():
    q, k, v = (jnp.stack([x, 0.5 * x]) for x in random_qkv(0, 2, 23, 4, 2, 8))
    out = jax.vmap(attention)(q, k, v)  # [2, B, L, Hq, D]
    for i in range(2):
        assert_close(out[i], attention(q[i], k[i], v[i]), FORWARD_TOL[jnp.float32])


def test_checkpoint_policies_keep_the_gradients():
    q, k, v = random_qkv(1, 1, 23, 4, 2, 8)

    def loss(q, k, v):
        return attention(q, k, v).sum()

    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for policy in (None, jax.checkpoint_policies.dots_with_no_batch_dims_saveable):
        got = jax.jit(jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1, 2)))(q, k, v)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, GRAD_TOL[jnp.float32])


def test_hessian_vector_products_match_the_reference():
    # Forward over reverse differentiates the custom VJP's backward: as documented, it works.
    q, k, v = random_qkv(2, 1, 17, 2, 1, 8)
    tangent = jax.random.normal(jax.random.key(3), q.shape)

    def hvp(op):
        grad = jax.grad(lambda q: (op(q, k, v) ** 2).sum())
        return jax.jvp(grad, (q,), (tangent,))[1]

    reference = functools.partial(dga_attention_reference, config=CONFIG, scale=8**-0.5)
    assert_close(hvp(attention), hvp(reference), GRAD_TOL[jnp.float32])


def test_forward_mode_and_reverse_over_reverse_are_refused():
    # What the docstring says is unsupported fails with an error, not a silent wrong value.
    q, k, v = random_qkv(4, 1, 23, 4, 2, 8)
    with pytest.raises(TypeError, match="forward-mode autodiff .* custom_vjp"):
        jax.jvp(lambda q: attention(q, k, v), (q,), (q,))
    grad = jax.grad(lambda q: attention(q, k, v).sum())
    with pytest.raises(ValueError, match="Reverse-mode differentiation"):
        jax.grad(lambda q: grad(q).sum())(q)


def test_zero_dimensional_arrays_are_accepted_as_hyper_parameters():
    # As `scale` is: a config read from arrays; a float32 ratio counts as its decimal.
    config = DGAConfig(jnp.int32(16), jnp.float32(0.1))
    assert config == DGAConfig(16, 0.1)
    assert config.sizes(1000).num_focal == 100
    assert DGAConfig(np.array(4), np.array(0.5)) == DGAConfig(4, 0.5)
    with pytest.raises(ValueError, match="group_size must be an int"):
        DGAConfig(jnp.array(True))


@pytest.mark.parametrize("field", ["group_size", "focal_ratio"])
def test_traced_hyper_parameters_say_they_must_be_static(field):
    q, k, v = random_qkv(5, 1, 16, 2, 1, 8)
    value = {"group_size": 4, "focal_ratio": 0.1}[field]
    run = jax.jit(lambda x: dga_jax.dga_attention(q, k, v, **{field: x}))
    with pytest.raises(ValueError, match=f"dga.{field} must be a concrete number.*static"):
        run(value)


def test_an_absurd_scale_keeps_global_importance_finite():
    # At logits past ~1e8 importance's second pass overflowed (its products differ from the
    # first pass's by more than exp takes): inf scores, and every output NaN. Dense and the
    # reference stay finite there.
    q, k, v = random_qkv(2, 1, 40, 2, 1, 16)
    for scale in (1e10, 1e20):
        layout = dga_jax.dga_layout(q, k, CONFIG, scale)
        assert bool(jnp.isfinite(layout.score).all()), scale
        assert bool(jnp.isfinite(attention(q, k, v, scale=scale)).all()), scale

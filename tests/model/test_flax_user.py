"""The model's modules as a Flax NNX user meets them: inside their own modules, under NNX
transforms, with inputs of the wrong shape or dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dga_jax import DEFAULT_RULES, DGAConfig, DGAttention, Llama, ModelConfig, dga_attention
from dga_jax.model import DecoderLayer
from dga_jax.model.layers import MLP

TINY = ModelConfig.preset("tiny", num_layers=1)
DGA = TINY.replace(attention="dga", dga=DGAConfig(4, 0.25))


def inputs(b=2, t=7, d=TINY.d_model, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(0), (b, t, d), dtype)


class Block(nnx.Module):  # a user's module around the attention
    def __init__(self, rngs: nnx.Rngs):
        self.attn = DGAttention(DGA, rngs=rngs)
        self.out = nnx.Linear(TINY.d_model, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.attn(x, jnp.arange(x.shape[1])))


def test_a_users_module_under_nnx_jit_and_grad_is_the_reference_at_odd_lengths():
    """T = 7 (no whole number of groups of 4): the XLA path and its gradients are the
    reference's, through `nnx.jit` and `nnx.value_and_grad`."""
    block, x = Block(nnx.Rngs(0)), inputs()

    def loss(block: Block) -> jax.Array:
        return jnp.mean(jnp.sin(block(x)))

    def reference_loss(block: Block) -> jax.Array:
        attn = block.attn
        q, k, v = attn._qkv(x, jnp.broadcast_to(jnp.arange(7), (2, 7)))
        out = attn._project(dga_attention(q, k, v, DGA.dga, implementation="reference"))
        return jnp.mean(jnp.sin(block.out(out)))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(block)
    expected, expected_grads = nnx.value_and_grad(reference_loss)(block)
    np.testing.assert_allclose(value, expected, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "x, positions, match",
    [
        (
            inputs()[0],
            np.arange(7),
            r"x must be floats \[B, T, d_model=128\]; got float32\[7, 128\]",
        ),
        (inputs()[None], np.arange(7), r"got float32\[1, 2, 7, 128\]"),
        (inputs(d=64), np.arange(7), r"d_model=128\]; got float32\[2, 7, 64\]"),
        (inputs().astype(jnp.int32), np.arange(7), r"x must be floats.*got int32\[2, 7, 128\]"),
        (inputs(), np.arange(7.0), r"positions must be integers.*got float32\[7\]"),
        (inputs(), np.arange(7) + TINY.max_position, "past the model's max_position=32768"),
    ],
)
def test_attention_inputs_of_a_wrong_shape_or_dtype_are_named(x, positions, match):
    """A broadcast error about positions in RoPE (x of rank 2 or 4), a dot_general one deep in a
    projection (another d_model), or nothing at all (int x, float positions, positions past
    max_position, which `Llama` refuses) before."""
    with pytest.raises(ValueError, match=match):
        DGAttention(DGA, rngs=nnx.Rngs(0))(x, positions)


def test_attention_decode_takes_one_token_for_each_cache_row():
    """x [B, 3, D] decoded its first token only, silently; a batch unlike the cache's failed
    in a broadcast inside RoPE."""
    attn = DGAttention(TINY, rngs=nnx.Rngs(0))
    x = inputs(t=9)
    _, cache = attn.prefill(x[:, :6], max_len=9)
    for bad in (x[:, 6:9], jnp.concatenate([x, x[:1]])[:, 6:7], x[:, 6]):
        with pytest.raises(ValueError, match=r"x .*\[B, 1, D\]|x must be floats"):
            attn.decode(bad, cache)
    out, _ = attn.decode(x[:, 6:7], cache)
    np.testing.assert_allclose(out[:, 0], attn(x[:, :7], np.arange(7))[:, 6], atol=1e-5)


def test_modules_compute_in_the_config_dtype_whatever_the_inputs():
    """Flax's `dtype` convention: with dtype bfloat16, a float32 input promoted the bfloat16
    weights and the attention and MLP ran in float32 (a float32 output), silently."""
    config = DGA.replace(dtype="bfloat16")
    attn, mlp = DGAttention(config, rngs=nnx.Rngs(0)), MLP(config, DEFAULT_RULES, rngs=nnx.Rngs(0))
    x = inputs()
    for module, call in ((attn, lambda m, y: m(y, np.arange(7))), (mlp, lambda m, y: m(y))):
        out = call(module, x)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(out, call(module, x.astype(jnp.bfloat16)))


def test_decoder_layer_builds_with_the_default_rules():
    """DGAttention and Llama take DEFAULT_RULES unless told; DecoderLayer required them."""
    x = inputs()
    ours = DecoderLayer(DGA, rngs=nnx.Rngs(0))(x, np.arange(7))
    np.testing.assert_array_equal(
        ours, DecoderLayer(DGA, DEFAULT_RULES, rngs=nnx.Rngs(0))(x, np.arange(7))
    )


@pytest.mark.parametrize("config", [DGA, TINY], ids=["dga", "dense"])
def test_decode_step_into_full_caches_is_named(config):
    """A concrete cache at its max_len gave NaN logits with no word of why."""
    model = Llama(config, rngs=nnx.Rngs(0))
    _, caches = model.prefill(jnp.ones((2, 6), jnp.int32), max_len=7)
    logits, caches = model.decode_step(jnp.array([1, 2]), caches)
    assert bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(
        ValueError, match="write row 0's position 7 into caches that hold max_len=7"
    ):
        model.decode_step(jnp.array([1, 2]), caches)

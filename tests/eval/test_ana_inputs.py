"""The analyses' index and token arguments: out of range or malformed is an error naming the
problem, never another layer's, head's or row's numbers, a NaN or a silent 0."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from dga_jax import DGAConfig, Llama, ModelConfig
from dga_jax.eval import analysis, dga_analysis, layerwise
from tests.conftest import random_qkv

TINY = ModelConfig.preset("tiny", num_layers=2, dga=DGAConfig(4, 0.25))


@pytest.fixture(scope="module")
def dense():
    return Llama(TINY, rngs=nnx.Rngs(0))


def test_layer_indices_outside_the_model_are_errors(dense):
    last = layerwise.decoder_layer(dense, 1)
    np.testing.assert_array_equal(layerwise.decoder_layer(dense, -1).attn.q[...], last.attn.q[...])
    for index in (2, -3):  # an array index clamps these to a real layer
        with pytest.raises(ValueError, match=f"layer {index} is not one of the model's 2 layers"):
            layerwise.decoder_layer(dense, index)
    x = np.arange(16).reshape(2, 8)
    with pytest.raises(ValueError, match="layer 5 is not one of the model's 2 layers"):
        analysis.attention_weights(dense, x, layers=[5])
    first, chosen = analysis.attention_weights(dense, x, layers=[-1])
    assert first is None and chosen.shape == (2, TINY.num_heads, 8, 8)


@pytest.mark.parametrize("shape", [(8,), (0, 8), (2, 0)])
def test_token_batches_must_be_nonempty_rows(dense, shape):
    tokens = np.zeros(shape, np.int32)
    with pytest.raises(ValueError, match=r"tokens must be rows \[N >= 1, T >= 1\]"):
        analysis.noise_kl(dense, tokens, 0.1, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"tokens must be rows \[N >= 1, T >= 1\]"):
        dga_analysis.dga_mass_shares(layerwise.with_attention(dense, "dga"), tokens)
    with pytest.raises(ValueError, match=r"tokens must be rows \[N >= 1, T >= 1\]"):
        analysis.max_attention_weights(dense, tokens)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_is_an_error(dense, batch_size):
    tokens = np.zeros((2, 8), np.int32)
    with pytest.raises(ValueError, match=f"batch_size must be an int >= 1, got {batch_size}"):
        analysis.noise_kl(dense, tokens, 0.1, jax.random.PRNGKey(0), batch_size=batch_size)
    with pytest.raises(ValueError, match=f"batch_size must be an int >= 1, got {batch_size}"):
        dga_analysis.dga_mass_shares(
            layerwise.with_attention(dense, "dga"), tokens, batch_size=batch_size
        )
    with pytest.raises(ValueError, match=f"batch_size must be an int >= 1, got {batch_size}"):
        analysis.p_sparse(dense, {8: tokens}, batch_size=batch_size)


@pytest.mark.parametrize(
    "where, message",
    [
        (dict(head=2), r"head=2 is out of range: k has 2 KV heads"),  # a query head's index
        (dict(head=-3), r"head=-3 is out of range: k has 2 KV heads"),
        (dict(batch=2), r"batch=2 is out of range: k has 2 rows"),
        (dict(query=13), r"query=13 is out of range: k has 13 positions"),
    ],
)
def test_token_roles_refuse_indices_out_of_range(where, message):
    q, k, _ = random_qkv(0, 2, 13, 4, 2, 8)  # 4 query heads on 2 KV heads
    with pytest.raises(ValueError, match=message):
        dga_analysis.token_roles(q, k, DGAConfig(4, 0.25), **where)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (np.full((2, 8), TINY.vocab_size), r"token ids must lie in \[0, 512\).*e\.g\. 512"),  # NaN
        (np.full((2, 8), -1), r"token ids must lie in \[0, 512\).*e\.g\. -1"),  # wrapped around
        (np.zeros((2, 8)) + 0.5, "tokens must be integer ids, not float64"),  # deep JAX error
    ],
)
def test_token_ids_must_be_in_the_vocabulary(dense, tokens, message):
    with pytest.raises(ValueError, match=message):
        analysis.noise_kl(dense, tokens, 0.1, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=message):
        analysis.max_attention_weights(dense, tokens)
    with pytest.raises(ValueError, match=message):
        analysis.attention_weights(dense, tokens)
    with pytest.raises(ValueError, match=message):
        dga_analysis.dga_mass_shares(layerwise.with_attention(dense, "dga"), tokens)


@pytest.mark.parametrize("sigma", [-0.5, float("nan"), float("inf")])
def test_noise_scales_must_be_finite_and_not_negative(dense, sigma):
    # -0.5 gave a KL other than 0.5's (the mirrored draw), nan and inf a NaN KL.
    tokens = np.zeros((2, 8), np.int32)
    with pytest.raises(ValueError, match=f"sigma must be a finite noise scale >= 0, got {sigma}"):
        analysis.noise_kl(dense, tokens, sigma, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="sigma must be a finite noise scale"):
        analysis.compare_noise_kl(dense, tokens, [0.1, sigma], jax.random.PRNGKey(0))


def test_p_sparse_inputs_name_their_problem(dense):
    tokens = np.zeros((2, 8), np.int32)
    with pytest.raises(ValueError, match=r"one or more lengths L \(ints >= 1\).*got keys \[\]"):
        analysis.p_sparse(dense, {})  # was {}, then a StopIteration in plot_p_sparse
    with pytest.raises(ValueError, match=r"got keys \['8'\]"):  # was "[N >= 1, 8], not (2, 8)"
        analysis.p_sparse(dense, {"8": tokens})
    with pytest.raises(ValueError, match=r"max_weights must be \[layers, N, H, L\]"):
        analysis.sparsity_estimate(np.zeros((2, 3, 4)), 0.1)  # was "not enough values"

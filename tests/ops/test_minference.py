"""MInference (`dga_jax.ops.minference`): the estimated pattern and the sparse attention against
NumPy loops written after the reference implementation, per-row lengths, the model's prefill
and dense decoding, and the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dga_jax import Llama, ModelConfig
from dga_jax.errors import ConfigError
from dga_jax.ops.dense_decode import DenseCache
from dga_jax.ops.minference import (
    BLOCK,
    MInferenceConfig,
    estimate_pattern,
    minference_attention,
    vertical_slash_attention,
)
from dga_jax.ops.minference_reference import (
    minference_reference,
    reference_mask,
    reference_pattern,
)
from tests.conftest import FORWARD_TOL, assert_close, random_qkv

TOL = FORWARD_TOL[jnp.float32]
SEQ = 330  # 6 row blocks, the last one partial
CONFIGS = [
    MInferenceConfig(vertical_size=40, slash_size=160),  # diagonals past the forced 100
    MInferenceConfig(vertical_size=1, slash_size=1),  # raised to 30 and 50
    MInferenceConfig(vertical_size=SEQ, slash_size=SEQ),  # everything: dense
]
LENGTHS = (SEQ, 201)


def row_lengths(lengths):
    return None if lengths is None else jnp.asarray(lengths)


@pytest.mark.parametrize("lengths", [None, LENGTHS])
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_pattern_and_attention_equal_the_reference_loops(config, lengths):
    """Batch of 2, GQA (4 query heads on 2 KV heads), a right-padded row estimated alone."""
    q, k, v = random_qkv(0, 2, SEQ, 4, 2, 16)
    columns, offsets = estimate_pattern(q, k, config, row_lengths(lengths))
    n = LENGTHS if lengths else (SEQ, SEQ)
    for b in range(2):
        for h in range(4):
            args = (np.asarray(x[b, : n[b], h // s]) for x, s in ((q, 1), (k, 2)))
            want_columns, want_offsets = reference_pattern(*args, config)
            got_columns, got_offsets = np.asarray(columns[b, h]), np.asarray(offsets[b, h])
            np.testing.assert_array_equal(got_columns[got_columns < n[b]], want_columns)
            np.testing.assert_array_equal(got_offsets[got_offsets < n[b]], want_offsets)
    out = minference_attention(q, k, v, config, row_lengths(lengths))
    expected = minference_reference(q, k, v, config, lengths)
    for b in range(2):
        assert_close(out[b, : n[b]], expected[b, : n[b]], TOL)
    assert np.isfinite(np.asarray(out)).all()  # padding rows too


def test_the_sparse_pattern_is_the_reference_kernels_block_rounding():
    """The small budget attends to fewer keys than dense and to more than the exact lines:
    each kept diagonal brings a 64-key window per block of 64 rows."""
    config = CONFIGS[0]
    q, k, v = random_qkv(1, 1, SEQ, 1, 1, 16)
    columns, offsets = reference_pattern(np.asarray(q[0, :, 0]), np.asarray(k[0, :, 0]), config)
    mask = reference_mask(columns, offsets, SEQ)
    t, j = np.arange(SEQ)[:, None], np.arange(SEQ)[None, :]
    lines = (np.isin(j, columns) | np.isin(t - j, offsets)) & (j <= t)
    assert (mask >= lines).all() and mask.sum() > lines.sum()
    assert mask.sum() < np.tri(SEQ).sum()
    dense = minference_reference(q, k, v, MInferenceConfig(SEQ, SEQ))
    assert not np.allclose(minference_attention(q, k, v, config), dense, atol=1e-3)
    assert BLOCK == 64


def test_it_has_no_gradient():
    q, k, v = random_qkv(2, 1, 70, 2, 2, 8)
    with pytest.raises(NotImplementedError, match="training-free"):
        jax.grad(lambda q: minference_attention(q, k, v, CONFIGS[0]).sum())(q)


def test_model_prefill_is_per_row_and_decoding_is_dense():
    settings = MInferenceConfig(vertical_size=31, slash_size=120)
    config = ModelConfig.preset("tiny", attention="minference", minference=settings)
    model = Llama(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 500, size=(2, 300)))
    full = model(tokens)
    logits, caches = model.prefill(tokens, 320, lengths=jnp.asarray([300, 170]))
    assert_close(logits[0], full[0], TOL)
    alone, _ = model.prefill(tokens[1:, :170], 320)
    assert_close(logits[1, :170], alone[0], TOL)
    dense = Llama(config.replace(attention="dense"), rngs=nnx.Rngs(0))
    assert not np.allclose(full[:, -1], dense(tokens)[:, -1], atol=1e-3)
    assert isinstance(caches, DenseCache), type(caches)
    step, _ = model.decode_step(tokens[:, 0], caches)
    dense_step, _ = dense.decode_step(tokens[:, 0], caches)
    assert_close(step, dense_step, TOL)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"minference": {"vertical_size": 0}}, "minference.vertical_size must be an int >= 1"),
        ({"minference": {"slash_size": 2.5}}, "minference.slash_size"),
        ({"attention": "minference", "max_position": 4096}, "minference.slash_size=6096 exceeds"),
        (
            {"attention": "minference", "max_position": 512, "minference": {"slash_size": 100}},
            "minference.vertical_size=1000 exceeds",
        ),
    ],
)
def test_bad_settings_are_rejected_naming_the_field(values, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        ModelConfig.from_dict(values)


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        (
            jnp.array([64]),
            r"lengths must be integers of shape \(2,\), one per row; got int32 \(1,\)",
        ),
        (jnp.array([64.0, 40.9]), r"lengths must be integers of shape \(2,\).*float32"),
        (jnp.array([64, 65]), r"lengths must lie in \[1, L\] = \[1, 64\]; rows \[1\] have \[65\]"),
        (jnp.array([0, 64]), r"lengths must lie in \[1, L\] = \[1, 64\]; rows \[0\] have \[0\]"),
    ],
    ids=["one-for-two-rows", "float", "above-L", "zero"],
)
def test_bad_lengths_are_rejected(lengths, message):
    q, k, v = random_qkv(0, 2, 64, 4, 2, 8)
    config = MInferenceConfig(1, 1)
    with pytest.raises(ValueError, match=message):
        minference_attention(q, k, v, config, lengths)
    with pytest.raises(ValueError, match=message):
        estimate_pattern(q, k, config, lengths)


def test_traced_lengths_are_clipped_to_L():
    q, k, _ = random_qkv(0, 2, 64, 4, 2, 8)
    config = MInferenceConfig(1, 1)
    want = estimate_pattern(q, k, config)
    got = jax.jit(estimate_pattern, static_argnums=2)(q, k, config, jnp.array([64, 100]))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config", [None, {"vertical_size": 40}, (40, 160)], ids=repr)
def test_a_config_of_another_kind_is_rejected(config):
    q, k, v = random_qkv(0, 1, 64, 2, 1, 8)
    with pytest.raises(ValueError, match="config must be a MInferenceConfig, got"):
        minference_attention(q, k, v, config)
    with pytest.raises(ValueError, match="config must be a MInferenceConfig, got"):
        estimate_pattern(q, k, config)


def test_vertical_slash_attention_takes_the_estimated_pattern_and_rejects_others():
    """A pattern of another batch or heads, of floats, out of range or out of order would be
    read silently as other lanes' lines or other keys."""
    q, k, v = random_qkv(3, 2, 70, 4, 2, 8)
    columns, offsets = estimate_pattern(q, k, CONFIGS[0])
    want = minference_attention(q, k, v, CONFIGS[0])
    assert_close(vertical_slash_attention(q, k, v, columns, offsets), want, TOL)
    bad = {
        "other batch": ((columns[:1], offsets), r"columns must have shape \(2, 4, n >= 1\)"),
        "no heads axis": ((columns, offsets[:, 0]), r"offsets must have shape \(2, 4, n >= 1\)"),
        "floats": ((columns.astype(jnp.float32), offsets), "columns must be integers, got float32"),
        "past L": ((columns + 70, offsets), r"columns must be distinct, ascending, in \[0, L\)"),
        "ascending offsets": ((columns, offsets[..., ::-1]), "offsets must be .*, out of order"),
    }
    for pattern, message in bad.values():
        with pytest.raises(ValueError, match=message):
            vertical_slash_attention(q, k, v, *pattern)

"""The baselines' decoding caches (`dga_jax.ops.sinks_decode`, `dga_jax.ops.dense_decode`) and
DGA's prefilled from a layout built already: prompt lengths are checked as every attention entry
point checks them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dga_jax.ops.dense_decode import dense_prefill
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.decode import prefill
from dga_jax.ops.dga.layout import dga_layout
from dga_jax.ops.sinks import StreamingLLMConfig
from dga_jax.ops.sinks_decode import sink_prefill
from tests.conftest import random_qkv


def sink(k, v, lengths):
    return sink_prefill(k, k, v, StreamingLLMConfig(2, 3), 0.5, lengths)


def dense(k, v, lengths):
    return dense_prefill(k, v, 0.5, 16, lengths)


def dga_from_layout(k, v, lengths):
    """DGA's cache from a layout built for valid lengths: only `prefill` can check `lengths`."""
    config = DGAConfig(2, 0.25)
    layout = dga_layout(k, k, config, 0.5, lengths=jnp.array([8, 5]))
    return prefill(k, k, v, max_len=16, config=config, scale=0.5, lengths=lengths, layout=layout)


PREFILLS = {"sink": sink, "dense": dense, "dga_from_layout": dga_from_layout}


@pytest.mark.parametrize("prefill", PREFILLS)
@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        ([9, 8], r"lengths must lie in \[1, L\] = \[1, 8\]; rows \[0\] have \[9\]"),
        ([0, 8], r"lengths must lie in \[1, L\] = \[1, 8\]; rows \[0\] have \[0\]"),
        ([8], r"lengths must be integers of shape \(2,\), one per row; got int32 \(1,\)"),
        (jnp.array([4.0, 8.0]), r"lengths must be integers of shape \(2,\).*float32"),
    ],
    ids=["above-P", "zero", "one-for-two-rows", "float"],
)
def test_bad_prompt_lengths_are_rejected(prefill, lengths, message):
    """A length past the prompt would read its padding (or clipped keys) as the row's tokens."""
    _, k, v = random_qkv(0, 2, 8, 2, 2, 4)
    with pytest.raises(ValueError, match=message):
        PREFILLS[prefill](k, v, jnp.asarray(lengths))


@pytest.mark.parametrize("prefill", PREFILLS)
def test_traced_prompt_lengths_are_clipped_to_the_prompt(prefill):
    _, k, v = random_qkv(0, 2, 8, 2, 2, 4)
    want = PREFILLS[prefill](k, v, jnp.array([8, 5]))
    got = jax.jit(PREFILLS[prefill])(k, v, jnp.array([30, 5]))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda q, k, v: (q, k[:, :1], v[:, :1], q, k[:, :1]), "k and v must be"),
        (lambda q, k, v: (q, k, v[:, :1], q, k), "k and v must be"),
        (lambda q, k, v: (q[:1], k[:1], v[:1], q[:1], k[:1]), "k and v must be"),
        (lambda q, k, v: (q, k, v, q[:, :2], k), r"q_far must have the shape of q \(2, 4, 4\)"),
        (lambda q, k, v: (q, k, v, q, k[:, :1]), r"k_far must have the shape of k \(2, 2, 4\)"),
    ],
    ids=["one-kv-head", "v-heads", "one-row", "q_far", "k_far"],
)
def test_a_sink_step_that_does_not_fit_the_cache_is_named(token, message):
    # These failed deep in a concatenate, or (a k_far of one KV head) broadcast silently.
    q, k, v = random_qkv(0, 2, 9, 4, 2, 4)
    cache = sink(k[:, :8], v[:, :8], None)
    with pytest.raises(ValueError, match=f"decode step: {message}"):
        cache.attend(*token(q[:, 8], k[:, 8], v[:, 8]))


def test_sink_prefill_refuses_k_far_or_v_of_another_shape():
    # A k_far of one head built a cache of one-head sinks that failed at the first step.
    _, k, v = random_qkv(0, 2, 8, 2, 2, 4)
    for k_far, v_ in ((k[:, :, :1], v), (k, v[:, :, :1])):
        with pytest.raises(ValueError, match=r"k, k_far and v must share one shape"):
            sink_prefill(k, k_far, v_, StreamingLLMConfig(2, 3), 0.5)

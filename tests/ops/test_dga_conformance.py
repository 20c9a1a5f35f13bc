"""The conformance suite every DGA implementation runs (`docs/DGA_SPEC.md`, "Properties").

`IMPLEMENTATIONS` lists each implementation with the block sizes it is exercised at; small
blocks make the blockwise walks cross many block boundaries on small inputs. New backends
(Pallas kernels) join the list and inherit every test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax import BlockSizes
from tests.conftest import (
    FORWARD_TOL,
    GPU_INTERPRET,
    GRAD_TOL,
    TPU_INTERPRET,
    assert_close,
    random_qkv,
)
from tests.ops.spec_oracle import spec_attention

IMPLEMENTATIONS = {
    "xla": dict(implementation="xla"),
    "xla-blocks8x16edge4": dict(implementation="xla", block_sizes=BlockSizes(8, 16, 8, 8, 4)),
    "xla-blocks16x8band4": dict(implementation="xla", block_sizes=BlockSizes(16, 8, 4, 16)),
    # The kernels at their smallest legal tiles, in interpret mode (the Triton ones compiled on
    # a GPU); tests/ops/test_pallas.py adds longer inputs, more block sizes and the lowering.
    "pallas_gpu": dict(
        implementation="pallas_gpu",
        interpret=GPU_INTERPRET,
        block_sizes=BlockSizes(16, 16, 16, 16),
    ),
    "pallas_tpu": dict(
        implementation="pallas_tpu",
        interpret=TPU_INTERPRET,
        block_sizes=BlockSizes(16, 128, 16, 16),
    ),
}
# The reference defines the function; it joins only the tests against independent truths.
WITH_REFERENCE = {"reference": dict(implementation="reference"), **IMPLEMENTATIONS}
SELECTIONS = ("global", "streaming")


def attention(impl: str, **dga_kwargs):
    return functools.partial(dga_jax.dga_attention, **WITH_REFERENCE[impl], **dga_kwargs)


def reference(**dga_kwargs):
    """The reference evaluated in float32 on the same (possibly rounded) inputs."""

    def run(q, k, v):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return dga_jax.dga_attention(q, k, v, implementation="reference", **dga_kwargs)

    return run


def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("focal_ratio", [0.0, 0.1, 0.5, 1.0])
def test_matches_reference_gqa(impl, selection, focal_ratio):
    # L = 45 is not a multiple of m = 4 (nor of m' = 5 or 8); GQA with 2 query heads per KV head.
    q, k, v = random_qkv(0, 2, 45, 4, 2, 16)
    kwargs = dict(group_size=4, focal_ratio=focal_ratio, selection=selection)
    out = attention(impl, **kwargs)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, reference(**kwargs)(q, k, v), FORWARD_TOL[jnp.float32])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize(
    "b, seq_len, hq, hkv, group_size",
    [
        (3, 70, 2, 2, 16),  # MHA, batch 3, paper's m, L not a multiple of m or m' = 18
        (1, 5, 2, 1, 16),  # L < m: no group at all
        (1, 33, 8, 2, 3),  # 4 query heads per KV head, odd m
    ],
)
def test_matches_reference_shapes(impl, selection, b, seq_len, hq, hkv, group_size):
    q, k, v = random_qkv(1, b, seq_len, hq, hkv, 8)
    kwargs = dict(group_size=group_size, focal_ratio=0.1, selection=selection)
    assert_close(
        attention(impl, **kwargs)(q, k, v), reference(**kwargs)(q, k, v), FORWARD_TOL[jnp.float32]
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_matches_reference_bfloat16(impl, selection):
    q, k, v = random_qkv(2, 2, 61, 4, 2, 32, jnp.bfloat16)
    kwargs = dict(group_size=4, focal_ratio=0.1, selection=selection)
    out = attention(impl, **kwargs)(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert_close(out, reference(**kwargs)(q, k, v), FORWARD_TOL[jnp.bfloat16])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_importance_ties(impl, selection):
    # q = 0 makes every softmax uniform: importance is constant between sampled queries and every
    # chunk's tail scores tie, so the focal set is decided by the lower-position rule alone.
    _, k, v = random_qkv(3, 2, 50, 2, 2, 8)
    q = jnp.zeros((2, 50, 2, 8))
    kwargs = dict(group_size=4, focal_ratio=0.1, selection=selection)
    assert_close(
        attention(impl, **kwargs)(q, k, v), reference(**kwargs)(q, k, v), FORWARD_TOL[jnp.float32]
    )


def one_hot_queries():
    """Sampled queries 3 and 7 (m = 4) each attend all but exactly to one key, 2 and 6, at
    logits ~38: both keys score 1 in float32 (a tie, to the lower position), key 2 above key 6
    in exact arithmetic. Scaled products minus their max, fused by XLA into one multiply-subtract,
    scored key 2 at 1 - 1.4e-6 and picked key 6."""
    q, k = np.zeros((2, 1, 8, 1, 3), np.float32)
    k[0, 2, 0, 0], k[0, 6, 0, 1], q[0, 3, 0, 0], q[0, 7, 0, 1] = 8.37, 8.0, 8.0, 8.0
    v = jax.random.normal(jax.random.key(0), (1, 8, 1, 3))
    return jnp.asarray(q), jnp.asarray(k), v


@pytest.mark.parametrize("impl", WITH_REFERENCE)
def test_one_hot_queries_tie_as_in_exact_arithmetic(impl, optimized):
    q, k, v = one_hot_queries()
    want = spec_attention(q, k, v, 4, 0.125)  # float64: key 2 focal
    assert_close(
        attention(impl, group_size=4, focal_ratio=0.125)(q, k, v), want, FORWARD_TOL[jnp.float32]
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_one_hot_heads_score_a_streaming_chunk_as_the_reference(impl, optimized):
    # Two query heads, each near one-hot on another key of a chunk at logits ~ N(0, 25^2): the
    # chunk's tail scores tie at 1; scores from fused multiply-subtracts (optimized code) broke
    # the tie otherwise.
    q, k, v = one_hot_heads()
    kwargs = dict(group_size=4, focal_ratio=0.2, selection="streaming")
    assert_close(
        attention(impl, **kwargs)(q, k, v), reference(**kwargs)(q, k, v), FORWARD_TOL[jnp.float32]
    )


def one_hot_heads():
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (1, 30, 2, 8)) * 5.0
    k = jax.random.normal(keys[1], (1, 30, 1, 8)) * 5.0
    return q, k, jax.random.normal(keys[2], (1, 30, 1, 8))


@pytest.mark.parametrize("impl", WITH_REFERENCE)
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize(
    "dga_kwargs", [dict(focal_ratio=1.0), dict(group_size=1)], ids=["focal_ratio=1", "group_size=1"]
)
def test_degenerate_is_dense(impl, selection, dga_kwargs):
    q, k, v = random_qkv(4, 2, 37, 4, 2, 16)
    out = attention(impl, selection=selection, **dga_kwargs)(q, k, v)
    assert_close(out, dense(q, k, v), FORWARD_TOL[jnp.float32])


@pytest.mark.parametrize("impl", WITH_REFERENCE)
@pytest.mark.parametrize(
    "selection, focal_ratio, run",
    [("global", 0.0, 4), ("streaming", 0.0, 4), ("streaming", 0.1, 5)],
)
def test_identical_group_members_is_dense(impl, selection, focal_ratio, run):
    # k and v constant over runs of `run` positions: m = 4 with gamma = 0 groups exactly those runs
    # (in both rules), and streaming with gamma = 0.1 has chunks m' = 5 = run, so whatever is
    # promoted, the 4 grouped members of a chunk are identical. Group entries are then exact.
    q, k, v = random_qkv(5, 2, 42, 4, 2, 16)
    k = jnp.repeat(k[:, ::run], run, axis=1)[:, :42]
    v = jnp.repeat(v[:, ::run], run, axis=1)[:, :42]
    out = attention(impl, group_size=4, focal_ratio=focal_ratio, selection=selection)(q, k, v)
    assert_close(out, dense(q, k, v), FORWARD_TOL[jnp.float32])


def test_dga_differs_from_dense():
    # Guards the dense-equivalence tests above against an implementation that is simply dense.
    q, k, v = random_qkv(6, 1, 64, 2, 2, 16)
    out = dga_jax.dga_attention(q, k, v, group_size=4, focal_ratio=0.1)
    assert float(jnp.max(jnp.abs(out - dense(q, k, v)))) > 1e-2


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_match_reference_vjp(impl, selection, dtype):
    q, k, v = random_qkv(7, 2, 43, 4, 2, 16, dtype)
    cotangent = jax.random.normal(jax.random.PRNGKey(8), q.shape, dtype)
    kwargs = dict(group_size=4, focal_ratio=0.25, selection=selection)
    _, vjp = jax.vjp(attention(impl, **kwargs), q, k, v)
    _, vjp_ref = jax.vjp(reference(**kwargs), q, k, v)
    for name, grad, grad_ref in zip(
        "qkv", vjp(cotangent), vjp_ref(cotangent.astype(jnp.float32)), strict=True
    ):
        assert grad.dtype == dtype, name
        assert_close(grad, grad_ref, GRAD_TOL[dtype])


@pytest.mark.parametrize("impl", WITH_REFERENCE)
def test_streaming_is_strictly_causal(impl):
    q, k, v = random_qkv(9, 2, 57, 4, 2, 16)
    t = 30
    fn = attention(impl, group_size=4, focal_ratio=0.2, selection="streaming")
    noise = random_qkv(10, 2, 57, 4, 2, 16)
    later = jnp.arange(57)[None, :, None, None] > t
    perturbed = [jnp.where(later, x + n, x) for x, n in zip((q, k, v), noise, strict=True)]
    out, out_perturbed = fn(q, k, v), fn(*perturbed)
    # Equal up to summation order: a later query re-deciding a chunk may move a visible token
    # between the focal list and the raw band, which changes nothing but the order of the sums.
    assert_close(out_perturbed[:, : t + 1], out[:, : t + 1], FORWARD_TOL[jnp.float32])
    changed = jnp.abs(out[:, t + 1 :] - out_perturbed[:, t + 1 :]).max(axis=(0, 2, 3))
    assert float(changed.min()) > 1e-3


def test_global_selection_looks_ahead():
    # The documented difference: the paper's rule picks focal tokens with later queries.
    q, k, v = random_qkv(11, 1, 64, 2, 2, 16)
    t = 20
    k2 = k.at[:, t + 1 :].multiply(5.0)
    fn = functools.partial(dga_jax.dga_attention, group_size=4, focal_ratio=0.1)
    assert float(jnp.max(jnp.abs(fn(q, k, v)[:, : t + 1] - fn(q, k2, v)[:, : t + 1]))) > 1e-3


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_jit_does_not_recompile(impl):
    traces = []

    @jax.jit
    def step(q, k, v):
        traces.append(None)
        return attention(impl, group_size=4)(q, k, v)

    first = step(*random_qkv(12, 1, 40, 2, 1, 8))
    second = step(*random_qkv(13, 1, 40, 2, 1, 8))
    assert len(traces) == 1
    assert first.shape == second.shape and not np.allclose(first, second)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_padded_rows_equal_their_prefixes_alone(impl, selection):
    # m = 4, gamma = 0.2 (r' = 1, m' = 5): lengths below m, multiples of neither m nor m'.
    lengths = [45, 2, 7, 34]
    q, k, v = random_qkv(14, len(lengths), 45, 4, 2, 16)
    kwargs = dict(group_size=4, focal_ratio=0.2, selection=selection)
    out = attention(impl, **kwargs)(q, k, v, lengths=jnp.asarray(lengths))
    assert bool(jnp.all(jnp.isfinite(out)))  # padding outputs too: they feed the next layer
    for b, n in enumerate(lengths):
        alone = reference(**kwargs)(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n])
        assert_close(out[b, :n], alone[0], FORWARD_TOL[jnp.float32])


def test_lengths_are_checked():
    q, k, v = random_qkv(15, 2, 16, 2, 1, 8)
    with pytest.raises(ValueError, match=r"lengths must be integers of shape \(2,\)"):
        dga_jax.dga_attention(q, k, v, lengths=jnp.array([3, 4, 5]))
    with pytest.raises(ValueError, match="lengths must be integers"):
        dga_jax.dga_attention(q, k, v, lengths=jnp.array([3.0, 4.0]))
    with pytest.raises(ValueError, match="not supported with implementation='reference'"):
        dga_jax.dga_attention(q, k, v, lengths=jnp.array([3, 4]), implementation="reference")

"""Dense causal attention: the blockwise path against `jax.nn.dot_product_attention` ("xla").

"xla" is the independent truth here: the blockwise path (the same interval attention DGA's XLA
implementation runs) must reproduce it in the forward and backward pass, at any block size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax import BlockSizes
from tests.conftest import FORWARD_TOL, GRAD_TOL, assert_close, random_qkv

BLOCK_SIZES = {
    "default": None,
    "blocks8x8": BlockSizes(8, 8),
    "blocks16x8": BlockSizes(16, 8),
    "blocks8x16": BlockSizes(8, 16, block_edge=4),
}
GQA = (2, 45, 4, 2, 16)  # 2 query heads per KV head; L not a multiple of 8 or 16
MHA = (3, 37, 2, 2, 8)  # batch 3
# (shape, block sizes): every block size on GQA, the other shapes at the smallest blocks too.
FORWARD_CASES = {
    **{f"gqa-L45-{blocks}": (GQA, blocks) for blocks in BLOCK_SIZES},
    "mha-B3-L37-blocks8x8": (MHA, "blocks8x8"),
    "gqa4-L70-blocks16x8": ((2, 70, 8, 2, 32), "blocks16x8"),  # 4 query heads per KV head
    "L5-blocks8x16": ((2, 5, 2, 1, 8), "blocks8x16"),  # L shorter than any block
    "L1-default": ((1, 1, 2, 2, 8), "default"),  # a single position
}
GQA_EVERY_BLOCK_SIZE_AND_MHA = [("gqa", blocks) for blocks in BLOCK_SIZES] + [("mha", "blocks8x8")]
# bfloat16 at the small blocks (many block boundaries, so many roundings of p and ds).
BFLOAT16_CASES = [("gqa", "blocks8x16"), ("mha", "blocks16x8")]
HEADS = {"gqa": (4, 2), "mha": (2, 2)}


def blockwise(block_sizes=None, **kwargs):
    return functools.partial(
        dga_jax.dense_attention, implementation="blockwise", block_sizes=block_sizes, **kwargs
    )


def xla_f32(**kwargs):
    """The "xla" implementation in float32, on the same (possibly rounded) inputs."""

    def run(q, k, v):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return dga_jax.dense_attention(q, k, v, implementation="xla", **kwargs)

    return run


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_blockwise_matches_xla(case):
    (b, seq_len, hq, hkv, d), blocks = FORWARD_CASES[case]
    q, k, v = random_qkv(0, b, seq_len, hq, hkv, d)
    out = blockwise(BLOCK_SIZES[blocks])(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, xla_f32()(q, k, v), FORWARD_TOL[jnp.float32])


@pytest.mark.parametrize("heads, blocks", [("gqa", "default"), *BFLOAT16_CASES])
def test_blockwise_matches_xla_bfloat16(heads, blocks):
    q, k, v = random_qkv(1, 2, 61, *HEADS[heads], 32, jnp.bfloat16)
    out = blockwise(BLOCK_SIZES[blocks])(q, k, v)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    assert_close(out, xla_f32()(q, k, v), FORWARD_TOL[jnp.bfloat16])


@pytest.mark.parametrize(
    "heads, blocks, dtype",
    [(*case, jnp.float32) for case in GQA_EVERY_BLOCK_SIZE_AND_MHA]
    + [(*case, jnp.bfloat16) for case in BFLOAT16_CASES],
)
def test_blockwise_gradients_match_xla_vjp(heads, blocks, dtype):
    q, k, v = random_qkv(2, 2, 43, *HEADS[heads], 16, dtype)
    cotangent = jax.random.normal(jax.random.PRNGKey(3), q.shape, dtype)
    _, vjp = jax.vjp(blockwise(BLOCK_SIZES[blocks]), q, k, v)
    _, vjp_ref = jax.vjp(xla_f32(), q, k, v)
    grads, grads_ref = vjp(cotangent), vjp_ref(cotangent.astype(jnp.float32))
    for name, x, grad, grad_ref in zip("qkv", (q, k, v), grads, grads_ref, strict=True):
        assert grad.shape == x.shape and grad.dtype == dtype, name
        assert_close(grad, grad_ref, GRAD_TOL[dtype])


@pytest.mark.parametrize("blocks", ["default", "blocks8x8"])
def test_blockwise_is_causal(blocks):
    q, k, v = random_qkv(4, 2, 57, 4, 2, 16)
    t = 30
    fn = blockwise(BLOCK_SIZES[blocks])
    noise = random_qkv(5, 2, 57, 4, 2, 16)
    later = jnp.arange(57)[None, :, None, None] > t
    perturbed = [jnp.where(later, x + n, x) for x, n in zip((q, k, v), noise, strict=True)]
    out, out_perturbed = fn(q, k, v), fn(*perturbed)
    assert_close(out_perturbed[:, : t + 1], out[:, : t + 1], FORWARD_TOL[jnp.float32])
    # Every later position moves: the perturbation reached the outputs that may see it.
    changed = jnp.abs(out[:, t + 1 :] - out_perturbed[:, t + 1 :]).max(axis=(0, 2, 3))
    assert float(changed.min()) > 1e-3


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_custom_scale(implementation):
    q, k, v = random_qkv(6, 2, 40, 4, 2, 16)
    scale = 0.7
    blocks = BlockSizes(8, 8) if implementation == "blockwise" else None
    fn = functools.partial(
        dga_jax.dense_attention, implementation=implementation, block_sizes=blocks
    )
    out = fn(q, k, v, scale=scale)
    assert_close(out, xla_f32(scale=scale)(q, k, v), FORWARD_TOL[jnp.float32])
    # The default is 1/sqrt(16) = 0.25: the custom scale must not be dropped.
    assert float(jnp.max(jnp.abs(out - fn(q, k, v)))) > 1e-2
    assert_close(fn(q, k, v, scale=0.25), fn(q, k, v), FORWARD_TOL[jnp.float32])


def test_default_implementation():
    on_gpu = jax.default_backend() == "gpu"
    # On GPU the default is cudnn, which takes half precision only.
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    q, k, v = random_qkv(7, 2, 48, 4, 2, 32, dtype)
    expected = dga_jax.dense_attention(q, k, v, implementation="cudnn" if on_gpu else "xla")
    out = dga_jax.dense_attention(q, k, v)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


def test_cudnn():
    q, k, v = random_qkv(8, 2, 48, 4, 2, 32, jnp.bfloat16)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn"):
            dga_jax.dense_attention(q, k, v, implementation="cudnn")
    else:
        out = dga_jax.dense_attention(q, k, v, implementation="cudnn")
        assert out.shape == q.shape and out.dtype == jnp.bfloat16
        assert_close(out, xla_f32()(q, k, v), FORWARD_TOL[jnp.bfloat16])


def test_jit_does_not_recompile():
    traces = []

    @jax.jit
    def step(q, k, v):
        traces.append(None)
        return dga_jax.dense_attention(
            q, k, v, implementation="blockwise", block_sizes=BlockSizes(8, 8)
        )

    first = step(*random_qkv(9, 1, 40, 2, 1, 8))
    second = step(*random_qkv(10, 1, 40, 2, 1, 8))
    assert len(traces) == 1
    assert first.shape == second.shape and not np.allclose(first, second)


@pytest.mark.parametrize("implementation", [None, "xla", "blockwise"])
def test_float16_runs_everywhere(implementation):
    """float16 is a model dtype: on CPU, XLA has no float16 dot accumulating in float32, so the
    default ("xla" there) used to raise deep inside JAX."""
    q, k, v = random_qkv(11, 2, 40, 4, 2, 16, jnp.float16)
    fn = functools.partial(dga_jax.dense_attention, implementation=implementation)
    out = fn(q, k, v)
    assert out.shape == q.shape and out.dtype == jnp.float16
    # float16 keeps 3 more mantissa bits than bfloat16: bfloat16's tolerance holds.
    assert_close(out, xla_f32()(q, k, v), FORWARD_TOL[jnp.bfloat16])
    grad = jax.grad(lambda q: fn(q, k, v).astype(jnp.float32).sum())(q)
    assert grad.dtype == jnp.float16 and np.isfinite(np.asarray(grad, np.float32)).all()


@pytest.mark.parametrize("split", ["seq", ("seq", 2), None], ids=repr)
def test_a_split_that_is_not_a_context_split_is_rejected(split):
    # dga_attention's and dga_layout's were AttributeErrors (the reference's too).
    q, k, v = random_qkv(12, 1, 8, 2, 1, 8)
    ops = [
        dga_jax.dense_attention,
        dga_jax.dga_attention,
        functools.partial(dga_jax.dga_attention, implementation="reference"),
        lambda q, k, v, split: dga_jax.dga_layout(
            q, k, dga_jax.DGAConfig(4, 0.25), None, split=split
        ),
    ]
    for op in ops:
        with pytest.raises(ValueError, match="split must be a dga_jax ContextSplit, got"):
            op(q, k, v, split=split)


@pytest.mark.parametrize("implementation", ["xla", None])
def test_block_sizes_for_an_implementation_without_tiles_are_refused(implementation):
    # They were ignored: a caller tuning dense's tiles under "xla" measured nothing.
    q, k, v = random_qkv(8, 1, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="block_sizes are the tiles of implementation='blockwise'"):
        dga_jax.dense_attention(q, k, v, implementation=implementation, block_sizes=BlockSizes())

"""Dense attention with a sliding window (Mistral's `sliding_window`): every implementation
and the dense cache against a mask written from the rule alone (query t sees keys
t - window + 1 .. t)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax import BlockSizes
from dga_jax.ops.band import window_chunk
from dga_jax.ops.dga.decode import decode_step, prefill
from tests.conftest import FORWARD_TOL, GRAD_TOL, assert_close, random_qkv

F32 = jnp.float32


def window_reference(q, k, v, window):
    """Softmax attention under the window's mask, materialised, in float32."""
    seq_len, groups, d = q.shape[1], q.shape[2] // k.shape[2], q.shape[-1]
    distance = jnp.arange(seq_len)[:, None] - jnp.arange(seq_len)[None, :]
    seen = (distance >= 0) & (distance < window)
    k, v = (jnp.repeat(x.astype(F32), groups, axis=2) for x in (k, v))
    s = jnp.einsum("bthd,bjhd->bhtj", q.astype(F32), k) * d**-0.5
    p = jax.nn.softmax(jnp.where(seen, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhtj,bjhd->bthd", p, v)


# (B, L, Hq, Hkv, D), window, blockwise tiles: windows of one key, narrower and wider than a
# band sub-block, one short of the sequence and past it (plain causal attention).
CASES = {
    "gqa-L45-w1": ((2, 45, 4, 2, 16), 1, BlockSizes(16, 8)),
    "gqa-L45-w5": ((2, 45, 4, 2, 16), 5, BlockSizes(16, 8)),
    "mha-L37-w20": ((1, 37, 2, 2, 8), 20, BlockSizes(16, 16, block_band=8)),
    # windows of 40 entries per 16-query sub-block, read 8 at a time (`band.window_chunk`)
    "gqa-L45-w20-chunked": ((2, 45, 4, 2, 16), 20, BlockSizes(16, 8)),
    "gqa-L45-w44-default-tiles": ((2, 45, 4, 2, 16), 44, None),
    "gqa-L45-w100": ((2, 45, 4, 2, 16), 100, BlockSizes(8, 8)),
}


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
@pytest.mark.parametrize("case", CASES)
def test_window_matches_its_mask(case, implementation):
    shape, window, blocks = CASES[case]
    q, k, v = random_qkv(0, *shape)
    blocks = blocks if implementation == "blockwise" else None
    out = dga_jax.dense_attention(
        q, k, v, implementation=implementation, block_sizes=blocks, window=window
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, window_reference(q, k, v, window), FORWARD_TOL[F32])


def test_a_numpy_window_is_its_int():
    # it passed the check, then failed deep in the band's tiling ('bit_length')
    q, k, v = random_qkv(8, 1, 24, 2, 2, 8)
    run = functools.partial(dga_jax.dense_attention, implementation="blockwise")
    np.testing.assert_array_equal(run(q, k, v, window=np.int64(5)), run(q, k, v, window=5))


def test_a_window_changes_what_a_query_sees():
    q, k, v = random_qkv(1, 2, 45, 4, 2, 16)
    causal = dga_jax.dense_attention(q, k, v, implementation="blockwise")
    windowed = dga_jax.dense_attention(q, k, v, implementation="blockwise", window=5)
    assert_close(windowed[:, :5], causal[:, :5], FORWARD_TOL[F32])  # their whole past fits
    assert float(jnp.abs(windowed[:, 5:] - causal[:, 5:]).max(axis=(0, 2, 3)).min()) > 1e-3


# (20, 8 x 8): windows of 32 entries per 8-query sub-block, in chunks of 8
@pytest.mark.parametrize("window, blocks", [(5, BlockSizes(16, 8)), (20, BlockSizes(8, 8))])
@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
def test_blockwise_window_gradients_match_the_mask(window, blocks, dtype):
    q, k, v = random_qkv(2, 2, 43, 4, 2, 16, dtype)
    cotangent = jax.random.normal(jax.random.PRNGKey(3), q.shape, dtype)
    run = functools.partial(
        dga_jax.dense_attention, implementation="blockwise", block_sizes=blocks, window=window
    )
    _, vjp = jax.vjp(run, q, k, v)
    _, vjp_ref = jax.vjp(functools.partial(window_reference, window=window), q, k, v)
    for name, grad, want in zip("qkv", vjp(cotangent), vjp_ref(cotangent.astype(F32)), strict=True):
        assert grad.dtype == dtype, name
        assert_close(grad, want, GRAD_TOL[dtype])


def test_wide_windows_are_read_in_chunks_of_the_prefix_tile():
    assert window_chunk(56, 256) == (56, 56)  # DGA's band: one tile
    assert window_chunk(512, 256) == (512, 512)
    assert window_chunk(4224, 512) == (512, 4608)  # a 4K sliding window in 128-query blocks
    assert window_chunk(40, 8) == (8, 40)


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "4"])
def test_a_bad_window_is_named(window):
    q, k, v = random_qkv(4, 1, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        dga_jax.dense_attention(q, k, v, window=window)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        prefill(q, k, v, max_len=8, window=window)


@pytest.mark.parametrize(
    "prompt_len, window", [(0, 4), (9, 4), (3, 7), (9, 12), (9, 32), (9, 33), (9, 40)]
)
def test_windowed_decoding_equals_windowed_attention(prompt_len, window):
    q, k, v = random_qkv(5, 2, 30, 4, 2, 16)
    cache = prefill(q[:, :prompt_len], k[:, :prompt_len], v[:, :prompt_len], max_len=32,
                    window=window)  # fmt: skip
    ring = window <= 32  # a window over max_len never binds: a plain cache of 32 slots
    assert cache.slots == min(window, 32) and cache.window == (window if ring else None)
    outs = []
    for t in range(prompt_len, 30):
        out, cache = jax.jit(decode_step)(q[:, t], k[:, t], v[:, t], cache)
        outs.append(out)
    want = window_reference(q, k, v, window)[:, prompt_len:]
    assert_close(jnp.stack(outs, axis=1), want, FORWARD_TOL[F32])


@pytest.mark.parametrize("window", [8, 7])
def test_a_window_up_to_max_len_decodes_past_it(window):
    # A ring decodes on past max_len whether its window is max_len itself or less.
    q, k, v = random_qkv(8, 1, 14, 2, 1, 8)
    cache = prefill(q[:, :5], k[:, :5], v[:, :5], max_len=8, window=window)
    outs = []
    for t in range(5, 14):
        out, cache = decode_step(q[:, t], k[:, t], v[:, t], cache)
        outs.append(out)
    want = window_reference(q, k, v, window)[:, 5:]
    assert_close(jnp.stack(outs, axis=1), want, FORWARD_TOL[F32])


def test_padded_rows_decode_in_their_own_windows():
    # Right-padded prompts of different lengths prefilled in one call, then decoded together:
    # each row's window ends at its own position.
    q, k, v = random_qkv(6, 3, 24, 4, 2, 16)
    lengths, window = np.array([20, 3, 11]), 6
    cache = prefill(q[:, :20], k[:, :20], v[:, :20], max_len=24, lengths=jnp.asarray(lengths),
                    window=window)  # fmt: skip
    rows = np.arange(3)
    for n in range(4):
        t = lengths + n
        out, cache = decode_step(q[rows, t], k[rows, t], v[rows, t], cache)
        for i in rows:
            want = window_reference(q[i : i + 1], k[i : i + 1], v[i : i + 1], window)
            assert_close(out[i], want[0, t[i]], FORWARD_TOL[F32])


def test_dga_prefill_refuses_a_window():
    q, k, v = random_qkv(7, 1, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="dense attention's sliding window; DGA has none"):
        prefill(q, k, v, max_len=16, config=dga_jax.DGAConfig(4, 0.25), window=4)

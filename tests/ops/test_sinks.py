"""StreamingLLM and LM-Infinite (`dga_jax.ops.sinks`): the blockwise op against the masked
definition (forward and gradients), the RoPE positions against the reference implementations'
literal rules, and decoding with the bounded cache against the prefill."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dga_jax import Llama, ModelConfig
from dga_jax.errors import ConfigError
from dga_jax.model.config import RopeScaling
from dga_jax.model.layers import apply_rope, rope_frequencies
from dga_jax.ops.sinks import LMInfiniteConfig, StreamingLLMConfig, sink_attention, sink_reference
from dga_jax.ops.sinks_decode import sink_prefill
from dga_jax.ops.tiles import BlockSizes
from tests.conftest import (
    FORWARD_TOL,
    GPU_INTERPRET,
    GRAD_TOL,
    TPU_INTERPRET,
    assert_close,
    random_qkv,
)

TOL, GTOL = FORWARD_TOL[jnp.float32], GRAD_TOL[jnp.float32]
CONFIGS = [
    StreamingLLMConfig(start_size=3, recent_size=10),
    StreamingLLMConfig(start_size=1, recent_size=100),  # the window covers everything
    StreamingLLMConfig(start_size=60, recent_size=2),  # more sinks than tokens
    LMInfiniteConfig(global_size=5, local_size=12, limit_distance=12),
    LMInfiniteConfig(global_size=100, local_size=3, limit_distance=7),
]
SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_band=8)


def inputs(seed: int, seq_len: int = 45, b: int = 2, hq: int = 4, hkv: int = 2, d: int = 16):
    """q, k, v and an independent q_far, k_far: the op must use each where the rules say."""
    q, k, v = random_qkv(seed, b, seq_len, hq, hkv, d)
    q_far, k_far, _ = random_qkv(seed + 100, b, seq_len, hq, hkv, d)
    return q, k, v, q_far, k_far


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_forward_and_gradients_equal_the_masked_definition(config):
    """Forward with many query blocks and band windows, and with one; gradients with many."""
    args = inputs(0)
    expected = sink_reference(*args, config)
    for blocks in (SMALL_BLOCKS, BlockSizes()):
        assert_close(sink_attention(*args, config, block_sizes=blocks), expected, TOL)

    grads = _grads(sink_reference, args, config)
    blocked = _grads(functools.partial(sink_attention, block_sizes=SMALL_BLOCKS), args, config)
    for got, expected in zip(blocked, grads, strict=True):
        assert_close(got, expected, GTOL)


def _grads(attention, args, config):
    """Gradients of sum(out**2) with respect to q, k, v, q_far, k_far (waited for)."""

    def loss(*x):
        return jnp.sum(attention(*x, config) ** 2)

    return jax.block_until_ready(jax.grad(loss, argnums=range(5))(*args))


KERNELS = {
    "pallas_gpu": dict(interpret=GPU_INTERPRET, block_sizes=BlockSizes(block_q=16, block_k=16)),
    "pallas_tpu": dict(interpret=TPU_INTERPRET, block_sizes=BlockSizes(block_q=16, block_k=128)),
}


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=repr)
@pytest.mark.parametrize("kernel", KERNELS)
def test_the_kernels_equal_the_masked_definition(kernel, config):
    """The Pallas kernels (interpreted), q_far scoring the prefix: forward and all gradients.
    The reference runs first (an interpreted kernel beside an XLA compile crashed XLA:CPU)."""
    args = inputs(1)
    expected = jax.block_until_ready(sink_reference(*args, config))
    grads = _grads(sink_reference, args, config)
    kernel_attention = functools.partial(sink_attention, implementation=kernel, **KERNELS[kernel])
    assert_close(jax.block_until_ready(kernel_attention(*args, config)), expected, TOL)
    for got, want in zip(_grads(kernel_attention, args, config), grads, strict=True):
        assert_close(got, want, GTOL)


def literal_reference(q, k, v, config, inv_freq):
    """Un-rotated q, k -> attention with the positions each reference assigns, query by query:
    StreamingLLM's cache indices (eval_long_ppl with pos_shift: query at c = min(t, S + R),
    sinks at j, window keys at c - (t - j)); LM-Infinite's local branch at true positions, its
    global branch with q at min(limit, t) and keys un-rotated."""
    seq_len = q.shape[1]
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    rows = []
    for t in range(seq_len):
        keys = np.arange(t + 1)
        if isinstance(config, StreamingLLMConfig):
            s, r = config.start_size, config.recent_size
            keys = keys[(keys < s) | (t - keys <= r)]
            c = min(t, s + r)
            key_pos = np.where(keys < s, keys, c - (t - keys))
            q_pos = np.full(len(keys), c)
        else:
            near = t - keys < config.local_size
            keys = keys[near | (keys < config.global_size)]
            near = t - keys < config.local_size
            q_pos = np.where(near, t, min(config.limit_distance, t))
            key_pos = np.where(near, keys, 0)
        qt = apply_rope(
            jnp.broadcast_to(q[:, t : t + 1], (q.shape[0], len(keys), *q.shape[2:])),
            jnp.broadcast_to(jnp.asarray(q_pos), (q.shape[0], len(keys))),
            inv_freq,
        )
        kt = apply_rope(
            k[:, keys], jnp.broadcast_to(jnp.asarray(key_pos), (q.shape[0], len(keys))), inv_freq
        )
        scores = jnp.einsum("bjhd,bjhd->bhj", qt, kt) * q.shape[-1] ** -0.5
        rows.append(jnp.einsum("bhj,bjhd->bhd", jax.nn.softmax(scores, axis=-1), v[:, keys]))
    return jnp.stack(rows, axis=1)


@pytest.mark.parametrize("config", CONFIGS[:1] + CONFIGS[3:4], ids=repr)
def test_rope_positions_are_those_of_the_reference_implementations(config):
    """What the model passes (q, k at true positions; q_far at far_positions; k_far rotated or
    not) reproduces each reference's own position bookkeeping."""
    q, k, v = random_qkv(3, 1, 40, 4, 2, 16)
    inv_freq = rope_frequencies(16, 10000.0, RopeScaling())
    positions = jnp.arange(40)[None]
    q_rot, k_rot = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    q_far = apply_rope(q, config.far_positions(positions), inv_freq)
    k_far = k_rot if config.far_rope_keys else k
    got = sink_attention(q_rot, k_rot, v, q_far, k_far, config, block_sizes=SMALL_BLOCKS)
    assert_close(got, literal_reference(q, k, v, config, inv_freq), TOL)


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_decoding_with_the_bounded_cache_equals_the_prefill(config):
    """Rows prefilled at different lengths (right-padded), then decoded token by token."""
    q, k, v, q_far, k_far = inputs(1, seq_len=40)
    expected = sink_reference(q, k, v, q_far, k_far, config)
    prompt = 9
    lengths = jnp.array([prompt, 4])
    cache = sink_prefill(k[:, :prompt], k_far[:, :prompt], v[:, :prompt], config, 0.25, lengths)
    assert cache.ring_k.shape[2] == config.window and cache.sink_k.shape[2] == config.sinks
    rows = jnp.arange(2)

    @jax.jit
    def decode(cache, t):
        out, update = cache.attend(*(x[rows, t] for x in (q, k, v, q_far, k_far)))
        return out, cache.apply(update)

    for _ in range(40 - prompt):
        t = cache.length
        out, cache = decode(cache, t)
        assert_close(out, expected[rows, t], TOL)


@pytest.mark.parametrize(
    ("kind", "settings"),
    [("streaming_llm", StreamingLLMConfig(2, 9)), ("lm_infinite", LMInfiniteConfig(3, 8, 8))],
)
def test_model_prefill_and_decoding_equal_its_forward(kind, settings):
    config = ModelConfig.preset("tiny", attention=kind, **{kind: settings})
    model = Llama(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 500, size=(2, 36)))
    full = model(tokens)
    logits, caches = model.prefill(tokens[:, :11], 64)
    assert_close(logits, full[:, :11], TOL)
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode_step(state, token, caches):
        return nnx.merge(graphdef, state).decode_step(token, caches)

    for t in range(11, 36):
        step, caches = decode_step(state, tokens[:, t], caches)
        assert_close(step, full[:, t], TOL)
    dense = Llama(config.replace(attention="dense"), rngs=nnx.Rngs(0))
    assert not np.allclose(full[:, -1], dense(tokens)[:, -1], atol=1e-3)  # past the window


@pytest.mark.parametrize(
    "rope", [RopeScaling(), RopeScaling("yarn", 8.0, original_max_position=4)], ids=lambda r: r.kind
)
def test_lm_infinite_that_sees_what_dense_does_equals_it(rope):
    # One global token at its true distance and a window over the rest: dense attention. Its
    # un-rotated global keys must carry YaRN's cos/sin scale as rotated ones do (they lacked it).
    t = 16
    config = ModelConfig.preset("tiny", rope_scaling=rope, max_position=64)
    lm_infinite = config.replace(attention="lm_infinite", lm_infinite=LMInfiniteConfig(1, t - 1, t))
    tokens = jnp.asarray(np.random.RandomState(1).randint(3, 500, size=(2, t)))
    dense = Llama(config.replace(attention="dense"), rngs=nnx.Rngs(0))(tokens)
    assert_close(Llama(lm_infinite, rngs=nnx.Rngs(0))(tokens), dense, TOL)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"attention": "streaming_llm", "streaming_llm": {"start_size": 0}}, "start_size"),
        ({"streaming_llm": {"recent_size": -3}}, "streaming_llm.recent_size"),
        ({"lm_infinite": {"local_size": 0}}, "lm_infinite.local_size"),
        ({"lm_infinite": {"global_size": 1.5}}, "lm_infinite.global_size"),
        ({"lm_infinite": {"window": 4}}, "lm_infinite.window"),
    ],
)
def test_bad_settings_are_rejected_naming_the_field(values, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        ModelConfig.from_dict(values)


@pytest.mark.parametrize(
    "far", [(jnp.float16, jnp.float32), (jnp.float32, jnp.int32), (jnp.bool_, jnp.float32)]
)
def test_far_inputs_must_have_q_dtype(far):
    q, k, v, q_far, k_far = inputs(0, seq_len=16)
    q_far, k_far = (x.astype(dtype) for x, dtype in zip((q_far, k_far), far, strict=True))
    names = [jnp.dtype(dtype).name for dtype in far]
    with pytest.raises(ValueError, match=rf"q_far {names[0]}, k_far {names[1]}, q float32"):
        sink_attention(q, k, v, q_far, k_far, StreamingLLMConfig(2, 4))


@pytest.mark.parametrize("config", [None, {"start_size": 4}, "streaming_llm"], ids=repr)
def test_a_config_of_another_kind_is_rejected(config):
    args = inputs(0, seq_len=8)
    for op in (sink_attention, sink_reference):
        with pytest.raises(ValueError, match="config must be a StreamingLLMConfig or LMInfinite"):
            op(*args, config)

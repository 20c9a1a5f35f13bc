"""The jitted train and eval steps: micro-batches are the whole batch's mean, one at a time."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.traverse_util import flatten_dict

from dga_jax import Llama, ModelConfig
from train.config import OptimConfig
from train.step import (
    TrainState,
    eval_step,
    loss_fn,
    make_optimizer,
    mean_gradients,
    train_step,
    weight_decay_mask,
)

CONFIG = ModelConfig.preset("tiny", attention="dga", num_layers=1, vocab_size=64)
T = 64


def batch(rows: int, accum: int) -> dict[str, jax.Array]:
    tokens = jax.random.randint(jax.random.key(1), (rows, T + 1), 0, CONFIG.vocab_size)
    shape = (accum, rows // accum, T)
    return {"inputs": tokens[:, :-1].reshape(shape), "targets": tokens[:, 1:].reshape(shape)}


def initial_state(graphdef, params, tx) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, tx.init(params), zero, zero)


def test_accumulated_micro_batches_step_as_the_whole_batch():
    graphdef, params = nnx.split(Llama(CONFIG, rngs=nnx.Rngs(0)))
    tx = make_optimizer(OptimConfig(warmup_steps=0), 10, weight_decay_mask(params))
    step = jax.jit(functools.partial(train_step, graphdef, tx))
    whole, whole_metrics = step(initial_state(graphdef, params, tx), batch(4, 1))
    split, split_metrics = step(initial_state(graphdef, params, tx), batch(4, 4))
    flat = {k: v.reshape(-1, T) for k, v in batch(4, 1).items()}
    expected = loss_fn(params, graphdef, flat["inputs"], flat["targets"])
    np.testing.assert_allclose(split_metrics["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(split_metrics["loss"], whole_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(split_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5)
    changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), whole.params, params)
    assert min(jax.tree.leaves(changed)) > 0  # the step updated every weight
    # AdamW received the whole batch's gradient, once: its moments after one step are
    # (1 - b1) g and (1 - b2) g^2, equal up to float32 summation, which is relative to each
    # tensor's largest entry. The new weights are not compared entry by entry: Adam divides
    # each gradient by its own magnitude, so a weight whose gradient is 1e-6 of its tensor's
    # largest moves by an amount the summation order decides (that order is the host CPU's).
    for moment in ("mu", "nu"):
        for a, b in zip(*(moment_leaves(s.opt_state, moment) for s in (split, whole)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
    for count in moment_leaves(split.opt_state, "count"):
        assert count == 1


def test_bfloat16_gradients_are_accumulated_in_float32():
    # The micro-batches' gradients were summed in bfloat16: 8 significant bits, so the running
    # sum of 32 micro-batches drifted 1-4% (of each tensor's largest entry) from the gradient.
    config = dataclasses.replace(CONFIG, param_dtype="bfloat16", dtype="float32")
    graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    accum = 32
    row = jax.random.randint(jax.random.key(1), (1, 1, T + 1), 0, config.vocab_size)
    rows = jnp.tile(row, (accum, 1, 1))  # equal micro-batches: their mean is any one's
    batch = {"inputs": rows[..., :-1], "targets": rows[..., 1:]}
    _, grads = jax.jit(functools.partial(mean_gradients, graphdef=graphdef))(params, batch=batch)
    whole = jax.grad(loss_fn)(params, graphdef, rows[:, 0, :-1], rows[:, 0, 1:])
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(whole), strict=True):
        assert got.dtype == want.dtype == jnp.bfloat16  # what the optimizer is given
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        # One bfloat16 rounding of the result (2^-7), and the whole batch's float32 sum, whose
        # cancellations leave ~1e-5 of the largest entry in the tensor's near-zero entries.
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-4 * np.abs(want).max())


def moment_leaves(opt_state, name: str) -> list[np.ndarray]:
    """The arrays of every `name` field ("mu", "nu", "count") of an optax state."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, name)
    assert found, name
    return [np.asarray(leaf) for _, value in found for leaf in jax.tree.leaves(value)]


def test_evaluation_runs_one_micro_batch_at_a_time():
    graphdef, params = nnx.split(Llama(CONFIG, rngs=nnx.Rngs(0)))
    evaluate = jax.jit(functools.partial(eval_step, graphdef))
    flat = {k: v.reshape(-1, T) for k, v in batch(8, 1).items()}
    expected = loss_fn(params, graphdef, flat["inputs"], flat["targets"])
    for accum in (1, 4):
        np.testing.assert_allclose(evaluate(params, batch(8, accum)), expected, rtol=1e-6)
    # Its temporaries are those of one micro-batch: the whole batch at once held all of them.
    temps = {
        accum: evaluate.lower(params, batch(8, accum))
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
        for accum in (1, 4)
    }
    assert temps[4] < 0.5 * temps[1], temps


def test_norm_scales_and_biases_are_spared_weight_decay():
    """Every RMSNorm scale (Qwen3's per-head q and k norms too, whose logical axis is head_dim)
    and every bias is spared, as transformers' Trainer spares them; the weight matrices decay."""
    config = ModelConfig.preset("tiny", qk_norm=True, qkv_bias=True, o_bias=True)
    params = nnx.state(Llama(config, rngs=nnx.Rngs(0)), nnx.Param)
    mask = nnx.to_pure_dict(weight_decay_mask(params))
    spared = {("layers", "attn", name) for name in ("q_bias", "k_bias", "v_bias", "o_bias")}
    spared |= {("layers", "attn", "q_norm", "weight"), ("layers", "attn", "k_norm", "weight")}
    spared |= {("layers", "attn_norm", "weight"), ("layers", "mlp_norm", "weight")}
    spared |= {("norm", "weight")}
    flat = {path: bool(value) for path, value in flatten_dict(mask).items()}
    assert {path for path, decays in flat.items() if not decays} == spared
    assert flat[("layers", "attn", "q")] and flat[("layers", "mlp", "gate")] and flat[("embed",)]
